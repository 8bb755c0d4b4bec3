//! The chains that name and check a history's entries (docs/design.md, "History entries").
//!
//! A history is an ordered list of frames; prefix `k` (frames `0..=k`) has three chain values,
//! each computed from the one before, so one pass over the list gives every prefix's values at the
//! cost of the list (linear, never the T(T+1)/2 of recomputing each prefix):
//!
//! - the **key** `h_k = blake3(h_{k-1} || member(f_k))` (`h_{-1}` the key domain) with
//!   `member = u32le(len(p)) || p || u64le(size) || i64le(mtime_ns)`: names the entry file, so a
//!   lookup finds the entry of these frames as they are now;
//! - the **stamps** chain, which adds every frame's inode and ctime (see [`chains`]): equal to
//!   the recorded one only while every frame keeps its full stamp, so a lookup trusts an entry
//!   without reading any frame;
//! - the **content** chain, over `u32le(len(p)) || p || blake3(frame bytes)`: what decides when
//!   a stamp moved (a `touch`, a copy, a frame renamed onto another's name), as a digest does for
//!   a per-image entry.
//!
//! An entry records its own prefix's three values, not its frames, so an episode's entries are
//! linear in its length.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::Result;
use crate::key::{self, path_bytes, Stamp};

/// The domain of the key chain (the key of a one-frame history starts from it).
pub const KEY_DOMAIN: &[u8] = b"featstore-history-v1\0";
const STAMPS_DOMAIN: &[u8] = b"featstore-history-stamps-v1\0";
const CONTENT_DOMAIN: &[u8] = b"featstore-history-content-v1\0";

/// One blake3 digest.
pub type Digest = [u8; 32];

/// The key and stamps chains of a history's prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Links {
    /// `keys[k]`: the key of frames `0..=k`.
    pub keys: Vec<Digest>,
    /// `stamps[k]`: the stamps chain of frames `0..=k` (only the whole list's when asked for the
    /// last only).
    pub stamps: Vec<Digest>,
    /// The newest mtime of any frame (whether an entry written now is racy).
    pub newest_mtime_ns: i64,
}

/// The key of a prefix: `blake3(previous key, or the domain || member)`, hashed from one
/// buffer (`buf`, reused): a `Hasher` is about 2 KB to set up, several times the hash of the
/// hundred bytes a key covers, and a lookup computes one per frame.
fn key_of(buf: &mut Vec<u8>, previous: Option<&Digest>, rel: &[u8], stamp: &Stamp) -> Digest {
    buf.clear();
    buf.extend_from_slice(previous.map_or(KEY_DOMAIN, |d| d.as_slice()));
    // Paths longer than 4 GiB do not exist on any file system we run on.
    buf.extend_from_slice(&(rel.len() as u32).to_le_bytes());
    buf.extend_from_slice(rel);
    buf.extend_from_slice(&stamp.size.to_le_bytes());
    buf.extend_from_slice(&stamp.mtime_ns.to_le_bytes());
    *blake3::hash(buf).as_bytes()
}

/// The chains of `members` (each frame's relative path and stamp, in order): the key of every
/// prefix, and the stamps chain of every prefix or, with `last_only`, of the whole list.
///
/// The stamps chain of prefix `k` is `blake3(domain || u64le(ino_0) || i64le(ctime_0) || ... ||
/// u64le(ino_k) || i64le(ctime_k) || key_k)`: the key already holds every path, size and mtime,
/// so one running hash of the inodes and ctimes completes it (one finalization per prefix
/// asked for, not per frame).
pub fn chains(members: &[(&[u8], Stamp)], last_only: bool) -> Links {
    let mut keys: Vec<Digest> = Vec::with_capacity(members.len());
    let mut stamps: Vec<Digest> = Vec::new();
    let mut running = blake3::Hasher::new();
    running.update(STAMPS_DOMAIN);
    let mut newest = i64::MIN;
    let mut buf = Vec::new();
    for (k, (rel, stamp)) in members.iter().enumerate() {
        newest = newest.max(stamp.mtime_ns);
        let key = key_of(&mut buf, keys.last(), rel, stamp);
        keys.push(key);
        running.update(&stamp.ino.to_le_bytes());
        running.update(&stamp.ctime_ns.to_le_bytes());
        if !last_only || k + 1 == members.len() {
            let mut s = running.clone();
            s.update(&keys[k]);
            stamps.push(*s.finalize().as_bytes());
        }
    }
    Links {
        keys,
        stamps,
        newest_mtime_ns: newest,
    }
}

/// The chains of `rels` (relative to `root`) from one `stat` of each frame, following symlinks.
/// A frame that cannot be stat'ed is an error naming it (`NotFound` when it is gone: the history
/// has no entry).
pub fn links<P: AsRef<Path>>(root: &Path, rels: &[P], last_only: bool) -> Result<Links> {
    let mut folder = Folder::default();
    let mut members: Vec<(&[u8], Stamp)> = Vec::with_capacity(rels.len());
    for rel in rels {
        let rel = path_bytes(rel.as_ref());
        if !is_normal_relative(rel) {
            // Keys hash the path's bytes: `a//b.png` or `/root/a.png` would name another entry.
            return Err(crate::Error::Invalid(format!(
                "{} is not a normal path relative to the data root",
                String::from_utf8_lossy(rel)
            )));
        }
        members.push((rel, folder.stat(root, rel)?));
    }
    Ok(chains(&members, last_only))
}

/// Whether `rel` is a path relative to the root as keys spell it: not absolute, no empty, `.`
/// or `..` component.
pub fn is_normal_relative(rel: &[u8]) -> bool {
    !rel.is_empty()
        && rel[0] != b'/'
        && rel
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// The frames of an episode usually share one folder: `stat`ing each relative to that folder's
/// open descriptor resolves the root's components once per folder instead of once per frame.
/// The names are split and NUL-terminated in reused buffers: with the `stat`s costing well under
/// a microsecond each, an allocation per frame would be a large part of a lookup.
#[derive(Default)]
struct Folder {
    parent: Option<Vec<u8>>,
    fd: Option<std::fs::File>,
    name: Vec<u8>,
}

impl Folder {
    /// The stamp of `rel` (a normal relative path, see [`is_normal_relative`]) under `root`.
    fn stat(&mut self, root: &Path, rel: &[u8]) -> Result<Stamp> {
        let full = || root.join(std::ffi::OsStr::from_bytes(rel));
        let Some(slash) = rel.iter().rposition(|&b| b == b'/') else {
            return Stamp::of(&full());
        };
        let (parent, name) = (&rel[..slash], &rel[slash + 1..]);
        if self.parent.as_deref() != Some(parent) {
            self.parent = Some(parent.to_vec());
            // O_PATH: a descriptor to resolve names against, opened without read permission on
            // the folder's contents; a folder that cannot be opened falls back to full paths.
            self.fd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(root.join(std::ffi::OsStr::from_bytes(parent)))
                .ok();
        }
        let Some(fd) = &self.fd else {
            return Stamp::of(&full());
        };
        if name.contains(&0) {
            let invalid = std::io::Error::from(std::io::ErrorKind::InvalidInput);
            return Err(crate::Error::io(full(), invalid));
        }
        self.name.clear();
        self.name.extend_from_slice(name);
        self.name.push(0);
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `self.name` is NUL-terminated with no NUL before it, and `st` is written by
        // the call before it is read.
        let rc = unsafe {
            libc::fstatat(
                fd.as_raw_fd(),
                self.name.as_ptr().cast(),
                st.as_mut_ptr(),
                0,
            )
        };
        if rc != 0 {
            return Err(crate::Error::io(full(), std::io::Error::last_os_error()));
        }
        // SAFETY: fstatat returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        Ok(Stamp {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ino: st.st_ino,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        })
    }
}

/// The content chain of every prefix of `rels`: each frame read and digested once (in
/// parallel, in `pool`), regular files only (a FIFO where a frame was is an error, never a hang).
pub fn contents(root: &Path, rels: &[PathBuf], pool: &rayon::ThreadPool) -> Result<Vec<Digest>> {
    let digests: Vec<Result<String>> = pool.install(|| {
        rels.par_iter()
            .map(|rel| key::file_digest(&root.join(rel)))
            .collect()
    });
    let digests: Vec<String> = digests.into_iter().collect::<Result<_>>()?;
    let members: Vec<(&[u8], &str)> = rels
        .iter()
        .map(|r| path_bytes(r))
        .zip(digests.iter().map(String::as_str))
        .collect();
    Ok(content_chain(&members))
}

fn chained(previous: Option<&Digest>, domain: &[u8]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(previous.map_or(domain, |d| d.as_slice()));
    h
}

/// The content chain of every prefix from the frames' digests (64 hex digits each), for callers
/// that hold them already (a pass records them; `verify` digests each frame once per run):
/// `d_k = blake3(d_{k-1} || u32le(len(p)) || p || digest)`, `d_{-1}` the content domain.
pub fn content_chain(members: &[(&[u8], &str)]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(members.len());
    for (rel, digest_hex) in members {
        let mut h = chained(chain.last(), CONTENT_DOMAIN);
        h.update(&(rel.len() as u32).to_le_bytes());
        h.update(rel);
        let mut raw = [0u8; 32];
        // A digest we computed is always 64 hex digits; anything else chains as given (and so
        // never matches a recorded chain).
        if hex::decode_to_slice(digest_hex, &mut raw).is_ok() {
            h.update(&raw);
        } else {
            h.update(digest_hex.as_bytes());
        }
        chain.push(*h.finalize().as_bytes());
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_key_is_the_hash_of_the_previous_key_and_the_member_as_written_down() {
        let stamp = Stamp {
            size: 1234,
            mtime_ns: -5,
            ino: 7,
            ctime_ns: 9,
        };
        let mut buf = Vec::new();
        let first = key_of(&mut buf, None, b"ep/0.png", &stamp);
        let second = key_of(&mut buf, Some(&first), b"ep/1.png", &stamp);
        for (previous, rel, key) in [
            (None, b"ep/0.png", first),
            (Some(first), b"ep/1.png", second),
        ] {
            let mut h = blake3::Hasher::new();
            h.update(previous.as_ref().map_or(KEY_DOMAIN, |d| d.as_slice()));
            h.update(&(rel.len() as u32).to_le_bytes());
            h.update(rel);
            h.update(&stamp.size.to_le_bytes());
            h.update(&stamp.mtime_ns.to_le_bytes());
            assert_eq!(*h.finalize().as_bytes(), key);
        }
    }

    fn tree(names: &[&str]) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        for (i, name) in names.iter().enumerate() {
            fs::write(dir.path().join(name), vec![i as u8; 10 + i]).unwrap();
        }
        (dir, names.iter().map(PathBuf::from).collect())
    }

    #[test]
    fn a_prefix_shares_its_chains_with_the_longer_list() {
        let (dir, rels) = tree(&["a.png", "b.png", "c.png"]);
        let long = links(dir.path(), &rels, false).unwrap();
        let short = links(dir.path(), &rels[..2], false).unwrap();
        assert_eq!(long.keys[..2], short.keys[..]);
        assert_eq!(long.stamps[..2], short.stamps[..]);
        assert_ne!(long.keys[1], long.keys[2]);
        let pool = crate::pool::pool(Some(2));
        assert_eq!(
            contents(dir.path(), &rels, &pool).unwrap()[..2],
            contents(dir.path(), &rels[..2], &pool).unwrap()[..]
        );
    }

    #[test]
    fn the_key_chain_is_the_documented_formula() {
        let (dir, rels) = tree(&["a.png", "b.png"]);
        let got = links(dir.path(), &rels, false).unwrap();
        let mut previous: Vec<u8> = KEY_DOMAIN.to_vec();
        for (rel, key) in rels.iter().zip(&got.keys) {
            let st = Stamp::of(&dir.path().join(rel)).unwrap();
            let mut bytes = previous.clone();
            bytes.extend((path_bytes(rel).len() as u32).to_le_bytes());
            bytes.extend(path_bytes(rel));
            bytes.extend(st.size.to_le_bytes());
            bytes.extend(st.mtime_ns.to_le_bytes());
            assert_eq!(blake3::hash(&bytes).as_bytes(), key);
            previous = key.to_vec();
        }
    }

    #[test]
    fn a_rename_onto_a_frame_moves_the_stamps_chain_not_the_key() {
        let (dir, rels) = tree(&["a.png", "b.png"]);
        let before = links(dir.path(), &rels, false).unwrap();
        let pool = crate::pool::pool(Some(2));
        let content_before = contents(dir.path(), &rels, &pool).unwrap();
        // The same bytes and mtime under a new inode: the key stays, the stamps chain moves,
        // and the content chain says the bytes are the same.
        let b = dir.path().join("b.png");
        let meta = fs::metadata(&b).unwrap();
        let data = fs::read(&b).unwrap();
        fs::write(dir.path().join("copy"), &data).unwrap();
        let mtime = filetime_of(&meta);
        fs::rename(dir.path().join("copy"), &b).unwrap();
        set_mtime(&b, mtime);
        let after = links(dir.path(), &rels, false).unwrap();
        assert_eq!(before.keys, after.keys);
        assert_eq!(before.stamps[0], after.stamps[0]);
        assert_ne!(before.stamps[1], after.stamps[1]);
        assert_eq!(content_before, contents(dir.path(), &rels, &pool).unwrap());
        fs::write(&b, b"other bytes").unwrap();
        assert_ne!(
            content_before[1],
            contents(dir.path(), &rels, &pool).unwrap()[1]
        );
    }

    #[test]
    fn a_missing_frame_is_not_found() {
        let (dir, mut rels) = tree(&["a.png"]);
        rels.push(PathBuf::from("gone.png"));
        let err = links(dir.path(), &rels, false).unwrap_err();
        assert!(err.to_string().contains("gone.png"), "{err}");
    }

    fn filetime_of(meta: &fs::Metadata) -> (i64, i64) {
        (meta.mtime(), meta.mtime_nsec())
    }

    fn set_mtime(path: &Path, (secs, nanos): (i64, i64)) {
        let file = fs::File::options().write(true).open(path).unwrap();
        let time = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos as u32);
        file.set_modified(time).unwrap();
    }
}
