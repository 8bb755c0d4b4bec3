//! Entry files: safetensors files with aligned data and featstore's metadata.
//!
//! Layout: `u64le(n) || header JSON (n bytes, space padded) || data`. The data section starts at a
//! multiple of [`DATA_ALIGN`], tensors are stored contiguously ordered by element size (largest
//! first) so each starts at a multiple of its own element size, and `safetensors.safe_open` reads
//! the file unchanged.
//!
//! We parse headers ourselves rather than with the `safetensors` crate: reads must validate a
//! header fetched with one `pread` (without the data in memory), cap its length well below the
//! crate's 100 MB, and report errors that name the file.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};
use crate::key::Stamp;

/// Data sections start at this alignment (a cache line; enough for every dtype and SIMD loads).
pub const DATA_ALIGN: usize = 64;

/// Largest header we accept. featstore headers are a few KiB; the cap refuses hostile files
/// before allocating for them.
pub const MAX_HEADER_LEN: u64 = 16 << 20;

/// Metadata key of the checksum of the data section.
pub const META_DATA_BLAKE3: &str = "data.blake3";

/// Metadata key naming the on-disk format version.
pub const META_FORMAT: &str = "featstore.format";

/// The format version this crate writes.
pub const FORMAT_VERSION: &str = "featstore-entry-v1";

/// Element types of the safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    /// Parses a safetensors dtype name (`"F32"`, `"BF16"`, ...).
    pub fn parse(name: &str) -> Option<Dtype> {
        use Dtype::*;
        Some(match name {
            "BOOL" => Bool,
            "U8" => U8,
            "I8" => I8,
            "F8_E4M3" => F8E4M3,
            "F8_E5M2" => F8E5M2,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "I64" => I64,
            "U64" => U64,
            "F64" => F64,
            _ => return None,
        })
    }

    /// The safetensors name of this dtype.
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8E4M3 => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            I64 => "I64",
            U64 => "U64",
            F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            I64 | U64 | F64 => 8,
        }
    }
}

/// A tensor to write: its name, type, shape and raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

/// A tensor as described by a validated header; offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors ordered by offset.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__` (string to string).
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset where the data section starts (`8 + header length`).
    pub data_start: u64,
    /// Length of the data section in bytes.
    pub data_len: u64,
}

impl Header {
    /// The tensor called `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// True when every dimension, and every stride of a contiguous layout (the product of the
/// dimensions after it, zeros counted as ones), fits an `i64`.
fn fits_i64_strides(shape: &[u64]) -> bool {
    shape
        .iter()
        .try_fold(1i64, |acc, &d| {
            i64::try_from(d.max(1))
                .ok()
                .and_then(|d| acc.checked_mul(d))
        })
        .is_some()
}

/// Validates the 8-byte length prefix against the file length; returns the header length.
fn header_len(path: &Path, prefix: [u8; 8], file_len: u64) -> Result<u64> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_LEN {
        return Err(Error::corrupt(path, format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit: not a featstore entry, or damaged; delete it and recompute")));
    }
    if 8 + n > file_len {
        return Err(Error::corrupt(path, format!("header length {n} is larger than the file ({file_len} bytes): the file is truncated; delete it and recompute")));
    }
    Ok(n)
}

/// Parses and validates a header's JSON. `data_len` is the number of bytes after the header.
pub fn parse_header(path: &Path, json: &[u8], data_start: u64, data_len: u64) -> Result<Header> {
    let bad = |reason: String| Error::corrupt(path, reason);
    let root: Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("malformed header JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == "__metadata__" {
            let Value::Object(m) = value else {
                return Err(bad("__metadata__ is not an object".into()));
            };
            for (k, v) in m {
                match v {
                    Value::String(s) => {
                        metadata.insert(k, s);
                    }
                    other => {
                        return Err(bad(format!(
                            "metadata value of {k:?} is not a string: {other}"
                        )))
                    }
                }
            }
            continue;
        }
        let Value::Object(t) = value else {
            return Err(bad(format!(
                "tensor {name:?}: description is not an object"
            )));
        };
        let dtype_name = t
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor {name:?}: missing dtype")))?;
        let dtype = Dtype::parse(dtype_name)
            .ok_or_else(|| bad(format!("tensor {name:?}: unknown dtype {dtype_name:?}")))?;
        let shape = t
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name:?}: shape is not a list of non-negative integers"
                ))
            })?;
        let offsets = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name:?}: data_offsets is not a pair of integers"
                ))
            })?;
        // Readers hand shapes and strides to torch as i64: refuse dimensions that do not fit,
        // even on a tensor that holds no elements.
        if !fits_i64_strides(&shape) {
            return Err(bad(format!(
                "tensor {name:?}: shape {shape:?} is too large to describe in memory"
            )));
        }
        let (start, end) = (offsets[0], offsets[1]);
        if start > end || end > data_len {
            return Err(bad(format!("tensor {name:?}: offsets [{start}, {end}] out of range (data section is {data_len} bytes; truncated?)")));
        }
        // Tensors are handed to torch in place (zero-copy), so each must start at a multiple of
        // its element size. featstore's writer always aligns them; a file that does not was
        // written by something else.
        if (data_start + start) % dtype.size() as u64 != 0 {
            return Err(bad(format!(
                "tensor {name:?}: {dtype_name} data starts at byte {}, not a multiple of {} (featstore aligns every tensor): not a featstore entry; delete it and recompute",
                data_start + start,
                dtype.size()
            )));
        }
        let expected = element_count(&shape).and_then(|n| n.checked_mul(dtype.size() as u64));
        if expected != Some(end - start) {
            return Err(bad(format!(
                "tensor {name:?}: {dtype_name} shape {shape:?} does not fit {} bytes",
                end - start
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            start,
            end,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut pos = 0u64;
    for t in &tensors {
        if t.start < pos {
            return Err(bad(format!(
                "tensor {:?} overlaps the tensor before it",
                t.name
            )));
        }
        if t.start > pos {
            return Err(bad(format!(
                "hole of {} bytes before tensor {:?}",
                t.start - pos,
                t.name
            )));
        }
        pos = t.end;
    }
    if pos != data_len {
        return Err(bad(format!(
            "{} bytes after the last tensor",
            data_len - pos
        )));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
        data_len,
    })
}

/// Parses the header at the start of `bytes` (a whole entry file in memory).
pub fn parse_entry_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 8 {
        return Err(Error::corrupt(path, format!("file is {} bytes, shorter than a header length: truncated; delete it and recompute", bytes.len())));
    }
    let n = header_len(
        path,
        bytes[..8].try_into().expect("8 bytes"),
        bytes.len() as u64,
    )?;
    let data_start = 8 + n;
    parse_header(
        path,
        &bytes[8..data_start as usize],
        data_start,
        bytes.len() as u64 - data_start,
    )
}

/// Opens an entry file for reading without ever blocking, and only if it is a regular file: a
/// FIFO (or a symlink to one) put where an entry belongs would block a plain `open` until a
/// writer appears, and a directory or device is no entry either. Those are corrupt entries (a
/// counted miss), found at once.
pub fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    crate::key::open_regular(path).map_err(|e| match e {
        Error::NotRegular { path, kind } => Error::corrupt(
            path,
            format!("not a regular file ({kind}): featstore never writes one there; remove it and recompute"),
        ),
        e => e,
    })
}

/// What kind of file something that is not a regular file is, in words.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Reads and validates only the header of the entry at `path` (two `pread`s, no data read).
pub fn read_header(path: &Path) -> Result<Header> {
    read_header_stamped(path).map(|(h, _)| h)
}

/// [`read_header`], with the stamp of the very file the header was read from (from the open
/// descriptor: a file renamed over the path in between cannot be mistaken for it).
pub fn read_header_stamped(path: &Path) -> Result<(Header, crate::key::Stamp)> {
    let (file, meta) = open_regular(path)?;
    let header = read_header_of(&file, path, meta.len())?;
    Ok((header, crate::key::Stamp::from_metadata(&meta)))
}

/// Reads and validates the header of an already open entry file of `file_len` bytes.
pub fn read_header_of(file: &File, path: &Path, file_len: u64) -> Result<Header> {
    read_header_at(file, path, Span::whole(file_len), file_len)
}

/// Where an entry's bytes are in the file that holds them: the whole file, or a range of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl Span {
    pub fn whole(len: u64) -> Span {
        Span { offset: 0, len }
    }

    /// Refuses a range that the file of `file_len` bytes does not hold (a pack cut short, or an
    /// index record that is damaged).
    fn within(self, path: &Path, file_len: u64) -> Result<Span> {
        match self.offset.checked_add(self.len) {
            Some(end) if end <= file_len => Ok(self),
            _ => Err(Error::corrupt(path, format!("the entry at bytes {}..{} lies past the end of the file ({file_len} bytes): the pack is damaged; `featstore verify` names its entries", self.offset, self.offset.saturating_add(self.len)))),
        }
    }
}

/// Reads and validates the header of the entry at `span` of an open file of `file_len` bytes.
pub fn read_header_at(file: &File, path: &Path, span: Span, file_len: u64) -> Result<Header> {
    let span = span.within(path, file_len)?;
    let mut prefix = [0u8; 8];
    if span.len < 8 {
        return Err(Error::corrupt(path, format!("the entry is {} bytes, shorter than a header length: truncated; delete it and recompute", span.len)));
    }
    file.read_exact_at(&mut prefix, span.offset).at(path)?;
    let n = header_len(path, prefix, span.len)?;
    let mut json = vec![0u8; n as usize];
    file.read_exact_at(&mut json, span.offset + 8).at(path)?;
    parse_header(path, &json, 8 + n, span.len - 8 - n)
}

/// [`read_header_stamped`] of the entry at `span` of the file at `path` (a pack), with the
/// stamp of the file read.
pub fn read_header_in(path: &Path, span: Span) -> Result<(Header, crate::key::Stamp)> {
    let (file, meta) = open_regular(path)?;
    let header = read_header_at(&file, path, span, meta.len())?;
    Ok((header, crate::key::Stamp::from_metadata(&meta)))
}

/// Encodes the header (length prefix, JSON, space padding) for tensors laid out in `order`.
/// Refuses what every reader would refuse (a header over [`MAX_HEADER_LEN`]), so no entry is
/// written that is then called corrupt and recomputed in a loop.
fn encode_header(
    tensors: &[(String, Dtype, Vec<u64>, u64)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut root = Map::new();
    if !metadata.is_empty() {
        root.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings serialize"),
        );
    }
    let mut offset = 0u64;
    for (name, dtype, shape, len) in tensors {
        let mut t = Map::new();
        t.insert("dtype".into(), Value::from(dtype.name()));
        t.insert("shape".into(), Value::from(shape.clone()));
        t.insert(
            "data_offsets".into(),
            Value::from(vec![offset, offset + len]),
        );
        root.insert(name.clone(), Value::Object(t));
        offset += len;
    }
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("header serializes");
    let padded = (8 + json.len()).div_ceil(DATA_ALIGN) * DATA_ALIGN - 8;
    json.resize(padded, b' ');
    if json.len() as u64 > MAX_HEADER_LEN {
        let biggest = metadata
            .iter()
            .max_by_key(|(_, v)| v.len())
            .map_or(String::new(), |(k, v)| {
                format!(" (the largest field, {k:?}, holds {} bytes)", v.len())
            });
        return Err(Error::HeaderTooLarge(format!(
            "the entry's header would be {} bytes, over the {MAX_HEADER_LEN}-byte limit every reader enforces{biggest}; \
             nothing was written: record less metadata with the entry",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Orders tensors by element size (largest first), then name: contiguous storage then keeps every
/// tensor aligned to its own element size, with no padding tensors in the file.
fn storage_order<'t, 'a>(tensors: &'t [TensorData<'a>]) -> Vec<&'t TensorData<'a>> {
    let mut ordered: Vec<&TensorData> = tensors.iter().collect();
    ordered.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(&b.name))
    });
    ordered
}

/// The longest file name (bytes) Linux file systems take.
pub const NAME_MAX: usize = 255;

/// Writes `bytes` chunks to a temporary file beside `path` and renames it over `path`.
///
/// Readers that mapped the old file keep a valid mapping (its inode lives on) and no reader ever
/// sees a partial file. With `durable`, the file and its directory are fsynced.
pub fn write_atomic(path: &Path, chunks: &[&[u8]], durable: bool) -> Result<Stamp> {
    let bytes = chunks.iter().map(|c| c.len()).sum();
    write_atomic_with(path, bytes, durable, |w| {
        chunks.iter().try_for_each(|chunk| w.write_all(chunk))
    })
}

/// [`write_atomic`] of what `fill` writes into the temporary file (`bytes` of it, for the
/// message of a full disk): a large file (an index segment) need not be held whole in memory.
/// Returns the written file's stamp, taken from its descriptor after the rename (which may
/// change its ctime), so a writer that records it does not resolve the path again.
pub fn write_atomic_with(
    path: &Path,
    bytes: usize,
    durable: bool,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<Stamp> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A full disk is the one failure every later write shares: say so, name the target (the
    // temporary file is gone with the error) and say what to do. The kind stays StorageFull, so
    // callers (and Python's errno) still see ENOSPC.
    let full = |e: std::io::Error, at: &Path| {
        if e.kind() != std::io::ErrorKind::StorageFull {
            return Error::io(at, e);
        }
        let why = format!("no space left on the device to write {bytes} bytes ({e}); nothing was written and the files already there are intact: free space, or write to another disk (--cache-dir)");
        Error::io(path, std::io::Error::new(e.kind(), why))
    };
    // The temporary name is `.<name>.<random>.tmp`: cut `name` so that it fits in NAME_MAX even
    // when the target's name only just does.
    let room = NAME_MAX.saturating_sub(".".len() + ".".len() + 6 + ".tmp".len());
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", &name[..cut]))
        .suffix(".tmp")
        // Entries are shared data: readable by the group and others, as a plain `open` would make.
        .permissions(std::fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| full(e, dir))?;
    fill(tmp.as_file_mut()).map_err(|e| full(e, tmp.path()))?;
    if durable {
        tmp.as_file().sync_all().map_err(|e| full(e, tmp.path()))?;
    }
    let file = tmp.persist(path).map_err(|e| full(e.error, path))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(Stamp::from_metadata(&file.metadata().at(path)?))
}

/// fsyncs a directory, making renames inside it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Writes an entry atomically; returns its size in bytes and its stamp (see
/// [`write_atomic_with`]).
///
/// `metadata` is stored as given plus `featstore.format` and `data.blake3` (the checksum of the
/// data section, which `verify` and racy-entry checks use).
pub fn write_entry(
    path: &Path,
    tensors: &[TensorData],
    metadata: &BTreeMap<String, String>,
    durable: bool,
) -> Result<(u64, Stamp)> {
    let (header, data) = encode_entry(tensors, metadata)?;
    let mut chunks: Vec<&[u8]> = vec![&header];
    chunks.extend(data);
    let stamp = write_atomic(path, &chunks, durable)?;
    Ok((chunks.iter().map(|c| c.len() as u64).sum(), stamp))
}

/// An entry's bytes as [`write_entry`] writes them: the header (length prefix, JSON, padding) and
/// the tensors' data in storage order, to be written one after the other (into a file of its
/// own, or appended to a pack).
pub fn encode_entry<'a>(
    tensors: &[TensorData<'a>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<&'a [u8]>)> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if t.name == "__metadata__" || !seen.insert(t.name.as_str()) {
            return Err(Error::Invalid(format!(
                "tensor name {:?} is reserved or repeated",
                t.name
            )));
        }
        let expected = element_count(&t.shape).and_then(|n| n.checked_mul(t.dtype.size() as u64));
        if expected != Some(t.data.len() as u64) || !fits_i64_strides(&t.shape) {
            return Err(Error::Invalid(format!(
                "tensor {:?}: {} shape {:?} does not fit {} bytes",
                t.name,
                t.dtype.name(),
                t.shape,
                t.data.len()
            )));
        }
    }
    let ordered = storage_order(tensors);
    let mut hasher = blake3::Hasher::new();
    for t in &ordered {
        hasher.update(t.data);
    }
    let mut meta = metadata.clone();
    meta.insert(META_FORMAT.into(), FORMAT_VERSION.into());
    meta.insert(
        META_DATA_BLAKE3.into(),
        hasher.finalize().to_hex().to_string(),
    );
    let layout: Vec<_> = ordered
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                t.data.len() as u64,
            )
        })
        .collect();
    let header = encode_header(&layout, &meta)?;
    Ok((header, ordered.iter().map(|t| t.data).collect()))
}

/// Writes the entry at `from` to `to` (often the same path) with updated metadata (same tensors,
/// same data), atomically: refreshes the stamp of a source that was touched but not changed.
/// Only while the file at `from` is still the one judged (`judged`, its stamp): false, and
/// nothing written, when another writer replaced it meanwhile.
pub fn rewrite_metadata_to(
    from: &Path,
    to: &Path,
    judged: crate::key::Stamp,
    update: impl FnOnce(&mut BTreeMap<String, String>),
    durable: bool,
) -> Result<bool> {
    let (entry, id) = open_entry_with(from, ReadMode::Pread, None)?;
    if id.stamp != judged {
        // Another writer replaced the file since it was judged: its header is not ours to edit.
        return Ok(false);
    }
    let mut meta = entry.header.metadata.clone();
    update(&mut meta);
    let layout: Vec<_> = entry
        .header
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.end - t.start))
        .collect();
    let header = encode_header(&layout, &meta)?;
    write_atomic(to, &[&header, entry.data()], durable)?;
    Ok(true)
}

/// Entries of at most this many bytes are read into memory even in [`ReadMode::Map`].
pub const SMALL_ENTRY_BYTES: u64 = 16 * 1024;

/// How an entry's bytes get into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// A private copy-on-write mapping: zero-copy, pages shared with the page cache.
    Map,
    /// `pread` into an owned buffer: for network file systems, where a file replaced by another
    /// node could make a mapped page fault with SIGBUS.
    Pread,
}

/// A 64-byte aligned heap buffer (tensors handed to torch must be aligned to their element size).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (or writes through raw pointers handed to torch, which owns
// the aliasing discipline of its tensors), like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), DATA_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized (zeroed) bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The bytes behind an open entry.
pub enum EntryBytes {
    /// A mapping whose first `skip` bytes precede the entry (a packed entry's mapping starts at
    /// the page holding it).
    Mapped(MmapMut, usize),
    Owned(AlignedBuf),
}

impl EntryBytes {
    /// Start address of the bytes (tensors point into this region).
    pub fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            EntryBytes::Mapped(m, skip) => &m[*skip..],
            EntryBytes::Owned(b) => b.as_slice(),
        }
    }
}

/// An open, validated entry. Tensors are views into `bytes`, which lives as long as any holder
/// of the `Arc` (the bindings give one to every tensor they hand out).
pub struct Entry {
    pub header: Arc<Header>,
    pub bytes: Arc<EntryBytes>,
}

impl Entry {
    /// The data section.
    pub fn data(&self) -> &[u8] {
        &self.bytes.as_slice()[self.header.data_start as usize..]
    }

    /// The bytes of one tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.data()[t.start as usize..t.end as usize]
    }

    /// Checks the data section against the `data.blake3` metadata.
    pub fn verify_checksum(&self, path: &Path) -> Result<()> {
        let Some(expected) = self.header.metadata.get(META_DATA_BLAKE3) else {
            return Err(Error::corrupt(
                path,
                "no data.blake3 checksum in the metadata",
            ));
        };
        let actual = blake3::hash(self.data()).to_hex();
        if actual.as_str() != expected {
            return Err(Error::corrupt(path, format!("data checksum mismatch (stored {expected}, computed {actual}): the data was damaged after writing")));
        }
        Ok(())
    }
}

/// Identifies the exact file an entry was read from: a header validated for one identity is
/// valid for the same identity later (entries are replaced by rename, never rewritten in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub stamp: crate::key::Stamp,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            stamp: crate::key::Stamp::from_metadata(meta),
        }
    }
}

/// Opens and validates the entry at `path`. The file descriptor is closed before returning: a
/// mapping does not need it, and a training loop holding thousands of tensors must not run out
/// of descriptors.
pub fn open_entry(path: &Path, mode: ReadMode) -> Result<Entry> {
    open_entry_with(path, mode, None).map(|(e, _)| e)
}

/// Like [`open_entry`], but reuses `known`'s header when the opened file is the one it was
/// validated for (same [`FileId`]), skipping the JSON parse. Returns the file's identity too.
pub fn open_entry_with(
    path: &Path,
    mode: ReadMode,
    known: Option<(FileId, Arc<Header>)>,
) -> Result<(Entry, FileId)> {
    open_entry_in(path, None, mode, known)
}

/// [`open_entry_with`] of the entry at `span` of the file (a pack), or of the whole file when
/// `span` is None. A packed entry's mapping covers its own pages only and is private to this
/// open, as a whole file's is: a tensor written through never reaches another read.
pub fn open_entry_in(
    path: &Path,
    span: Option<Span>,
    mode: ReadMode,
    known: Option<(FileId, Arc<Header>)>,
) -> Result<(Entry, FileId)> {
    let (file, meta) = open_regular(path)?;
    let id = FileId::of(&meta);
    let span = span
        .unwrap_or(Span::whole(meta.len()))
        .within(path, meta.len())?;
    let len = span.len;
    if len < 8 {
        return Err(Error::corrupt(path, format!("the entry is {len} bytes, shorter than a header length: truncated; delete it and recompute")));
    }
    let bytes = match mode {
        // A small entry is read, not mapped: mapping, faulting in and unmapping its one page cost
        // several times the copy, and a private mapping shares nothing a reader would notice.
        ReadMode::Map if len > SMALL_ENTRY_BYTES => {
            // SAFETY: a private (copy-on-write) mapping: writes through it never reach the file.
            // The file may still be truncated by another process, which would fault on access;
            // featstore never modifies entries in place (write_atomic renames a new inode over
            // the name), and on network file systems callers use ReadMode::Pread instead.
            let page = page_size();
            let start = span.offset / page * page;
            let skip = (span.offset - start) as usize;
            let map = unsafe {
                MmapOptions::new()
                    .offset(start)
                    .len(skip + len as usize)
                    .map_copy(&file)
            }
            .at(path)?;
            EntryBytes::Mapped(map, skip)
        }
        ReadMode::Map | ReadMode::Pread => {
            let mut buf = AlignedBuf::zeroed(len as usize);
            file.read_exact_at(buf.as_mut_slice(), span.offset)
                .at(path)?;
            EntryBytes::Owned(buf)
        }
    };
    drop(file);
    let header = match known {
        Some((known_id, header)) if known_id == id => header,
        _ => Arc::new(parse_entry_bytes(path, bytes.as_slice())?),
    };
    Ok((
        Entry {
            header,
            bytes: Arc::new(bytes),
        },
        id,
    ))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// True when `path` lies on a network file system (NFS, SMB/CIFS, Lustre, GPFS, Ceph, BeeGFS, 9p,
/// FUSE), where featstore reads with `pread` instead of mapping.
pub fn is_network_fs(path: &Path) -> bool {
    const NETWORK_MAGICS: &[u32] = &[
        0x6969,      // NFS
        0x517B,      // SMB
        0xFE53_4D42, // SMB2
        0xFF53_4D42, // CIFS
        0x0BD0_0BD0, // Lustre
        0x4750_4653, // GPFS
        0x00C3_6400, // Ceph
        0x1983_0326, // BeeGFS
        0x0102_1997, // 9p
        0x6573_5546, // FUSE (s3fs, gcsfuse, sshfs, ...)
        0x5346_414F, // AFS
    ];
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct we own; c_path is NUL-terminated.
    let magic = unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        if libc::statfs(c_path.as_ptr(), &mut s) != 0 {
            return false;
        }
        s.f_type as u64 as u32
    };
    NETWORK_MAGICS.contains(&magic)
}
