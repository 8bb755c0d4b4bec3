//! The index: what each valid entry's source and entry file looked like when it was judged, kept
//! in immutable, sorted, memory-mapped segment files (docs/design.md, "The index").
//!
//! A segment is written whole by one process (a temporary file, then a rename) and never changed;
//! a lookup binary-searches each segment's mmap, newest first, without parsing anything. Writers
//! never append to a shared file and take no lock that a network file system could lose: each
//! merge of journals adds one segment, and [`compact`] folds many into one and deletes what it
//! folded. A record is a hint, never a verdict: a lookup trusts it only while the source's and the
//! entry's stamps (size, mtime, inode, ctime) both equal the recorded ones, so a segment that is
//! torn, stale or ordered wrongly against another costs a full check, never a wrong tensor.
//!
//! File layout (little endian):
//! `header (40 bytes) || fingerprint (padded to 8) || records (112 bytes each, sorted by key) ||
//! keys || inputs || pack names || trailer (16 bytes)`. Header: magic, record count, key bytes,
//! fingerprint length (`u32::MAX`: none), pack names' bytes (u32), input bytes. Record: key
//! offset (u64) and length (u32), flags (u32: removed, racy, inputs), the source's stamp and the
//! entry's (size, mtime_ns, ino, ctime_ns each), the offset (u64) and length (u32, 0: none) of
//! the entry's extra inputs (the JSON its header records), the number of the pack holding the
//! entry (u32, `u32::MAX`: its own file), the entry's offset and length in that pack (u64 each).
//! Pack names: the names the records number, each ending in a newline. Trailer: end magic and
//! the file's length, so a file cut short is refused whole. Segments of the earlier formats
//! (`fsindex2`: 96-byte records, no packs; `fsindex1`: 80-byte records, no inputs) are still
//! read; compaction rewrites them in this one.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::Mmap;

use crate::entry::write_atomic_with;
use crate::error::{Error, IoContext, Result};
use crate::key::Stamp;
use crate::manifest::IndexRecord;
use crate::pack::PackedAt;

const MAGIC: &[u8; 8] = b"fsindex3";
/// The second format: records without a pack location (96 bytes), no pack names.
const MAGIC_V2: &[u8; 8] = b"fsindex2";
/// The first format: records without inputs (80 bytes), no input area.
const MAGIC_V1: &[u8; 8] = b"fsindex1";
const END_MAGIC: &[u8; 8] = b"fsidxend";
const HEADER_LEN: usize = 40;
const RECORD_LEN: usize = 112;
const RECORD_LEN_V2: usize = 96;
const RECORD_LEN_V1: usize = 80;
const TRAILER_LEN: usize = 16;
const NO_FINGERPRINT: u32 = u32::MAX;
/// A record's pack number when the entry is in its own file.
const NOT_PACKED: u32 = u32::MAX;
const FLAG_REMOVED: u32 = 1;
const FLAG_RACY: u32 = 2;
/// The record holds its entry's extra inputs.
const FLAG_INPUTS: u32 = 4;
/// Segment files end in this; anything else in the directory (temporary files) is ignored.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// What a segment says about one key: its entry's record, or that it was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Entry(IndexRecord),
    Removed,
}

/// One segment file, mapped.
pub struct Segment {
    path: PathBuf,
    map: Mmap,
    fingerprint: Option<String>,
    count: usize,
    record_len: usize,
    records_at: usize,
    keys_at: usize,
    keys_len: usize,
    inputs_at: usize,
    inputs_len: usize,
    /// The names of the packs the records number (few: a pack holds gigabytes).
    packs: Vec<Arc<str>>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn stamp_at(b: &[u8], at: usize) -> Stamp {
    let mut s = Stamp::sized(u64_at(b, at), u64_at(b, at + 8) as i64);
    (s.ino, s.ctime_ns) = (u64_at(b, at + 16), u64_at(b, at + 24) as i64);
    s
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Segment {
    /// Maps a segment; `Ok(None)` when the file is gone (compacted since it was listed) or is not
    /// a whole segment (a torn or foreign file: its records are lost, nothing else is).
    pub fn open(path: &Path) -> Result<Option<Segment>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        if !file.metadata().at(path)?.is_file() {
            return Ok(None);
        }
        // SAFETY: segments are never modified after their rename (writers replace, never edit);
        // a file truncated under us by hand would fault, as any mmap reader would.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        Ok(Segment::parse(path, map))
    }

    fn parse(path: &Path, map: Mmap) -> Option<Segment> {
        let b: &[u8] = &map;
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return None;
        }
        let (record_len, inputs_len, names_len) = match &b[..8] {
            m if m == MAGIC => (
                RECORD_LEN,
                usize::try_from(u64_at(b, 32)).ok()?,
                u32_at(b, 28) as usize,
            ),
            m if m == MAGIC_V2 => (RECORD_LEN_V2, usize::try_from(u64_at(b, 32)).ok()?, 0),
            m if m == MAGIC_V1 => (RECORD_LEN_V1, 0, 0),
            _ => return None,
        };
        let count = usize::try_from(u64_at(b, 8)).ok()?;
        let keys_len = usize::try_from(u64_at(b, 16)).ok()?;
        let fp_len = u32_at(b, 24);
        let fp_bytes = if fp_len == NO_FINGERPRINT {
            0
        } else {
            fp_len as usize
        };
        let records_at = HEADER_LEN.checked_add(pad8(fp_bytes))?;
        let keys_at = records_at.checked_add(count.checked_mul(record_len)?)?;
        let inputs_at = keys_at.checked_add(keys_len)?;
        let names_at = inputs_at.checked_add(inputs_len)?;
        let total = names_at.checked_add(names_len)?.checked_add(TRAILER_LEN)?;
        let trailer = total - TRAILER_LEN;
        if total != b.len()
            || &b[trailer..trailer + 8] != END_MAGIC
            || u64_at(b, trailer + 8) != total as u64
        {
            return None;
        }
        let fingerprint = (fp_len != NO_FINGERPRINT)
            .then(|| String::from_utf8_lossy(&b[HEADER_LEN..HEADER_LEN + fp_bytes]).into_owned());
        let packs = std::str::from_utf8(&b[names_at..names_at + names_len])
            .ok()?
            .split_terminator('\n')
            .map(Arc::from)
            .collect();
        Some(Segment {
            path: path.to_path_buf(),
            map,
            fingerprint,
            count,
            record_len,
            records_at,
            keys_at,
            keys_len,
            inputs_at,
            inputs_len,
            packs,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The encoder fingerprint whose verdicts the segment holds (None: entries written without).
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn record(&self, i: usize) -> &[u8] {
        let at = self.records_at + i * self.record_len;
        &self.map[at..at + self.record_len]
    }

    /// The inputs of record `r` (None: none, a first-format record, or offsets pointing outside
    /// the input area, which is damage: the entry is then checked from its header).
    fn inputs(&self, r: &[u8]) -> Option<Arc<str>> {
        if self.record_len < RECORD_LEN_V2 {
            return None;
        }
        let (off, len) = (u64_at(r, 80) as usize, u32_at(r, 88) as usize);
        let end = off
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.inputs_len)?;
        let bytes = &self.map[self.inputs_at + off..self.inputs_at + end];
        std::str::from_utf8(bytes).ok().map(Arc::from)
    }

    /// The key of record `i`; empty when its offsets point outside the key area (damage: it
    /// then matches no lookup).
    pub fn key(&self, i: usize) -> &[u8] {
        let r = self.record(i);
        let (off, len) = (u64_at(r, 0) as usize, u32_at(r, 8) as usize);
        match off.checked_add(len) {
            Some(end) if end <= self.keys_len => &self.map[self.keys_at + off..self.keys_at + end],
            _ => &[],
        }
    }

    /// Where record `r`'s entry is when a pack holds it. A pack number the segment does not
    /// name, or a name that is not a pack's, is damage: the record then says the entry is in its
    /// own file, where a lookup finds it or not.
    fn packed(&self, r: &[u8]) -> Option<PackedAt> {
        if self.record_len < RECORD_LEN || u32_at(r, 92) == NOT_PACKED {
            return None;
        }
        let pack = self
            .packs
            .get(u32_at(r, 92) as usize)
            .filter(|n| crate::pack::is_pack_name(n))?;
        Some(PackedAt {
            pack: Arc::clone(pack),
            offset: u64_at(r, 96),
            len: u64_at(r, 104),
        })
    }

    pub fn slot(&self, i: usize) -> Slot {
        let r = self.record(i);
        let flags = u32_at(r, 12);
        if flags & FLAG_REMOVED != 0 {
            return Slot::Removed;
        }
        let inputs = self.inputs(r);
        // Flagged as having inputs but none readable: damage, so the header decides.
        let lost = flags & FLAG_INPUTS != 0 && inputs.is_none();
        Slot::Entry(IndexRecord {
            source: stamp_at(r, 16),
            entry: stamp_at(r, 48),
            racy: flags & FLAG_RACY != 0 || lost,
            inputs,
            packed: self.packed(r),
        })
    }

    /// What this segment says about `key` (binary search; None: nothing).
    pub fn get(&self, key: &[u8]) -> Option<Slot> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid).cmp(key) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Some(self.slot(mid)),
            }
        }
        None
    }
}

/// Serializes records (sorted here by key; a key given twice keeps its last slot).
/// The records in key order, the last of each key kept (later slots win), sorted in place: a
/// million records are not copied.
fn sorted_unique(mut records: Vec<(Vec<u8>, Slot)>) -> Vec<(Vec<u8>, Slot)> {
    records.sort_by(|a, b| a.0.cmp(&b.0));
    records.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    records
}

fn inputs_len_of(slot: &Slot) -> usize {
    match slot {
        Slot::Entry(IndexRecord {
            inputs: Some(i), ..
        }) => i.len(),
        _ => 0,
    }
}

/// Writes the segment of `kept` (sorted, unique) to `out`, in small pieces (give it a buffered
/// writer): the segment of a million records is never built whole in memory.
fn encode(
    fingerprint: Option<&str>,
    kept: &[(Vec<u8>, Slot)],
    out: &mut impl Write,
) -> std::io::Result<()> {
    let fp = fingerprint.map(str::as_bytes);
    let keys_len: usize = kept.iter().map(|(k, _)| k.len()).sum();
    let inputs_len: usize = kept.iter().map(|(_, s)| inputs_len_of(s)).sum();
    // The packs the records name, numbered in order of first use.
    let mut packs: Vec<&str> = Vec::new();
    let mut numbers: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (_, slot) in kept {
        if let Slot::Entry(IndexRecord {
            packed: Some(p), ..
        }) = slot
        {
            numbers.entry(&p.pack).or_insert_with(|| {
                packs.push(&p.pack);
                (packs.len() - 1) as u32
            });
        }
    }
    let names_len: usize = packs.iter().map(|n| n.len() + 1).sum();
    let total = HEADER_LEN
        + pad8(fp.map_or(0, <[u8]>::len))
        + kept.len() * RECORD_LEN
        + keys_len
        + inputs_len
        + names_len
        + TRAILER_LEN;
    let mut header = Vec::with_capacity(HEADER_LEN + pad8(fp.map_or(0, <[u8]>::len)));
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(kept.len() as u64).to_le_bytes());
    header.extend_from_slice(&(keys_len as u64).to_le_bytes());
    header.extend_from_slice(&fp.map_or(NO_FINGERPRINT, |f| f.len() as u32).to_le_bytes());
    header.extend_from_slice(&(names_len as u32).to_le_bytes());
    header.extend_from_slice(&(inputs_len as u64).to_le_bytes());
    if let Some(f) = fp {
        header.extend_from_slice(f);
        header.resize(HEADER_LEN + pad8(f.len()), 0);
    }
    out.write_all(&header)?;
    let (mut key_off, mut inputs_off) = (0u64, 0u64);
    let mut record = Vec::with_capacity(RECORD_LEN);
    for (key, slot) in kept {
        record.clear();
        record.extend_from_slice(&key_off.to_le_bytes());
        record.extend_from_slice(&(key.len() as u32).to_le_bytes());
        key_off += key.len() as u64;
        let (mut flags, source, entry, packed) = match slot {
            Slot::Removed => (FLAG_REMOVED, Stamp::sized(0, 0), Stamp::sized(0, 0), None),
            Slot::Entry(r) => (
                if r.racy { FLAG_RACY } else { 0 },
                r.source,
                r.entry,
                r.packed.as_ref(),
            ),
        };
        let inputs = inputs_len_of(slot);
        if inputs > 0 {
            flags |= FLAG_INPUTS;
        }
        record.extend_from_slice(&flags.to_le_bytes());
        for s in [source, entry] {
            record.extend_from_slice(&s.size.to_le_bytes());
            record.extend_from_slice(&s.mtime_ns.to_le_bytes());
            record.extend_from_slice(&s.ino.to_le_bytes());
            record.extend_from_slice(&s.ctime_ns.to_le_bytes());
        }
        record.extend_from_slice(&inputs_off.to_le_bytes());
        record.extend_from_slice(&(inputs as u32).to_le_bytes());
        let (number, offset, len) =
            packed.map_or((NOT_PACKED, 0, 0), |p| (numbers[&*p.pack], p.offset, p.len));
        record.extend_from_slice(&number.to_le_bytes());
        record.extend_from_slice(&offset.to_le_bytes());
        record.extend_from_slice(&len.to_le_bytes());
        debug_assert_eq!(record.len(), RECORD_LEN);
        out.write_all(&record)?;
        inputs_off += inputs as u64;
    }
    for (key, _) in kept {
        out.write_all(key)?;
    }
    for (_, slot) in kept {
        if let Slot::Entry(IndexRecord {
            inputs: Some(i), ..
        }) = slot
        {
            out.write_all(i.as_bytes())?;
        }
    }
    for name in packs {
        out.write_all(name.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.write_all(END_MAGIC)?;
    out.write_all(&(total as u64).to_le_bytes())
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Writes one segment of `records` into `dir` (created when absent) and returns its path. Its
/// name starts with the time it was written (hex nanoseconds), so names sort oldest first; the
/// process id and a random part keep concurrent writers' names apart.
pub fn write_segment(
    dir: &Path,
    fingerprint: Option<&str>,
    records: Vec<(Vec<u8>, Slot)>,
    durable: bool,
) -> Result<PathBuf> {
    write_segment_named(dir, now_ns(), fingerprint, records, durable)
}

fn write_segment_named(
    dir: &Path,
    seq: u64,
    fingerprint: Option<&str>,
    records: Vec<(Vec<u8>, Slot)>,
    durable: bool,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).at(dir)?;
    let name = format!(
        "{seq:016x}-{}-{:08x}{SEGMENT_SUFFIX}",
        std::process::id(),
        rand_u32()
    );
    let path = dir.join(name);
    let kept = sorted_unique(records);
    let bytes = kept.len() * RECORD_LEN;
    write_atomic_with(&path, bytes, durable, |file| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        encode(fingerprint, &kept, &mut out)?;
        out.flush()
    })?;
    Ok(path)
}

pub(crate) fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // A hash of the time and the address of a stack value: enough to keep two writers in one
    // nanosecond apart, which is all the random part is for.
    let seed = now_ns() ^ (&b as *const _ as u64);
    b.copy_from_slice(&blake3::hash(&seed.to_le_bytes()).as_bytes()[..4]);
    u32::from_le_bytes(b)
}

/// The segment files in `dir`, oldest first (empty when there is no directory).
pub fn segment_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    named_in(dir, |name| {
        name.ends_with(SEGMENT_SUFFIX) && !name.starts_with('.')
    })
}

/// The paths of the files in `dir` whose names `wanted` takes, sorted (names start with the hex
/// time they were written: oldest first); empty when there is no directory.
pub(crate) fn named_in(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.at(dir)?;
        if wanted(&e.file_name().to_string_lossy()) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// A feature's index as one process sees it: the segments of one fingerprint, newest first.
pub struct Index {
    segments: Vec<Segment>,
}

impl Index {
    /// Maps the segments of `dir` whose records were judged for `fingerprint`; the others are
    /// another encoder configuration's (never trusted). Segments compacted away between the
    /// listing and the open are skipped: the compacted one holds their records.
    pub fn open(dir: &Path, fingerprint: Option<&str>) -> Result<Index> {
        // A compaction finishing between the listing and the opens deletes segments this listing
        // names and renames in one it lacks: list again (a few times at most, then go on with
        // what opened, which costs full checks, never a wrong verdict).
        let mut segments = Vec::new();
        for _ in 0..3 {
            segments.clear();
            let mut vanished = false;
            for path in segment_paths(dir)?.iter().rev() {
                match Segment::open(path)? {
                    Some(s) if s.fingerprint() == fingerprint => segments.push(s),
                    Some(_) => {}
                    None => vanished |= !path.exists(),
                }
            }
            if !vanished {
                break;
            }
        }
        Ok(Index { segments })
    }

    /// An index with no segments.
    pub fn empty() -> Index {
        Index {
            segments: Vec::new(),
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The record of `key` in the newest segment that mentions it (None: absent or removed).
    pub fn get(&self, key: &[u8]) -> Option<IndexRecord> {
        for s in &self.segments {
            match s.get(key) {
                Some(Slot::Entry(r)) => return Some(r),
                Some(Slot::Removed) => return None,
                None => {}
            }
        }
        None
    }

    /// Every key with a record (the newest slot per key, removed keys left out), in key order.
    pub fn live(&self) -> Merged<'_> {
        Merged::new(&self.segments)
    }
}

/// A k-way merge of segments (newest first) by key, yielding each key's newest slot that is an
/// entry.
pub struct Merged<'a> {
    segments: &'a [Segment],
    heap: BinaryHeap<Head<'a>>,
}

struct Head<'a> {
    key: &'a [u8],
    /// Position in `segments`: lower is newer.
    segment: usize,
    at: usize,
}

// Ordered so that the max-heap pops the smallest key first, and among equal keys the newest.
impl Ord for Head<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .key
            .cmp(self.key)
            .then(other.segment.cmp(&self.segment))
    }
}
impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head<'_> {}

impl<'a> Merged<'a> {
    fn new(segments: &'a [Segment]) -> Merged<'a> {
        let mut heap = BinaryHeap::new();
        for (i, s) in segments.iter().enumerate() {
            if !s.is_empty() {
                heap.push(Head {
                    key: s.key(0),
                    segment: i,
                    at: 0,
                });
            }
        }
        Merged { segments, heap }
    }

    fn advance(&mut self, head: Head<'a>) {
        let s = &self.segments[head.segment];
        if head.at + 1 < s.len() {
            self.heap.push(Head {
                key: s.key(head.at + 1),
                segment: head.segment,
                at: head.at + 1,
            });
        }
    }

    /// The next key and its newest slot, removed ones included.
    pub fn next_slot(&mut self) -> Option<(&'a [u8], Slot)> {
        let head = self.heap.pop()?;
        let (key, slot) = (head.key, self.segments[head.segment].slot(head.at));
        self.advance(head);
        // Older segments' slots for the same key are superseded.
        while self.heap.peek().is_some_and(|h| h.key == key) {
            let older = self.heap.pop().expect("peeked");
            self.advance(older);
        }
        Some((key, slot))
    }
}

impl<'a> Iterator for Merged<'a> {
    type Item = (&'a [u8], IndexRecord);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_slot()? {
                (key, Slot::Entry(r)) => return Some((key, r)),
                (_, Slot::Removed) => continue,
            }
        }
    }
}

/// What [`compact`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compaction {
    /// Segments folded into the new one (or deleted as another fingerprint's).
    pub folded: usize,
    /// Records in the new segment.
    pub records: usize,
}

/// Folds every segment of `dir` judged for `fingerprint` into one (removed keys dropped) and
/// deletes the folded segments and those of any other fingerprint (their verdicts are for another
/// encoder configuration). The caller holds the feature's lock, so no other process compacts;
/// processes still writing segments are unaffected (theirs are not in the listing, or are folded
/// whole). The new segment is named after the newest one it folds, so a segment written during the
/// compaction still sorts after it.
pub fn compact(dir: &Path, fingerprint: Option<&str>, durable: bool) -> Result<Compaction> {
    let paths = segment_paths(dir)?;
    let mut ours = Vec::new();
    let mut others = Vec::new();
    for path in paths.iter().rev() {
        match Segment::open(path)? {
            Some(s) if s.fingerprint() == fingerprint => ours.push(s),
            // A torn segment's records are lost either way; another fingerprint's are useless.
            _ => others.push(path.clone()),
        }
    }
    let records: Vec<(Vec<u8>, Slot)> = Merged::new(&ours)
        .map(|(k, r)| (k.to_vec(), Slot::Entry(r)))
        .collect();
    let summary = Compaction {
        folded: ours.len() + others.len(),
        records: records.len(),
    };
    if ours.len() <= 1 && others.is_empty() && ours.first().is_none_or(|s| s.len() == records.len())
    {
        return Ok(Compaction {
            folded: 0,
            records: records.len(),
        });
    }
    let seq = ours
        .first()
        .and_then(|s| s.path.file_name())
        .and_then(|n| u64::from_str_radix(n.to_string_lossy().get(..16)?, 16).ok())
        .map_or_else(now_ns, |newest| newest + 1);
    if !records.is_empty() {
        write_segment_named(dir, seq, fingerprint, records, durable)?;
    }
    for path in ours.iter().map(|s| s.path.clone()).chain(others) {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(summary)
}

/// Writes `records` as the whole index (`FeatureStore.write_manifest`: the index becomes exactly
/// the valid entries of a status of every source) and deletes the segments that were there
/// before; returns the number of records written. The caller holds the feature's lock.
pub fn replace(
    dir: &Path,
    fingerprint: Option<&str>,
    records: Vec<(Vec<u8>, Slot)>,
    durable: bool,
) -> Result<usize> {
    let before = segment_paths(dir)?;
    let n = records.len();
    write_segment(dir, fingerprint, records, durable)?;
    for path in before {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(n)
}

/// Deletes the temporary files of segment writers killed mid-write (older than an hour: a live
/// writer renames its file within seconds).
pub fn remove_torn_writes(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < hour_ago);
        if name.starts_with('.') && name.ends_with(".tmp") && old {
            match std::fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io(e.path(), err)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(size: u64, ino: u64) -> Slot {
        let mut source = Stamp::sized(size, 10);
        source.ino = ino;
        Slot::Entry(IndexRecord {
            source,
            entry: Stamp::sized(size + 1, 11),
            racy: size % 2 == 0,
            inputs: (size % 3 == 0).then(|| format!("[{{\"n\":{size}}}]").into()),
            // Entries in two packs, and in files of their own.
            packed: (size % 4 != 0).then(|| PackedAt {
                pack: format!("{:016x}-1-0000000{}.fspack", size % 2, size % 2).into(),
                offset: 64 * size,
                len: 100 + size,
            }),
        })
    }

    fn write(dir: &Path, fp: Option<&str>, records: &[(&[u8], Slot)]) -> PathBuf {
        let records = records
            .iter()
            .map(|(k, s)| (k.to_vec(), s.clone()))
            .collect();
        write_segment(dir, fp, records, false).unwrap()
    }

    #[test]
    fn a_segment_round_trips_and_is_searched_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let odd: &[u8] = b"scene/\xff\xfe.png";
        write(
            dir.path(),
            Some("fp"),
            &[
                (b"b.png", rec(3, 7)),
                (b"a.png", rec(2, 5)),
                (odd, rec(1, 9)),
            ],
        );
        let index = Index::open(dir.path(), Some("fp")).unwrap();
        assert_eq!(Slot::Entry(index.get(b"a.png").unwrap()), rec(2, 5));
        assert_eq!(Slot::Entry(index.get(odd).unwrap()), rec(1, 9));
        assert_eq!(index.get(b"c.png"), None);
        let keys: Vec<&[u8]> = index.live().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![&b"a.png"[..], b"b.png", odd]);
    }

    #[test]
    fn a_first_format_segment_is_still_read_and_compaction_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        // What an earlier version wrote: "fsindex1", 80-byte records, no input area.
        let mut source = Stamp::sized(64, 10);
        (source.ino, source.ctime_ns) = (3, 4);
        let (key, fp) = (b"a.png", b"fp");
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC_V1);
        v1.extend_from_slice(&1u64.to_le_bytes());
        v1.extend_from_slice(&(key.len() as u64).to_le_bytes());
        v1.extend_from_slice(&(fp.len() as u32).to_le_bytes());
        v1.resize(HEADER_LEN, 0);
        v1.extend_from_slice(fp);
        v1.resize(HEADER_LEN + 8, 0);
        v1.extend_from_slice(&0u64.to_le_bytes());
        v1.extend_from_slice(&(key.len() as u32).to_le_bytes());
        v1.extend_from_slice(&FLAG_RACY.to_le_bytes());
        for s in [source, source] {
            for v in [s.size, s.mtime_ns as u64, s.ino, s.ctime_ns as u64] {
                v1.extend_from_slice(&v.to_le_bytes());
            }
        }
        v1.extend_from_slice(key);
        v1.extend_from_slice(END_MAGIC);
        let total = v1.len() as u64 + 8;
        v1.extend_from_slice(&total.to_le_bytes());
        std::fs::write(dir.path().join("0000000000000001-1-00000000.seg"), &v1).unwrap();
        let wanted = IndexRecord {
            source,
            entry: source,
            racy: true,
            inputs: None,
            packed: None,
        };
        let index = Index::open(dir.path(), Some("fp")).unwrap();
        assert_eq!(index.get(key), Some(wanted.clone()));
        write(dir.path(), Some("fp"), &[(b"b.png", rec(3, 1))]);
        compact(dir.path(), Some("fp"), false).unwrap();
        let index = Index::open(dir.path(), Some("fp")).unwrap();
        assert_eq!(index.segments().len(), 1);
        assert_eq!(index.get(key), Some(wanted));
        assert_eq!(Slot::Entry(index.get(b"b.png").unwrap()), rec(3, 1));
    }

    #[test]
    fn a_second_format_segment_is_still_read_with_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        // What the previous version wrote: "fsindex2", 96-byte records, an input area.
        let (key, inputs) = (b"a.png", br#"[{"n":1}]"#);
        let mut v2 = Vec::new();
        v2.extend_from_slice(MAGIC_V2);
        v2.extend_from_slice(&1u64.to_le_bytes());
        v2.extend_from_slice(&(key.len() as u64).to_le_bytes());
        v2.extend_from_slice(&NO_FINGERPRINT.to_le_bytes());
        v2.extend_from_slice(&0u32.to_le_bytes());
        v2.extend_from_slice(&(inputs.len() as u64).to_le_bytes());
        v2.extend_from_slice(&0u64.to_le_bytes());
        v2.extend_from_slice(&(key.len() as u32).to_le_bytes());
        v2.extend_from_slice(&FLAG_INPUTS.to_le_bytes());
        for v in [1u64, 2, 3, 4, 5, 6, 7, 8] {
            v2.extend_from_slice(&v.to_le_bytes());
        }
        v2.extend_from_slice(&0u64.to_le_bytes());
        v2.extend_from_slice(&(inputs.len() as u32).to_le_bytes());
        v2.extend_from_slice(&0u32.to_le_bytes());
        v2.extend_from_slice(key);
        v2.extend_from_slice(inputs);
        v2.extend_from_slice(END_MAGIC);
        let total = v2.len() as u64 + 8;
        v2.extend_from_slice(&total.to_le_bytes());
        std::fs::write(dir.path().join("0000000000000001-1-00000000.seg"), &v2).unwrap();
        let r = Index::open(dir.path(), None).unwrap().get(key).unwrap();
        assert_eq!(r.source.size, 1);
        assert_eq!(r.entry.ctime_ns, 8);
        assert_eq!(r.inputs.as_deref(), Some(r#"[{"n":1}]"#));
        assert_eq!(r.packed, None);
    }

    #[test]
    fn newer_segments_win_and_removals_hide_older_records() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), None, &[(b"a", rec(1, 1)), (b"b", rec(1, 2))]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(
            dir.path(),
            None,
            &[(b"a", rec(5, 1)), (b"b", Slot::Removed)],
        );
        let index = Index::open(dir.path(), None).unwrap();
        assert_eq!(Slot::Entry(index.get(b"a").unwrap()), rec(5, 1));
        assert_eq!(index.get(b"b"), None);
        assert_eq!(index.live().count(), 1);
    }

    #[test]
    fn another_fingerprints_segments_are_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Some("old"), &[(b"a", rec(1, 1))]);
        assert!(Index::open(dir.path(), Some("new"))
            .unwrap()
            .get(b"a")
            .is_none());
        assert!(Index::open(dir.path(), None).unwrap().get(b"a").is_none());
        // Compacting for the new fingerprint deletes them.
        compact(dir.path(), Some("new"), false).unwrap();
        assert!(segment_paths(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_torn_or_damaged_segment_loses_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), None, &[(b"kept", rec(1, 1))]);
        let torn = write(dir.path(), None, &[(b"lost", rec(2, 2))]);
        let bytes = std::fs::read(&torn).unwrap();
        // Cut short (a crash before the data reached the disk), then garbage, then zeros.
        for damaged in [
            bytes[..bytes.len() - 5].to_vec(),
            vec![0xAB; bytes.len()],
            vec![0; bytes.len()],
        ] {
            std::fs::write(&torn, &damaged).unwrap();
            let index = Index::open(dir.path(), None).unwrap();
            assert!(index.get(b"kept").is_some());
            assert!(index.get(b"lost").is_none());
        }
        // Key offsets pointing outside the file match nothing and panic nowhere.
        let mut bad = bytes.clone();
        bad[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&torn, &bad).unwrap();
        let index = Index::open(dir.path(), None).unwrap();
        assert!(index.get(b"lost").is_none());
        assert_eq!(index.live().filter(|(k, _)| k.is_empty()).count(), 1);
    }

    #[test]
    fn compaction_folds_segments_into_one_with_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            let key = format!("k{i}");
            write(
                dir.path(),
                None,
                &[(key.as_bytes(), rec(i, i)), (b"gone", rec(9, 9))],
            );
        }
        write(dir.path(), None, &[(b"gone", Slot::Removed)]);
        let done = compact(dir.path(), None, false).unwrap();
        assert_eq!(
            done,
            Compaction {
                folded: 6,
                records: 5
            }
        );
        let paths = segment_paths(dir.path()).unwrap();
        assert_eq!(paths.len(), 1);
        let index = Index::open(dir.path(), None).unwrap();
        assert_eq!(Slot::Entry(index.get(b"k3").unwrap()), rec(3, 3));
        assert!(index.get(b"gone").is_none());
        // Nothing to do the second time.
        assert_eq!(compact(dir.path(), None, false).unwrap().folded, 0);
    }

    #[test]
    fn writers_running_during_a_compaction_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..40u64 {
                        let key = format!("w{w}-{i:03}");
                        write(&d, None, &[(key.as_bytes(), rec(i, w))]);
                    }
                })
            })
            .collect();
        for _ in 0..10 {
            compact(&d, None, false).unwrap();
            // Readers meanwhile see every key written before they opened.
            let _ = Index::open(&d, None).unwrap().live().count();
        }
        for w in writers {
            w.join().unwrap();
        }
        let index = Index::open(&d, None).unwrap();
        assert_eq!(index.live().count(), 80);
        compact(&d, None, false).unwrap();
        assert_eq!(Index::open(&d, None).unwrap().live().count(), 80);
    }
}
