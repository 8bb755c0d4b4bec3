//! Stamps, digests and keys.
//!
//! A *stamp* is `(size, mtime_ns, ino, ctime_ns)` from one `stat`; a *digest* is blake3 of a
//! file's bytes; a *key* names an entry by the source's relative path, size and mtime, so any edit
//! of the source gives a new key. The legacy key is the old scripts' `sha256(path_as_given + file_bytes)[:16]`.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::Digest as _;

use crate::error::{Error, IoContext, Result};

/// Domain separator of the v1 key, so a key can never collide with a digest of other data.
const KEY_DOMAIN: &[u8] = b"featstore-key-v1\0";

/// How many hex digits of a key the dir layout uses in file names (128 bits).
pub const KEY_NAME_LEN: usize = 32;

/// What one `stat` tells about a file's identity and content: size and mtime, and (as git's
/// index does) the inode and ctime, so that a rename or `mv` onto an old name, or a restore that
/// keeps size and mtime, changes the stamp. A changed stamp is never trusted blindly and never
/// condemned blindly: the digest decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// File size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (as `os.stat().st_mtime_ns`).
    pub mtime_ns: i64,
    /// Inode number (0: not recorded, as in entries written before it was).
    pub ino: u64,
    /// Status-change time in nanoseconds (0: not recorded). Renames, `chmod` and every write
    /// change it, and no tool can set it back.
    pub ctime_ns: i64,
}

impl Stamp {
    /// A stamp that knows only size and mtime (what keys and older records hold): it never
    /// equals a stamp taken from a file, so it is always checked by digest.
    pub fn sized(size: u64, mtime_ns: i64) -> Stamp {
        Stamp {
            size,
            mtime_ns,
            ino: 0,
            ctime_ns: 0,
        }
    }

    /// The stamp of already-fetched metadata.
    pub fn from_metadata(meta: &Metadata) -> Stamp {
        Stamp {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ino: meta.ino(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }

    /// `stat`s `path` (following symlinks) and returns its stamp.
    pub fn of(path: &Path) -> Result<Stamp> {
        Ok(Stamp::from_metadata(&std::fs::metadata(path).at(path)?))
    }

    /// True when size and mtime (the fields a key is made of) are equal.
    pub fn same_key_fields(&self, other: &Stamp) -> bool {
        self.size == other.size && self.mtime_ns == other.mtime_ns
    }
}

/// The v1 key of a source: `blake3("featstore-key-v1\0" || u32le(len(p)) || p || u64le(size) ||
/// i64le(mtime_ns))` as 64 hex digits, where `p` is the relative path's raw bytes. Inode and
/// ctime are not part of it: a copy keeps its key, and the digest check decides.
pub fn stamp_key(rel_path: &[u8], stamp: Stamp) -> String {
    let mut h = blake3::Hasher::new();
    h.update(KEY_DOMAIN);
    // Paths longer than 4 GiB do not exist on any file system we run on.
    h.update(&(rel_path.len() as u32).to_le_bytes());
    h.update(rel_path);
    h.update(&stamp.size.to_le_bytes());
    h.update(&stamp.mtime_ns.to_le_bytes());
    h.finalize().to_hex().to_string()
}

/// Opens a file for reading only if it is a regular file, without ever blocking: a FIFO (or a
/// symlink to one, or to `/dev/zero`) where an image or a weights file was would block a plain
/// `open` until a writer appears, or never end a read. Those are [`Error::NotRegular`] at once.
pub fn open_regular(path: &Path) -> Result<(File, Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO opens at once instead of waiting; regular files ignore it.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.file_type().is_file() {
        return Err(Error::NotRegular {
            path: path.to_path_buf(),
            kind: crate::entry::file_kind(&meta.file_type()),
        });
    }
    Ok((file, meta))
}

/// blake3 of a regular file's bytes, as 64 hex digits ([`Error::NotRegular`] for anything else:
/// nothing featstore digests may block).
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let (file, _) = open_regular(path)?;
    // `update_reader` streams through a fixed buffer: constant memory whatever the file size.
    h.update_reader(file).at(path)?;
    Ok(h.finalize().to_hex().to_string())
}

/// A regular file's stamp and blake3 (64 hex digits), read through one descriptor: the stamp
/// before the read and the digest, or [`Error::SourceChanged`] when the stamp after the read
/// differs (the bytes digested may mix two versions). The path is resolved once: a file renamed
/// over it meanwhile is not what was read, and its own stamp (another inode) tells lookups so.
pub fn stamped_file_digest(path: &Path) -> Result<(Stamp, String)> {
    let mut h = blake3::Hasher::new();
    let (mut file, meta) = open_regular(path)?;
    let before = Stamp::from_metadata(&meta);
    h.update_reader(&mut file).at(path)?;
    if Stamp::from_metadata(&file.metadata().at(path)?) != before {
        return Err(Error::SourceChanged {
            path: path.to_path_buf(),
            what: "while its entry was being written; write it again".into(),
        });
    }
    Ok((before, h.finalize().to_hex().to_string()))
}

/// blake3 of in-memory bytes (a caption's text, a data section), as 64 hex digits.
pub fn bytes_digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The old scripts' cache key: `sha256(path_as_given || file_bytes)`, first 16 hex digits.
///
/// `path_as_given` is the path string exactly as the old loader passed it (usually absolute at
/// caching time); `read_from` is where the file can be read now (they differ after a move).
pub fn legacy_sha256_key(path_as_given: &[u8], read_from: &Path) -> Result<String> {
    let mut h = sha2::Sha256::new();
    h.update(path_as_given);
    let (mut file, _) = open_regular(read_from)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(read_from)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let full = hex::encode(h.finalize());
    Ok(full[..16].to_string())
}

/// Raw bytes of a path, as used in keys.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pinned vectors: changing the key function silently would invalidate every dir-layout cache.
    #[test]
    fn stamp_key_vectors() {
        let k = stamp_key(
            b"scene001/img_0001.jpg",
            Stamp::sized(307_200, 1_700_000_000_123_456_789),
        );
        assert_eq!(
            k,
            "0c753eb4ba0f06b37b5a3e7defe849d58378c83cf7537e382cf55968eda3de05"
        );
        let k = stamp_key(b"", Stamp::sized(0, 0));
        assert_eq!(
            k,
            "b3d6ed7aa7bdc00d764336aa0a2dc3fda79f35aed5436a4c4dd7d7273b14c2ff"
        );
        let k = stamp_key("图片/ä.png".as_bytes(), Stamp::sized(1, -1));
        assert_eq!(
            k,
            "0d08e951a5a5a3200ff5429e3045ef4c2096bdb9a2ad1df3607eb32a296edbd5"
        );
    }

    #[test]
    fn key_depends_on_every_field() {
        let base = Stamp::sized(10, 20);
        let k = stamp_key(b"a", base);
        assert_ne!(k, stamp_key(b"b", base));
        assert_ne!(k, stamp_key(b"a", Stamp::sized(11, 20)));
        assert_ne!(k, stamp_key(b"a", Stamp::sized(10, 21)));
        // The length prefix keeps path/size boundaries unambiguous.
        assert_ne!(stamp_key(b"ab", base), stamp_key(b"a", base));
    }

    #[test]
    fn legacy_key_matches_sha256_of_path_then_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img.jpg");
        std::fs::write(&f, b"hello").unwrap();
        // sha256(b"/data/img.jpg" + b"hello") computed independently (Python hashlib).
        let k = legacy_sha256_key(b"/data/img.jpg", &f).unwrap();
        assert_eq!(k, "9c606ebf7ef75b50");
    }

    #[test]
    fn a_fifo_or_a_device_is_refused_at_once_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("img.png");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // A plain open of a FIFO with no writer would block this test forever.
        assert!(matches!(
            file_digest(&fifo),
            Err(Error::NotRegular { kind: "a FIFO", .. })
        ));
        let zero = dir.path().join("zero.png");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(file_digest(&zero), Err(Error::NotRegular { .. })));
        assert!(matches!(
            legacy_sha256_key(b"x", &zero),
            Err(Error::NotRegular { .. })
        ));
        assert!(matches!(
            file_digest(dir.path()),
            Err(Error::NotRegular {
                kind: "a directory",
                ..
            })
        ));
    }

    #[test]
    fn digest_of_file_equals_digest_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, vec![7u8; 3_000_000]).unwrap();
        assert_eq!(
            file_digest(&f).unwrap(),
            bytes_digest(&vec![7u8; 3_000_000])
        );
    }
}
