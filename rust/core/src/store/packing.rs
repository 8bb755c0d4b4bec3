//! Moving valid entries into packs, and dropping packed entries from the index
//! (docs/design.md, "Packs").
//!
//! The order is what makes a crash harmless: each pack is written and synced, then an index
//! segment that locates its entries is written and synced, and only then is each entry's own
//! file removed, and only while it is still the very file that was copied. Killed before the
//! segment, a run leaves a pack nothing refers to (`featstore gc` removes it once it is older than
//! a pack run takes to index it) and every entry still in its own file; killed after it, the own
//! files left over are found first (an entry's own file is always preferred to a pack) and hold
//! the same bytes. Each pack is indexed as soon as it is sealed, so that window is seconds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{State, Store};
use crate::entry::{self, ReadMode};
use crate::error::{Error, Result};
use crate::index::{self, Slot};
use crate::key::{path_bytes, Stamp};
use crate::manifest::IndexRecord;
use crate::pack::{PackWriter, PackedAt, Sealed};

/// What [`Store::pack_entries`] did (counts, not a record per entry: a run may move millions).
#[derive(Debug, Default)]
pub struct PackRun {
    pub packs: Vec<Sealed>,
    /// Entries now in the packs written.
    pub moved: usize,
    /// Sources whose own entry file was not removed although its copy was packed: another file
    /// took its name since (a newer entry, which lookups prefer to the packed copy).
    pub kept_files: Vec<PathBuf>,
    /// Entries already in a pack.
    pub already_packed: usize,
    /// Sources without a valid entry (nothing to pack), by state.
    pub not_valid: std::collections::BTreeMap<&'static str, usize>,
    /// Sources whose valid entry was not packed, with why (changed while being copied, a data
    /// checksum that does not match).
    pub skipped: Vec<(PathBuf, String)>,
}

/// An entry copied into the pack being written, waiting for the pack to be sealed.
struct Copied {
    rel: PathBuf,
    file: PathBuf,
    identity: Stamp,
    record: IndexRecord,
    offset: u64,
    len: u64,
}

impl Store {
    /// Moves the valid entries of `rels` that are in files of their own into new packs of about
    /// `target_size` bytes each (a pack is sealed once it reaches it); once a pack is sealed, an
    /// index segment locating its entries is written, then each own file that is still the file
    /// copied is removed. Only
    /// valid entries whose data checksum matches are packed; `progress` counts sources looked
    /// at. The caller holds the feature's lock (no `gc` runs meanwhile).
    pub fn pack_entries(
        &self,
        rels: &[PathBuf],
        target_size: u64,
        durable: bool,
        progress: &AtomicU64,
    ) -> Result<PackRun> {
        let mut run = PackRun::default();
        let mut writer: Option<PackWriter> = None;
        let mut copied: Vec<Copied> = Vec::new();
        for rel in rels {
            progress.fetch_add(1, Ordering::Relaxed);
            let c = self.check(rel)?;
            if c.state != State::Valid {
                *run.not_valid.entry(c.state.name()).or_default() += 1;
                continue;
            }
            if c.packed.is_some() {
                run.already_packed += 1;
                continue;
            }
            let (Some(identity), Some(record)) = (c.identity, self.index_record(rel)) else {
                run.skipped
                    .push((rel.clone(), "not judged valid by its stamps".into()));
                continue;
            };
            let (opened, id) = match entry::open_entry_in(&c.entry, None, ReadMode::Pread, None) {
                Ok(o) => o,
                Err(e) => {
                    run.skipped.push((rel.clone(), e.to_string()));
                    continue;
                }
            };
            if id.stamp != identity {
                run.skipped.push((
                    rel.clone(),
                    "its entry was replaced while being packed".into(),
                ));
                continue;
            }
            if let Err(e) = opened.verify_checksum(&c.entry) {
                run.skipped.push((rel.clone(), e.to_string()));
                continue;
            }
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(PackWriter::create(&self.packs_dir())?),
            };
            let (offset, len) = w.append(path_bytes(rel), opened.bytes.as_slice())?;
            copied.push(Copied {
                rel: rel.clone(),
                file: c.entry,
                identity,
                record,
                offset,
                len,
            });
            if w.len() >= target_size {
                let full = writer.take().expect("a writer");
                self.seal_pack(full, &mut copied, &mut run, durable)?;
            }
        }
        if let Some(last) = writer.take() {
            self.seal_pack(last, &mut copied, &mut run, durable)?;
        }
        // A segment per pack: fold them (the caller holds the lock compaction needs), so that
        // lookups search a few segments, not one per pack.
        if run.packs.len() > 1 {
            index::compact(&self.index_dir(), self.fingerprint(), durable)?;
            self.reload_index_if_changed()?;
        }
        Ok(run)
    }

    /// Seals a pack, indexes its entries, then removes their own files.
    fn seal_pack(
        &self,
        writer: PackWriter,
        copied: &mut Vec<Copied>,
        run: &mut PackRun,
        durable: bool,
    ) -> Result<()> {
        let sealed = writer.seal(durable)?;
        let name: std::sync::Arc<str> = std::sync::Arc::from(sealed.name.as_str());
        let records = copied
            .iter_mut()
            .map(|c| {
                let record = IndexRecord {
                    entry: sealed.stamp,
                    packed: Some(PackedAt {
                        pack: std::sync::Arc::clone(&name),
                        offset: c.offset,
                        len: c.len,
                    }),
                    inputs: c.record.inputs.take(),
                    ..c.record
                };
                (path_bytes(&c.rel).to_vec(), Slot::Entry(record))
            })
            .collect();
        run.packs.push(sealed);
        index::write_segment(&self.index_dir(), self.fingerprint(), records, durable)?;
        // The index now locates these entries: their own files may go.
        for c in copied.drain(..) {
            if !crate::judged::remove_judged(&c.file, c.identity)? {
                run.kept_files.push(c.rel.clone());
            }
            self.forget(&c.rel);
            run.moved += 1;
        }
        Ok(())
    }

    /// Drops packed entries from the index (`gc` of a stale or orphan packed entry, `remove`):
    /// one segment that says each of `entries` is removed, for those the index still locates at
    /// that very place (a source whose entry moved since keeps its record). The pack keeps the
    /// bytes until a compaction rewrites it. Returns, per entry, whether it was dropped.
    pub fn drop_packed(&self, entries: &[(PathBuf, PackedAt)]) -> Result<Vec<bool>> {
        self.reload_index_if_changed()?;
        let index = self.index();
        let dropped: Vec<bool> = entries
            .iter()
            .map(|(rel, at)| {
                index
                    .get(path_bytes(rel))
                    .is_some_and(|r| r.packed.as_ref() == Some(at))
            })
            .collect();
        let records: Vec<(Vec<u8>, Slot)> = entries
            .iter()
            .zip(&dropped)
            .filter(|(_, &d)| d)
            .map(|((rel, _), _)| (path_bytes(rel).to_vec(), Slot::Removed))
            .collect();
        if !records.is_empty() {
            index::write_segment(&self.index_dir(), self.fingerprint(), records, true)?;
            self.reload_index_if_changed()?;
        }
        for (rel, _) in entries {
            self.forget(rel);
        }
        Ok(dropped)
    }

    /// The packs of this feature, oldest first.
    pub fn pack_paths(&self) -> Result<Vec<PathBuf>> {
        crate::pack::pack_paths(&self.packs_dir())
    }

    /// Every pack of the feature with the entries the index (mapped again if it changed) still
    /// places in it: what `gc` needs to find dead bytes.
    pub fn pack_usage(&self) -> Result<Vec<PackUsage>> {
        self.reload_index_if_changed()?;
        let index = self.index();
        let mut live: std::collections::HashMap<std::sync::Arc<str>, Vec<LiveEntry>> =
            Default::default();
        for (key, r) in index.live() {
            if let Some(at) = r.packed {
                live.entry(at.pack).or_default().push(LiveEntry {
                    key: key.to_vec(),
                    offset: at.offset,
                    len: at.len,
                });
            }
        }
        let mut out = Vec::new();
        for path in self.pack_paths()? {
            let Some(stamp) = super::stat_opt(&path)? else {
                continue;
            };
            let table_entries = crate::pack::read_table(&path).ok().map(|t| t.len());
            let name = pack_name(&path).unwrap_or_default();
            out.push(PackUsage {
                live: live.remove(name).unwrap_or_default(),
                path,
                stamp,
                table_entries,
            });
        }
        Ok(out)
    }

    /// Rewrites the pack of `usage` with only its live entries (those whose data checksum still
    /// matches) into new packs, records their new places in one index segment (for the entries
    /// the index still places in the old pack), then removes the old pack if it is still the
    /// file `usage` judged. Returns the new packs and how many entries moved.
    pub fn repack(&self, usage: &PackUsage, durable: bool) -> Result<(Vec<Sealed>, usize)> {
        let index = self.index();
        let old = pack_name(&usage.path).unwrap_or_default();
        let mut writer: Option<PackWriter> = None;
        let mut moved: Vec<(Vec<u8>, IndexRecord, u64, u64)> = Vec::new();
        let mut dropped: Vec<(Vec<u8>, Slot)> = Vec::new();
        for e in &usage.live {
            let Some(record) = index.get(&e.key).filter(|r| {
                r.packed
                    .as_ref()
                    .is_some_and(|at| &*at.pack == old && at.offset == e.offset)
            }) else {
                continue;
            };
            let span = entry::Span {
                offset: e.offset,
                len: e.len,
            };
            let opened = entry::open_entry_in(&usage.path, Some(span), ReadMode::Pread, None)
                .and_then(|(o, _)| o.verify_checksum(&usage.path).map(|()| o));
            let opened = match opened {
                Ok(o) => o,
                // Damaged in the pack: nothing to keep; its source misses and is computed again.
                Err(Error::Corrupt { .. }) => {
                    dropped.push((e.key.clone(), Slot::Removed));
                    continue;
                }
                // Any other failure (a read error, no memory) says nothing about the entry: the
                // rewrite stops, and the old pack stays as it is.
                Err(other) => return Err(other),
            };
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(PackWriter::create(&self.packs_dir())?),
            };
            let (offset, len) = w.append(&e.key, opened.bytes.as_slice())?;
            moved.push((e.key.clone(), record, offset, len));
        }
        let mut packs = Vec::new();
        let mut records = dropped;
        if let Some(w) = writer {
            let sealed = w.seal(durable)?;
            let name: std::sync::Arc<str> = std::sync::Arc::from(sealed.name.as_str());
            for (key, record, offset, len) in moved.drain(..) {
                let at = PackedAt {
                    pack: std::sync::Arc::clone(&name),
                    offset,
                    len,
                };
                records.push((
                    key,
                    Slot::Entry(IndexRecord {
                        entry: sealed.stamp,
                        packed: Some(at),
                        ..record
                    }),
                ));
            }
            packs.push(sealed);
        }
        let n = records.len();
        if !records.is_empty() {
            index::write_segment(&self.index_dir(), self.fingerprint(), records, durable)?;
        }
        crate::judged::remove_judged(&usage.path, usage.stamp)?;
        self.reload_index_if_changed()?;
        Ok((packs, n))
    }
}

/// An entry the index places in a pack.
#[derive(Debug, Clone)]
pub struct LiveEntry {
    pub key: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

/// One pack and the entries the index still places in it.
#[derive(Debug, Clone)]
pub struct PackUsage {
    pub path: PathBuf,
    pub stamp: Stamp,
    pub live: Vec<LiveEntry>,
    /// How many entries its table lists (None: the table cannot be read: not a whole pack).
    pub table_entries: Option<usize>,
}

/// The name of a pack's file, as index records name it.
pub fn pack_name(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()
        .filter(|n| crate::pack::is_pack_name(n))
}

#[cfg(test)]
#[path = "packing_tests.rs"]
mod tests;
