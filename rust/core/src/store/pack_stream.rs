//! Precompute writing entries straight into packs (`--layout packed`): one stream per process,
//! never two writers on one pack (docs/design.md, "Packs").
//!
//! Entries are appended to the stream's pack as they are written; a pack is sealed once it holds
//! the target size or has been open for the longest a run may lose, and only then is it indexed
//! (one segment locating its entries, written after the pack is synced). A process killed
//! mid-pack leaves a temporary file and no entry: its sources are missing and the next run
//! computes them. Nothing else is ever in the pack, so a reader never sees it before it is whole.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::write::{stamped_digest, Prepared, PutRequest};
use super::Store;
use crate::entry;
use crate::error::Result;
use crate::index::{self, Slot};
use crate::key::{path_bytes, Stamp};
use crate::manifest::IndexRecord;
use crate::pack::{PackWriter, PackedAt};

/// One process's stream of packs.
pub struct PackStream {
    target_size: u64,
    max_open: Duration,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    writer: Option<(PackWriter, Instant)>,
    pending: Vec<Pending>,
}

/// An entry appended to the open pack, indexed when it is sealed.
struct Pending {
    rel: PathBuf,
    source: Stamp,
    /// The source's digest the entry was computed from.
    digest: String,
    check_first: bool,
    inputs: Option<std::sync::Arc<str>>,
    offset: u64,
    len: u64,
}

/// What a packed write appended: the entry's length in bytes.
pub type Appended = u64;

impl PackStream {
    /// A stream that seals a pack once it holds `target_size` bytes or has been open for
    /// `max_open` (what a killed run may lose).
    pub fn new(target_size: u64, max_open: Duration) -> PackStream {
        PackStream {
            target_size: target_size.max(1),
            max_open,
            state: Mutex::new(StreamState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// Writes a batch of entries into `stream`'s open pack: each prepared as [`Store::put`]
    /// prepares it (the source and every input stamped, digested and refused if changed since
    /// the encoder read it), in parallel; appended one at a time. One result per request.
    pub fn put_many_packed(
        &self,
        stream: &PackStream,
        requests: &[PutRequest<'_>],
        threads: Option<usize>,
    ) -> Vec<Result<Appended>> {
        crate::pool::pool(threads).install(|| {
            requests
                .par_iter()
                .map(|r| self.put_packed(stream, r))
                .collect()
        })
    }

    fn put_packed(&self, stream: &PackStream, r: &PutRequest<'_>) -> Result<Appended> {
        let src = self.cfg.root.join(&r.rel);
        let (before, digest) = stamped_digest(&src, "source", r.expected)?;
        let Prepared {
            racy,
            inputs_racy,
            extra_inputs,
            meta,
            ..
        } = self.prepare_entry(&r.rel, before, digest.clone(), &r.meta, &r.inputs)?;
        let (header, data) = entry::encode_entry(&r.tensors, &meta)?;
        let mut chunks: Vec<&[u8]> = vec![&header];
        chunks.extend(data);
        let mut state = stream.lock();
        if state.writer.is_none() {
            state.writer = Some((PackWriter::create(&self.packs_dir())?, Instant::now()));
        }
        let (writer, _) = state.writer.as_mut().expect("a writer");
        let (offset, len) = writer.append_chunks(path_bytes(&r.rel), &chunks)?;
        state.pending.push(Pending {
            rel: r.rel.clone(),
            source: before,
            digest,
            check_first: racy || inputs_racy,
            inputs: extra_inputs,
            offset,
            len,
        });
        Ok(len)
    }

    /// Seals the stream's open pack when it is due (full, or open too long), or whatever it
    /// holds with `force` (the end of a run), then writes the segment that indexes its entries.
    /// Returns their sources and records (for the journal), empty when nothing was sealed.
    pub fn seal_pack_stream(
        &self,
        stream: &PackStream,
        force: bool,
        durable: bool,
    ) -> Result<Vec<(PathBuf, IndexRecord)>> {
        let mut state = stream.lock();
        let due = match &state.writer {
            Some((w, opened)) => {
                force || w.len() >= stream.target_size || opened.elapsed() >= stream.max_open
            }
            None => false,
        };
        if !due {
            return Ok(Vec::new());
        }
        let (writer, _) = state.writer.take().expect("a writer");
        let pending = std::mem::take(&mut state.pending);
        if writer.is_empty() {
            return Ok(Vec::new());
        }
        let sealed = writer.seal(durable)?;
        let name: std::sync::Arc<str> = std::sync::Arc::from(sealed.name.as_str());
        let retire: Vec<(PathBuf, Stamp, String)> = pending
            .iter()
            .map(|p| (p.rel.clone(), p.source, p.digest.clone()))
            .collect();
        let records: Vec<(PathBuf, IndexRecord)> = pending
            .into_iter()
            .map(|p| {
                let record = IndexRecord {
                    source: p.source,
                    entry: sealed.stamp,
                    racy: p.check_first,
                    inputs: p.inputs,
                    packed: Some(PackedAt {
                        pack: std::sync::Arc::clone(&name),
                        offset: p.offset,
                        len: p.len,
                    }),
                };
                (p.rel, record)
            })
            .collect();
        let slots = records
            .iter()
            .map(|(rel, r)| (path_bytes(rel).to_vec(), Slot::Entry(r.clone())))
            .collect();
        index::write_segment(&self.index_dir(), self.fingerprint(), slots, durable)?;
        for (rel, source, digest) in retire {
            self.retire_own_file(&rel, source, &digest)?;
        }
        Ok(records)
    }

    /// Removes the entry file of `rel`'s own that a packed entry just written replaces: one
    /// computed from other source bytes or by another encoder configuration (it would otherwise
    /// be preferred, and judged stale or foreign on every lookup). Only the file judged now is
    /// removed; a valid one of the same source bytes stays (either may be served).
    fn retire_own_file(&self, rel: &std::path::Path, source: Stamp, digest: &str) -> Result<()> {
        let path = self.entry_path(rel, source);
        let (header, stamp) = match entry::read_header_stamped(&path) {
            Ok(h) => h,
            Err(e) if e.is_io_kind(std::io::ErrorKind::NotFound) => return Ok(()),
            // Not an entry featstore can read: left for `verify` and `gc` to judge.
            Err(_) => return Ok(()),
        };
        let meta = &header.metadata;
        let same_bytes = meta.get("source.blake3").map(String::as_str) == Some(digest);
        let same_encoder = meta.get("fingerprint").map(String::as_str).unwrap_or("")
            == self.fingerprint().unwrap_or("");
        if !(same_bytes && same_encoder) {
            crate::judged::remove_judged(&path, stamp)?;
        }
        Ok(())
    }
}
