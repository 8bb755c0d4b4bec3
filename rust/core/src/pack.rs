//! Packs: immutable files holding many entries, each a complete entry (the same bytes a sidecar
//! holds) at a 64-byte aligned offset, so one entry is read by mapping or reading its range
//! (docs/design.md, "Packs").
//!
//! A pack is written by one writer into a temporary file and sealed by a rename; it is never
//! changed afterwards (a compaction writes a new pack). The index locates an entry in a pack by
//! the pack's name, the offset and the length; the pack's own table names every entry it holds,
//! so a pack can be checked, listed and transferred without the index.
//!
//! File layout (little endian): `magic "fspack01" || zeros to 64 || entries (each at a multiple
//! of 64) || table || footer (32 bytes)`. Table: per entry, its offset (u64), length (u64), the
//! blake3 of its bytes (32), the key's length (u32) and the key (the source's relative path as
//! bytes), padded to 8. Footer: `"fspkend1"`, the table's offset, the entry count and the file's
//! length, so a pack cut short is refused whole.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::entry::{sync_dir, DATA_ALIGN};
use crate::error::{Error, IoContext, Result};
use crate::key::Stamp;

const MAGIC: &[u8; 8] = b"fspack01";
const END_MAGIC: &[u8; 8] = b"fspkend1";
const HEADER_LEN: u64 = 64;
const FOOTER_LEN: u64 = 32;
/// Pack files end in this; anything else in the packs directory (temporary files) is not a pack.
pub const PACK_SUFFIX: &str = ".fspack";

/// One entry a pack's table lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub key: Vec<u8>,
    pub offset: u64,
    pub len: u64,
    pub blake3: [u8; 32],
}

/// Where a packed entry is: the pack's file name (in the feature's packs directory), the offset
/// and the length of the entry's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedAt {
    pub pack: std::sync::Arc<str>,
    pub offset: u64,
    pub len: u64,
}

/// A sealed pack: its file name (what the index records), its path and its stamp, taken from
/// its descriptor after the rename.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub name: String,
    pub path: PathBuf,
    pub stamp: Stamp,
}

/// True when `name` is a pack's file name as [`PackWriter`] makes them: hex time, process id,
/// random part, the suffix; no separator, so a record can never name a file outside the packs
/// directory.
pub fn is_pack_name(name: &str) -> bool {
    name.strip_suffix(PACK_SUFFIX).is_some_and(|stem| {
        !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// Writes one pack: entries are appended, then [`PackWriter::seal`] writes the table and renames
/// the file into place. Dropped unsealed, the temporary file is deleted.
pub struct PackWriter {
    dir: PathBuf,
    name: String,
    out: BufWriter<tempfile::NamedTempFile>,
    at: u64,
    table: Vec<Packed>,
    /// A write failed: the bytes after `at` are unknown, so no later offset could be trusted and
    /// the pack is never sealed.
    failed: bool,
}

fn pad_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

impl PackWriter {
    /// Starts a pack in `dir` (created when absent), named after the time (hex nanoseconds, so
    /// names sort oldest first), the process and a random part.
    pub fn create(dir: &Path) -> Result<PackWriter> {
        std::fs::create_dir_all(dir).at(dir)?;
        let name = format!(
            "{:016x}-{}-{:08x}{PACK_SUFFIX}",
            crate::index::now_ns(),
            std::process::id(),
            crate::index::rand_u32()
        );
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .at(dir)?;
        let mut out = BufWriter::with_capacity(4 << 20, tmp);
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        out.write_all(&header).at(dir)?;
        Ok(PackWriter {
            dir: dir.to_path_buf(),
            name,
            out,
            at: HEADER_LEN,
            table: Vec::new(),
            failed: false,
        })
    }

    /// The pack's name once sealed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.at
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Appends one entry's bytes under `key`; returns its offset and length.
    pub fn append(&mut self, key: &[u8], bytes: &[u8]) -> Result<(u64, u64)> {
        self.append_chunks(key, &[bytes])
    }

    /// Appends one entry given as consecutive pieces (its header, then its tensors' data).
    pub fn append_chunks(&mut self, key: &[u8], chunks: &[&[u8]]) -> Result<(u64, u64)> {
        let tmp = self.out.get_ref().path().to_path_buf();
        if self.failed {
            return Err(Error::Invalid(format!(
                "an earlier write to {} failed: the pack is abandoned",
                tmp.display()
            )));
        }
        let offset = pad_to(self.at, DATA_ALIGN as u64);
        let pad = (offset - self.at) as usize;
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        let mut write = |out: &mut BufWriter<tempfile::NamedTempFile>| -> std::io::Result<()> {
            out.write_all(&[0u8; DATA_ALIGN][..pad])?;
            for chunk in chunks {
                out.write_all(chunk)?;
                hasher.update(chunk);
                len += chunk.len() as u64;
            }
            Ok(())
        };
        if let Err(e) = write(&mut self.out) {
            self.failed = true;
            return Err(Error::io(&tmp, e));
        }
        self.at = offset + len;
        self.table.push(Packed {
            key: key.to_vec(),
            offset,
            len,
            blake3: *hasher.finalize().as_bytes(),
        });
        Ok((offset, len))
    }

    /// Writes the table and the footer, syncs the file (with `durable`), renames it into place
    /// and syncs the directory: once this returns, the pack is whole on disk.
    pub fn seal(mut self, durable: bool) -> Result<Sealed> {
        let tmp = self.out.get_ref().path().to_path_buf();
        if self.failed {
            return Err(Error::Invalid(format!(
                "a write to {} failed: the pack is abandoned, its entries are not indexed",
                tmp.display()
            )));
        }
        let table_at = pad_to(self.at, 8);
        let mut table = Vec::new();
        for p in &self.table {
            table.extend_from_slice(&p.offset.to_le_bytes());
            table.extend_from_slice(&p.len.to_le_bytes());
            table.extend_from_slice(&p.blake3);
            table.extend_from_slice(&(p.key.len() as u32).to_le_bytes());
            table.extend_from_slice(&p.key);
            table.resize(pad_to(table.len() as u64, 8) as usize, 0);
        }
        let mut tail = vec![0u8; (table_at - self.at) as usize];
        tail.extend_from_slice(&table);
        let total = self.at + tail.len() as u64 + FOOTER_LEN;
        tail.extend_from_slice(END_MAGIC);
        tail.extend_from_slice(&table_at.to_le_bytes());
        tail.extend_from_slice(&(self.table.len() as u64).to_le_bytes());
        tail.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(&tail).at(&tmp)?;
        let tmp_file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        if durable {
            tmp_file.as_file().sync_all().at(&tmp)?;
        }
        let path = self.dir.join(&self.name);
        let file = tmp_file
            .persist(&path)
            .map_err(|e| Error::io(&path, e.error))?;
        if durable {
            sync_dir(&self.dir)?;
        }
        Ok(Sealed {
            name: self.name,
            path: path.clone(),
            stamp: Stamp::from_metadata(&file.metadata().at(&path)?),
        })
    }
}

/// Reads the table of the pack at `path`; a file that is not a whole pack (cut short, another
/// format, a table pointing outside the file) is corrupt, named with why.
pub fn read_table(path: &Path) -> Result<Vec<Packed>> {
    let (mut file, meta) = crate::entry::open_regular(path)?;
    let len = meta.len();
    let bad = |why: String| {
        Error::corrupt(path, format!("{why}: not a whole pack; it holds nothing featstore serves (`featstore gc` removes it)"))
    };
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(bad(format!(
            "{len} bytes, shorter than a pack's header and footer"
        )));
    }
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, 0).at(path)?;
    let mut foot = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut foot, len - FOOTER_LEN).at(path)?;
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    if &head != MAGIC || &foot[..8] != END_MAGIC || u64_at(&foot, 24) != len {
        return Err(bad("its magic or length does not match".into()));
    }
    let (table_at, count) = (u64_at(&foot, 8), u64_at(&foot, 16));
    if table_at < HEADER_LEN || table_at > len - FOOTER_LEN {
        return Err(bad(format!(
            "its table offset {table_at} lies outside the file"
        )));
    }
    let mut table = vec![0u8; (len - FOOTER_LEN - table_at) as usize];
    file.seek(SeekFrom::Start(table_at)).at(path)?;
    std::io::Read::read_exact(&mut file, &mut table).at(path)?;
    let mut out = Vec::with_capacity(count.min(table.len() as u64 / 56) as usize);
    let mut at = 0usize;
    for i in 0..count {
        let fixed = table
            .get(at..at + 52)
            .ok_or_else(|| bad(format!("its table ends before entry {i}")))?;
        let key_len = u32::from_le_bytes(fixed[48..52].try_into().expect("4")) as usize;
        let key = table
            .get(at + 52..at + 52 + key_len)
            .ok_or_else(|| bad(format!("its table ends inside entry {i}'s key")))?;
        let p = Packed {
            key: key.to_vec(),
            offset: u64_at(fixed, 0),
            len: u64_at(fixed, 8),
            blake3: fixed[16..48].try_into().expect("32"),
        };
        if p.offset < HEADER_LEN || p.offset.checked_add(p.len).is_none_or(|end| end > table_at) {
            return Err(bad(format!("entry {i} lies outside the entry area")));
        }
        out.push(p);
        at = pad_to((at + 52 + key_len) as u64, 8) as usize;
    }
    Ok(out)
}

/// The packs in `dir`, oldest first (empty when there is no directory).
pub fn pack_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    crate::index::named_in(dir, is_pack_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_pack_lists_its_entries_at_aligned_offsets_with_their_digests() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path()).unwrap();
        let (a, b) = (vec![1u8; 100], vec![2u8; 7]);
        let at_a = w.append(b"x/a.png", &a).unwrap();
        let at_b = w.append("ü b.png".as_bytes(), &b).unwrap();
        let sealed = w.seal(true).unwrap();
        assert!(is_pack_name(&sealed.name));
        assert_eq!(at_a, (64, 100));
        assert_eq!(at_b, (192, 7));
        let table = read_table(&sealed.path).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table[1].key, "ü b.png".as_bytes());
        assert_eq!(table[0].blake3, *blake3::hash(&a).as_bytes());
        let bytes = std::fs::read(&sealed.path).unwrap();
        assert_eq!(&bytes[192..199], &b[..]);
        assert_eq!(pack_paths(dir.path()).unwrap(), vec![sealed.path.clone()]);
        assert_eq!(Stamp::of(&sealed.path).unwrap(), sealed.stamp);
    }

    #[test]
    fn an_unsealed_pack_leaves_no_pack_and_a_cut_pack_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path()).unwrap();
        w.append(b"a", b"bytes").unwrap();
        drop(w);
        assert!(pack_paths(dir.path()).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let mut w = PackWriter::create(dir.path()).unwrap();
        w.append(b"a", b"bytes").unwrap();
        let sealed = w.seal(false).unwrap();
        let bytes = std::fs::read(&sealed.path).unwrap();
        std::fs::write(&sealed.path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_table(&sealed.path).unwrap_err().to_string();
        assert!(err.contains("not a whole pack"), "{err}");
    }

    #[test]
    fn pack_names_never_hold_a_separator() {
        assert!(is_pack_name("0000018c-12-abcd.fspack"));
        assert!(!is_pack_name("../x.fspack"));
        assert!(!is_pack_name("a/b.fspack"));
        assert!(!is_pack_name(".fspack"));
        assert!(!is_pack_name("x.seg"));
    }
}
