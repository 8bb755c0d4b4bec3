//! Reading valid entries: the zero-copy open (fast path on a known header, slow path after a full
//! check) and batch reads straight into a caller's buffer.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::validity::Depth;
use super::{racy_now, span_of, stat_entry, stat_opt, Check, EntryFile, Known, State, Store};
use crate::entry;
use crate::error::{Error, Result};
use crate::key::Stamp;
use crate::pool;

impl Store {
    /// Reads tensor `name` of each source's valid entry straight into consecutive slots of
    /// `out` with `pread`, in parallel (featstore's pool): one copy, no mapping, no page-fault
    /// storm. Every slot is `out.len() / rels.len()` bytes and must match the tensor's `dtype`
    /// and `shape`. Returns, per source, `Ok` or why its slot was not filled (its state and
    /// reason, a missing tensor, another dtype or shape); the caller decides what a miss means.
    pub fn read_batch(
        &self,
        rels: &[PathBuf],
        name: &str,
        dtype: entry::Dtype,
        shape: &[u64],
        out: &mut [u8],
        threads: Option<usize>,
    ) -> Vec<std::result::Result<(), String>> {
        if rels.is_empty() {
            return Vec::new();
        }
        let slot = out.len() / rels.len();
        if slot == 0 {
            // Empty tensors: nothing to copy, but each entry is still checked.
            return rels
                .iter()
                .map(|r| self.read_into(r, name, dtype, shape, &mut []))
                .collect();
        }
        pool::pool(threads).install(|| {
            out.par_chunks_mut(slot.max(1))
                .zip(rels.par_iter())
                .map(|(dst, rel)| self.read_into(rel, name, dtype, shape, &mut dst[..slot]))
                .collect()
        })
    }

    /// Takes a header parsed now (not one validated before) for the entry `c` judged valid: checks
    /// its fingerprint and the path it was written for (the stamps may have come from a manifest
    /// index) and remembers it, so later reads skip the parse. Only for the very file the check
    /// judged (not one renamed over it in between), so the fast path never serves an unchecked
    /// file. False: the header says no (foreign, or another path's entry), now settled so.
    fn adopt_header(
        &self,
        rel: &Path,
        c: &Check,
        id: entry::FileId,
        header: &Arc<entry::Header>,
    ) -> Result<bool> {
        if let Some((state, reason)) = self.judge_header(rel, &header.metadata) {
            let source = stat_opt(&self.cfg.root.join(rel))?.unwrap_or(Stamp::sized(0, 0));
            self.settle(
                rel,
                source,
                (&self.file_of(c), c.packed.as_ref()),
                Some(id.stamp),
                Default::default(),
                state,
                reason,
            )?;
            return Ok(false);
        }
        let file = self.file_of(c);
        let judged = |k: &Known| k.path == file && k.packed == c.packed && k.entry == id.stamp;
        {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = known.get_mut(rel) {
                if judged(k) {
                    k.header = Some((id, Arc::clone(header)));
                }
                return Ok(true);
            }
        }
        // Judged from the index alone: remembered now, with the header a read needs again, and
        // the inputs the record holds as stamps (the check just found them holding), so that
        // later reads stat them rather than parse the record again. Checked outside the lock:
        // an input's line may need its listing read.
        if let Some(mut k) = self.learn_from_index(rel).filter(|k| judged(k)) {
            let held = match &k.recorded_inputs {
                Some(raw) => self.check_recorded_inputs(raw, Depth::Stamps)?.ok(),
                None => Some(Vec::new()),
            };
            if let Some(stamps) = held {
                k.racy = stamps.iter().any(|(_, s)| s.is_some_and(racy_now));
                k.inputs = stamps;
                k.header = Some((id, Arc::clone(header)));
                self.known
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(rel.to_path_buf())
                    .or_insert(k);
            }
        }
        Ok(true)
    }

    fn read_into(
        &self,
        rel: &Path,
        name: &str,
        dtype: entry::Dtype,
        shape: &[u64],
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        use std::os::unix::fs::FileExt;

        let mut c = self.check(rel).map_err(|e| e.to_string())?;
        if c.state != State::Valid {
            return Err(format!("{}: {}", c.state.name(), c.reason));
        }
        let mut path = self.file_of(&c);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            // Gone between the check and the open: moved into a pack (`featstore pack` removes
            // the file once the index places it there), or a pack gc rewrote: what this process
            // knew is out of date, so check again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.forget(rel);
                c = self.check(rel).map_err(|e| e.to_string())?;
                if c.state != State::Valid {
                    return Err(format!("{}: {}", c.state.name(), c.reason));
                }
                path = self.file_of(&c);
                fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let id = entry::FileId::of(&meta);
        let span = c
            .packed
            .as_ref()
            .map_or(entry::Span::whole(meta.len()), span_of);
        let known = self
            .recall(rel)
            .filter(|k| k.path == path && k.packed == c.packed)
            .and_then(|k| k.header);
        let header = match known {
            Some((known_id, h)) if known_id == id => h,
            _ => {
                let h = Arc::new(
                    entry::read_header_at(&file, &path, span, meta.len())
                        .map_err(|e| e.to_string())?,
                );
                if !self
                    .adopt_header(rel, &c, id, &h)
                    .map_err(|e| e.to_string())?
                {
                    let c = self.check(rel).map_err(|e| e.to_string())?;
                    return Err(format!("{}: {}", c.state.name(), c.reason));
                }
                h
            }
        };
        let t = header
            .tensor(name)
            .ok_or_else(|| format!("no tensor {name:?} in {}", c.entry.display()))?;
        if t.dtype != dtype || t.shape != shape || (t.end - t.start) as usize != dst.len() {
            return Err(format!(
                "tensor {name:?} of {} is {} {:?}, the batch holds {} {:?}",
                c.entry.display(),
                t.dtype.name(),
                t.shape,
                dtype.name(),
                shape
            ));
        }
        file.read_exact_at(dst, span.offset + header.data_start + t.start)
            .map_err(|e| format!("{}: {e}", c.entry.display()))
    }

    /// The file a check's entry is in: its own, or the pack holding it.
    pub fn file_of(&self, c: &Check) -> PathBuf {
        match &c.packed {
            Some(at) => self.pack_path(&at.pack),
            None => c.entry.clone(),
        }
    }

    /// Opens the valid entry of `rel` for reading, or None when it is not valid: the fast path
    /// ([`Store::open_known`]), else a full [`Store::check`] first ([`Store::open_checked`]).
    pub fn open_valid(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        match self.open_known(rel)? {
            Some(e) => Ok(Some(e)),
            None => self.open_checked(rel),
        }
    }

    /// The fast path of [`Store::open_valid`], for an entry this process already validated: stat
    /// the source, open the entry and take its stamp from the open descriptor (no separate stat),
    /// map it, and reuse the header validated on the first read while the file is the same. None
    /// when anything differs: then [`Store::open_checked`] decides.
    pub fn open_known(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        if let Some(k) = self
            .recall(rel)
            .filter(|k| k.hot() && k.state == State::Valid)
        {
            if let (Some(src_stamp), Some((id, header))) =
                (stat_opt(&self.cfg.root.join(rel))?, &k.header)
            {
                // A packed entry holds while no entry file of its own has appeared (a later put
                // writes one, and it is the newer).
                let located = match &k.packed {
                    None => k.path == self.entry_path(rel, src_stamp),
                    Some(_) => matches!(
                        stat_entry(&self.entry_path(rel, src_stamp))?,
                        EntryFile::Absent
                    ),
                };
                let unchanged = src_stamp == k.source && located && self.inputs_hold(&k)?;
                if unchanged {
                    match entry::open_entry_in(
                        &k.path,
                        k.packed.as_ref().map(span_of),
                        self.cfg.read_mode,
                        Some((*id, Arc::clone(header))),
                    ) {
                        Ok((e, opened)) if opened == *id => return Ok(Some(e)),
                        // The entry file changed since we validated it: take the slow path.
                        Ok(_) | Err(_) => {}
                    }
                }
            }
        }
        Ok(None)
    }

    /// The slow path of [`Store::open_valid`]: a full check (header parse, digests when racy),
    /// then the open.
    pub fn open_checked(&self, rel: &Path) -> Result<Option<entry::Entry>> {
        match self.open_checked_once(rel)? {
            // Gone between the check and the open (moved into a pack, or a pack gc rewrote):
            // what this process knew is out of date, so check again, once.
            Opened::Gone => {
                self.forget(rel);
                match self.open_checked_once(rel)? {
                    Opened::Entry(e) => Ok(Some(e)),
                    Opened::Miss | Opened::Gone => Ok(None),
                }
            }
            Opened::Entry(e) => Ok(Some(e)),
            Opened::Miss => Ok(None),
        }
    }

    fn open_checked_once(&self, rel: &Path) -> Result<Opened> {
        let c = self.check(rel)?;
        if c.state != State::Valid {
            return Ok(Opened::Miss);
        }
        let path = self.file_of(&c);
        let known_header = self
            .recall(rel)
            .filter(|k| k.path == path && k.packed == c.packed)
            .and_then(|k| k.header);
        let reused = known_header.as_ref().map(|(id, _)| *id);
        let span = c.packed.as_ref().map(span_of);
        match entry::open_entry_in(&path, span, self.cfg.read_mode, known_header) {
            Ok((e, id)) => {
                if reused != Some(id) && !self.adopt_header(rel, &c, id, &e.header)? {
                    return Ok(Opened::Miss);
                }
                Ok(Opened::Entry(e))
            }
            Err(e) if e.is_io_kind(ErrorKind::NotFound) => Ok(Opened::Gone),
            Err(Error::Corrupt { .. }) => {
                self.forget(rel);
                Ok(Opened::Miss)
            }
            Err(e) => Err(e),
        }
    }
}

/// What one checked open found.
enum Opened {
    Entry(entry::Entry),
    Miss,
    /// The file the check placed the entry in (its own, or a pack) was gone at the open.
    Gone,
}
