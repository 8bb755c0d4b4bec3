//! Whether an entry may be served: the hot path on stamps, the full evaluation of a header
//! (fingerprint, the path it was written for, source stamp and digest, extra inputs), and
//! remembering each verdict together with the identity of the file it was reached for.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;

use super::{
    name_too_long, packed_entry_name, racy_now, recorded_stamp, span_of, stat_entry, stat_opt,
    stat_source, Check, EntryFile, Known, Layout, SourceFile, State, Store,
};
use crate::entry;
use crate::error::{Error, Result};
use crate::key::{file_digest, Stamp};
use crate::pack::PackedAt;
use crate::pool;

/// True when an entry written for `recorded` (relative to the root it was written under) is the
/// entry of `here` (relative to this store's root): the same path, or the same file seen from a
/// parent or a child root (per-GPU split roots share sidecar entries). A renamed or renumbered
/// file differs in its last components, never only in a leading directory.
fn same_source(recorded: &str, here: &str) -> bool {
    let under = |long: &str, short: &str| {
        long.len() > short.len()
            && long.ends_with(short)
            && long.as_bytes()[long.len() - short.len() - 1] == b'/'
    };
    recorded == here || under(recorded, here) || under(here, recorded)
}

/// Extra inputs as remembered for the hot path: path and stamp (None: must stay absent).
type InputStamps = Vec<(PathBuf, Option<Stamp>)>;

/// The extra inputs' stamps when every one holds, else why one does not.
type Inputs = std::result::Result<InputStamps, String>;

/// The extra inputs a verdict rests on: their stamps as checked, and the entry's own record of
/// them (for the index, so that other processes check them without opening the entry).
#[derive(Default)]
pub(super) struct CheckedInputs {
    pub(super) stamps: InputStamps,
    pub(super) recorded: Option<Arc<str>>,
}

/// The header's `inputs` array without the source's item (None: no extra inputs).
fn extra_inputs(meta: &BTreeMap<String, String>) -> Option<Arc<str>> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(meta.get("inputs")?) else {
        return None;
    };
    let extra: Vec<Value> = items
        .into_iter()
        .filter(|i| i.get("name").and_then(Value::as_str) != Some("source"))
        .collect();
    (!extra.is_empty()).then(|| Value::Array(extra).to_string().into())
}

/// How hard a check looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Stamps decide; a changed stamp falls to the digest (lookups, `status`, `gc`).
    Stamps,
    /// Every source and file input is digested whatever its stamp, and nothing remembered is
    /// trusted (`verify`, which reads every entry in full anyway).
    Digests,
}

/// Why the line an input recorded (`line`: the listed path and the fields) no longer gives the
/// recorded value in the listing at `path` (stamp `now`), or None when it still does.
fn line_changed(
    path: &Path,
    now: Stamp,
    line: &Value,
    item: &Value,
    name: &str,
) -> Result<Option<String>> {
    let text = |k: &str| line.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(image_field), Some(field), Some(listed)) =
        (text("image_field"), text("field"), text("listed"))
    else {
        return Ok(Some(format!("input {name}: its line record is malformed")));
    };
    let fields = crate::jsonl::Fields { image_field, field };
    let table = match crate::jsonl::table(path, now, &fields) {
        Ok(t) => t,
        // Edited again while being read: judged by the next lookup.
        Err(Error::SourceChanged { .. }) => {
            return Ok(Some(format!(
                "input {name} ({}) is being edited",
                path.display()
            )))
        }
        Err(Error::NotRegular { kind, .. }) => {
            return Ok(Some(format!(
                "input {name} ({}) is not a regular file ({kind}): featstore never reads it",
                path.display()
            )))
        }
        Err(e) => return Err(e),
    };
    let recorded = item.get("blake3").and_then(Value::as_str);
    Ok(match table.digest_of(&listed) {
        Some(digest) if Some(digest) == recorded => None,
        Some(_) => Some(format!(
            "input {name}: the line of {listed:?} in {} changed",
            path.display()
        )),
        None => Some(format!(
            "input {name}: no line of {} lists {listed:?} any more",
            path.display()
        )),
    })
}

impl Store {
    /// The state of `rel`'s entry. Errors only for I/O failures other than "not found" (a
    /// permission error on the source, say); every problem with the entry itself is a state.
    pub fn check(&self, rel: &Path) -> Result<Check> {
        self.check_at(rel, Depth::Stamps)
    }

    /// [`Store::check`] at the given depth.
    pub fn check_at(&self, rel: &Path, depth: Depth) -> Result<Check> {
        self.check_found(rel, stat_source(&self.cfg.root.join(rel))?, depth)
    }

    /// [`Store::check`] of a source a scan just found, a regular file with stamp `stamp`: the
    /// scan's `stat` stands for the check's (`status` stats each source once, as `find` does).
    /// Were the source changed since, the verdict is the one its state at the scan deserved,
    /// and an entry whose stamp moved is judged by its digest as always.
    pub fn check_scanned(&self, rel: &Path, stamp: Stamp, depth: Depth) -> Result<Check> {
        self.check_found(rel, SourceFile::Regular(stamp), depth)
    }

    fn check_found(&self, rel: &Path, source: SourceFile, depth: Depth) -> Result<Check> {
        let src_stamp = match source {
            SourceFile::Absent => return self.check_without_source(rel),
            SourceFile::Special(kind) => return self.check_special_source(rel, kind),
            SourceFile::Regular(stamp) => stamp,
        };
        let entry = self.entry_path(rel, src_stamp);
        let entry_stamp = match stat_entry(&entry)? {
            EntryFile::Regular(stamp) => stamp,
            EntryFile::Absent => return self.check_without_entry(rel, src_stamp, entry, depth),
            EntryFile::NameTooLong => {
                let why = name_too_long(&entry);
                return Ok(Check::about(State::Missing, entry, why));
            }
            EntryFile::Special(kind) => {
                let why = format!(
                    "not a regular file ({kind}): featstore never writes one there; remove it and recompute"
                );
                return Ok(Check::about(State::Corrupt, entry, why));
            }
        };
        if depth == Depth::Stamps {
            if let Some(k) = self.recall(rel) {
                if k.path == entry && self.vouches(&k, src_stamp, entry_stamp, depth)? {
                    return Ok(Check {
                        state: k.state,
                        entry,
                        reason: k.reason,
                        identity: Some(k.entry),
                        packed: None,
                    });
                }
            }
        }
        self.evaluate(rel, src_stamp, &entry, None, &entry, depth)
    }

    /// What this process knows of `rel` when it is about a packed entry.
    fn recall_packed(&self, rel: &Path) -> Option<(Known, PackedAt)> {
        let k = self.recall(rel)?;
        let at = k.packed.clone()?;
        Some((k, at))
    }

    /// The packed entry of `rel` (when the index locates one) as a file a verdict can be about:
    /// its pack's stamp, or None when the pack is not there.
    fn stat_packed(&self, rel: &Path) -> Result<Option<(PathBuf, Stamp, PackedAt)>> {
        let Some((k, at)) = self.recall_packed(rel) else {
            return Ok(None);
        };
        match stat_entry(&k.path)? {
            EntryFile::Regular(stamp) => Ok(Some((k.path, stamp, at))),
            _ => Ok(None),
        }
    }

    /// The check of a source whose own entry file is absent and whose entry a pack holds (the
    /// index says where): the hot path while the source's, the pack's and the inputs' stamps are
    /// the ones judged, else the entry's header is read from the pack and judged in full.
    fn check_packed(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        k: Known,
        at: PackedAt,
        wanted: &Path,
        depth: Depth,
    ) -> Result<Check> {
        let pack_stamp = match stat_entry(&k.path)? {
            EntryFile::Regular(stamp) => stamp,
            _ => {
                let why = format!(
                    "the index places the entry in the pack {}, which no longer exists (removed \
                     by gc or by hand after this process opened the store): open the store again, \
                     or recompute it",
                    k.path.display()
                );
                return Ok(Check::about(State::Missing, wanted.to_path_buf(), why));
            }
        };
        if self.vouches(&k, src_stamp, pack_stamp, depth)? {
            return Ok(Check {
                state: k.state,
                entry: packed_entry_name(&k.path, &at),
                reason: k.reason,
                identity: Some(pack_stamp),
                packed: Some(at),
            });
        }
        self.evaluate(rel, src_stamp, &k.path, Some(&at), wanted, depth)
    }

    /// Whether the remembered verdict `k` stands for a source and an entry file with these stamps
    /// now, unread (the hot path): only at [`Depth::Stamps`], for a verdict its stamps alone
    /// vouch for, with every stamp the one judged and the extra inputs still holding.
    fn vouches(&self, k: &Known, source: Stamp, entry: Stamp, depth: Depth) -> Result<bool> {
        Ok(depth == Depth::Stamps
            && k.hot()
            && k.source == source
            && k.entry == entry
            && self.inputs_hold(k)?)
    }

    /// Whether the extra inputs of a verdict still hold: their stamps, once this process checked
    /// them; else (a record taken from the index) the inputs the record holds, checked as the
    /// header's would be (an input whose stamp moved is read: its digest, or its line).
    pub(super) fn inputs_hold(&self, k: &Known) -> Result<bool> {
        match (&k.recorded_inputs, k.inputs.is_empty()) {
            (Some(raw), true) => Ok(self.check_recorded_inputs(raw, Depth::Stamps)?.is_ok()),
            _ => self.inputs_unchanged(&k.inputs),
        }
    }

    pub(super) fn inputs_unchanged(&self, inputs: &[(PathBuf, Option<Stamp>)]) -> Result<bool> {
        for (path, stamp) in inputs {
            if stat_opt(path)? != *stamp {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A source that is a FIFO, socket, device or directory: never opened (a FIFO would block a
    /// lookup forever, `/dev/zero` would never end a digest). Its entry, if any, belongs to the
    /// file that was there: stale; otherwise missing.
    fn check_special_source(&self, rel: &Path, kind: &str) -> Result<Check> {
        let why = format!(
            "the source {} is not a regular file ({kind}): featstore never reads it; put the image file back",
            self.cfg.root.join(rel).display()
        );
        let entry = self.own_entry_file(rel);
        if let Some(entry) = &entry {
            if let EntryFile::Regular(stamp) = stat_entry(entry)? {
                return Ok(Check {
                    identity: Some(stamp),
                    ..Check::about(State::Stale, entry.clone(), why)
                });
            }
        }
        if let Some((pack, stamp, at)) = self.stat_packed(rel)? {
            return Ok(Check {
                identity: Some(stamp),
                ..Check::packed_about(State::Stale, &pack, at, why)
            });
        }
        Ok(Check::about(State::Missing, entry.unwrap_or_default(), why))
    }

    /// The entry file of `rel` when its source cannot say where it is (gone, or not a regular
    /// file): the sidecar, or in the dir layout the file this process or the index knows (never
    /// a pack: [`Store::stat_packed`] finds those).
    fn own_entry_file(&self, rel: &Path) -> Option<PathBuf> {
        match (&self.cfg.layout, self.recall(rel)) {
            (Layout::Sidecar, _) => Some(self.entry_path(rel, Stamp::sized(0, 0))),
            (Layout::Dir { .. }, Some(k)) if k.packed.is_none() => Some(k.path),
            (Layout::Dir { .. }, _) => None,
        }
    }

    fn check_without_source(&self, rel: &Path) -> Result<Check> {
        let gone = || {
            format!(
                "the source {} no longer exists",
                self.cfg.root.join(rel).display()
            )
        };
        let own = self.own_entry_file(rel);
        let own_stamp = match &own {
            Some(entry) => stat_entry(entry)?,
            None => EntryFile::Absent,
        };
        if !matches!(own_stamp, EntryFile::Regular(_)) {
            if let Some((pack, stamp, at)) = self.stat_packed(rel)? {
                return Ok(Check {
                    identity: Some(stamp),
                    ..Check::packed_about(State::Orphan, &pack, at, gone())
                });
            }
        }
        let Some(entry) = own else {
            return Ok(Check::about(
                State::Missing,
                PathBuf::new(),
                "neither the source nor an entry exists",
            ));
        };
        match own_stamp {
            EntryFile::Regular(stamp) => Ok(Check {
                state: State::Orphan,
                reason: gone(),
                entry,
                identity: Some(stamp),
                packed: None,
            }),
            _ => Ok(Check::about(
                State::Missing,
                entry,
                "neither the source nor an entry exists",
            )),
        }
    }

    fn check_without_entry(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        entry: PathBuf,
        depth: Depth,
    ) -> Result<Check> {
        let c = self.look_elsewhere(rel, src_stamp, entry.clone(), depth)?;
        // Another process may have moved the entry since this process learned where it was:
        // `featstore pack` removes the files it packed once a new segment says where they are,
        // and gc removes a pack once a segment places its entries elsewhere. Look again in the
        // index as it is now (mapped again if its directory changed), when it places the entry
        // somewhere else than where this process looked.
        // (A packed entry judged stale, foreign or corrupt may have been computed again into
        // another pack since.)
        if c.state == State::Missing || (c.packed.is_some() && c.state != State::Valid) {
            let reloaded = self.reload_index_if_changed()?;
            if reloaded || self.index_moved(rel) {
                self.forget(rel);
                return self.look_elsewhere(rel, src_stamp, entry, depth);
            }
        }
        Ok(c)
    }

    /// Whether the index places `rel`'s entry somewhere else than what this process remembers.
    fn index_moved(&self, rel: &Path) -> bool {
        let remembered = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(rel)
            .map(|k| k.packed.clone());
        match remembered {
            Some(packed) => self
                .learn_from_index(rel)
                .is_some_and(|i| i.packed != packed),
            None => false,
        }
    }

    /// Where an entry may be when the file its source's stamp names is absent: a pack, an older
    /// key (dir layout), a legacy file.
    fn look_elsewhere(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        entry: PathBuf,
        depth: Depth,
    ) -> Result<Check> {
        // A pack holds it (the index says where; an entry file of its own, found first, is newer).
        if let Some((k, at)) = self.recall_packed(rel) {
            return self.check_packed(rel, src_stamp, k, at, &entry, depth);
        }
        // Dir layout: the key follows the stamp, so a touched source looks for its entry under a
        // new name. The old one (known from the manifest or an earlier look) may still be valid.
        if let (Layout::Dir { .. }, Some(k)) = (&self.cfg.layout, self.recall(rel)) {
            if k.path != entry {
                if let EntryFile::Regular(es) = stat_entry(&k.path)? {
                    // Judged before with these very stamps (a stale entry): no second digest.
                    if self.vouches(&k, src_stamp, es, depth)? {
                        return Ok(Check {
                            state: k.state,
                            entry: k.path,
                            reason: k.reason,
                            identity: Some(es),
                            packed: None,
                        });
                    }
                    return self.evaluate(rel, src_stamp, &k.path, None, &entry, depth);
                }
            }
        }
        if let Some(legacy) = self.legacy_path(rel) {
            if let EntryFile::Regular(ls) = stat_entry(&legacy)? {
                let (state, why) = if ls.mtime_ns >= src_stamp.mtime_ns {
                    (State::Legacy, "old-format cache (torch pickle); readable, `featstore migrate` converts it")
                } else {
                    (State::Stale, "old-format cache is older than its image: the image was edited after caching")
                };
                return Ok(Check {
                    identity: Some(ls),
                    ..Check::about(state, legacy, why)
                });
            }
        }
        Ok(Check::about(State::Missing, entry, "no entry"))
    }

    /// Full evaluation of the entry found at `found` (opens its header), or at `packed` in the
    /// pack `found`; `wanted` is where its own file belongs for the source's current stamp
    /// (differs from `found` only in the dir layout, or for a packed entry).
    fn evaluate(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        found: &Path,
        packed: Option<&PackedAt>,
        wanted: &Path,
        depth: Depth,
    ) -> Result<Check> {
        let src = self.cfg.root.join(rel);
        let read = match packed {
            None => entry::read_header_stamped(found),
            Some(at) => entry::read_header_in(found, span_of(at)),
        };
        let (header, identity) = match read {
            Ok(h) => h,
            Err(Error::Corrupt { reason, .. }) => {
                let identity = match stat_entry(found)? {
                    EntryFile::Regular(stamp) => Some(stamp),
                    _ => None,
                };
                return self.settle(
                    rel,
                    src_stamp,
                    (found, packed),
                    identity,
                    CheckedInputs::default(),
                    State::Corrupt,
                    reason,
                );
            }
            Err(e) if e.is_io_kind(ErrorKind::NotFound) => {
                let at = if packed.is_some() { wanted } else { found };
                return Ok(Check::about(
                    State::Missing,
                    at.to_path_buf(),
                    "entry vanished while being checked",
                ));
            }
            Err(e) => return Err(e),
        };
        let verdict = |state: State, reason: String| {
            self.settle(
                rel,
                src_stamp,
                (found, packed),
                Some(identity),
                CheckedInputs::default(),
                state,
                reason,
            )
        };
        let meta = &header.metadata;
        if let Some((state, reason)) = self.judge_header(rel, meta) {
            return verdict(state, reason);
        }
        let Some(recorded) = recorded_stamp(meta, "source") else {
            return verdict(
                State::Corrupt,
                "no source stamp in the entry's metadata".into(),
            );
        };
        let mut refreshed = false;
        let mut reason = String::new();
        let racy = meta.get("racy").is_some_and(|r| r == "1");
        if recorded != src_stamp || racy || depth == Depth::Digests {
            // Compare bytes, not stamps: a copy, a touch or a restore keeps the bytes.
            let digest = match file_digest(&src) {
                Ok(digest) => digest,
                // Swapped for a FIFO or a device since the stat: judged as one, never read.
                Err(Error::NotRegular { kind, .. }) => return self.check_special_source(rel, kind),
                Err(e) => return Err(e),
            };
            if meta.get("source.blake3") != Some(&digest) {
                let reason = if recorded.same_key_fields(&src_stamp) {
                    "the source's bytes changed but its size and mtime did not (an edit within the timestamp granularity, a restored mtime, or another file renamed onto this name)".to_string()
                } else {
                    format!(
                        "the source changed: size {} -> {}, mtime_ns {} -> {}",
                        recorded.size, src_stamp.size, recorded.mtime_ns, src_stamp.mtime_ns
                    )
                };
                return verdict(State::Stale, reason);
            }
            refreshed = recorded != src_stamp || (racy && !racy_now(src_stamp));
            if recorded != src_stamp {
                reason = "source touched, copied or moved but unchanged: stamp refreshed".into();
            }
        }
        let inputs = match self.check_inputs(meta, depth)? {
            Ok(stamps) => CheckedInputs {
                stamps,
                recorded: extra_inputs(meta),
            },
            Err(why) => return verdict(State::Stale, why),
        };
        // A packed entry is never rewritten: the source's new stamp is remembered here and, by
        // a precompute or `featstore pack`, in the index; other processes digest it once each.
        if packed.is_none() && (refreshed || found != wanted) {
            if let Some(at) = self.refresh(found, wanted, identity, src_stamp) {
                // The file just written is the one judged valid (same data, our header).
                let written = match stat_entry(&at)? {
                    EntryFile::Regular(stamp) => Some(stamp),
                    _ => None,
                };
                return self.settle(
                    rel,
                    src_stamp,
                    (&at, None),
                    written,
                    inputs,
                    State::Valid,
                    reason,
                );
            }
        }
        self.settle(
            rel,
            src_stamp,
            (found, packed),
            Some(identity),
            inputs,
            State::Valid,
            reason,
        )
    }

    /// What a header alone says against serving it for `rel`: another encoder's entry
    /// (foreign), or one written for another path (stale: a renamed or renumbered file, or a
    /// sidecar moved with it, never gets another file's entry). None: nothing against it.
    pub(super) fn judge_header(
        &self,
        rel: &Path,
        meta: &BTreeMap<String, String>,
    ) -> Option<(State, String)> {
        let actual = meta.get("fingerprint").map(String::as_str).unwrap_or("");
        if let Some(reason) = self.foreign_reason(actual) {
            return Some((State::Foreign, reason));
        }
        let here = rel.to_string_lossy();
        let written_for = meta.get("source").filter(|s| !same_source(s, &here))?;
        Some((
            State::Stale,
            format!("the entry was written for {written_for}, not {here} (a renamed or renumbered source never gets another file's entry)"),
        ))
    }

    /// Records the source's new stamp in the entry (and clears the racy mark once past the
    /// window) so other processes skip the digest; in the dir layout the entry is written under
    /// its new key. The file judged (`identity`) is only ever read, never removed: another data
    /// root sharing the cache (a copy of the dataset) may still use it. Best effort: a read-only
    /// cache still serves the entry. Returns where the refreshed entry is.
    fn refresh(&self, found: &Path, wanted: &Path, identity: Stamp, src: Stamp) -> Option<PathBuf> {
        // Never into a directory outside the data root (a symlinked one): serve, do not refresh.
        self.check_inside_root(wanted).ok()?;
        let still_racy = racy_now(src);
        let update = |m: &mut BTreeMap<String, String>| {
            m.insert("source.size".into(), src.size.to_string());
            m.insert("source.mtime_ns".into(), src.mtime_ns.to_string());
            m.insert("source.ino".into(), src.ino.to_string());
            m.insert("source.ctime_ns".into(), src.ctime_ns.to_string());
            m.insert("racy".into(), if still_racy { "1" } else { "0" }.into());
        };
        if found != wanted {
            fs::create_dir_all(wanted.parent()?).ok()?;
        }
        match entry::rewrite_metadata_to(found, wanted, identity, update, false) {
            Ok(true) => Some(wanted.to_path_buf()),
            _ => None,
        }
    }

    /// Checks an entry's extra inputs; `Ok(Err(why))` when one changed.
    fn check_inputs(&self, meta: &BTreeMap<String, String>, depth: Depth) -> Result<Inputs> {
        let Some(raw) = meta.get("inputs") else {
            return Ok(Ok(Vec::new()));
        };
        self.check_recorded_inputs(raw, depth)
    }

    /// Checks the inputs an entry recorded (`raw`: its header's `inputs` array, or the index's
    /// copy of it without the source's item); `Ok(Err(why))` when one changed.
    pub(super) fn check_recorded_inputs(&self, raw: &str, depth: Depth) -> Result<Inputs> {
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(raw) else {
            return Ok(Err("the entry's inputs metadata is malformed".into()));
        };
        let mut out = Vec::new();
        for item in items {
            let (Some(name), Some(path)) = (
                item.get("name").and_then(Value::as_str),
                item.get("path").and_then(Value::as_str),
            ) else {
                continue;
            };
            if name == "source" {
                continue;
            }
            let abs = self.cfg.root.join(path);
            let now = match stat_source(&abs)? {
                SourceFile::Absent => None,
                SourceFile::Regular(stamp) => Some(stamp),
                SourceFile::Special(kind) => {
                    return Ok(Err(format!(
                    "input {name} ({}) is not a regular file ({kind}): featstore never reads it",
                    abs.display()
                )))
                }
            };
            // Stamped within the timestamp granularity of its last change when the entry was
            // written: a same-size edit may have kept the stamp, so it is read every time.
            let racy = item.get("racy").and_then(Value::as_bool) == Some(true);
            let read_it = racy || depth == Depth::Digests;
            if item.get("absent").and_then(Value::as_bool) == Some(true) {
                if now.is_some() {
                    return Ok(Err(format!(
                        "input {name}: {} now exists and its rule prefers it to the file the entry was computed from",
                        abs.display()
                    )));
                }
                out.push((abs, None));
                continue;
            }
            let Some(now) = now else {
                return Ok(Err(format!(
                    "input {name} ({}) no longer exists",
                    abs.display()
                )));
            };
            let field = |k: &str| item.get(k).and_then(Value::as_i64);
            let recorded = Stamp {
                size: item.get("size").and_then(Value::as_u64).unwrap_or(u64::MAX),
                mtime_ns: field("mtime_ns").unwrap_or(i64::MIN),
                ino: item.get("ino").and_then(Value::as_u64).unwrap_or(0),
                ctime_ns: field("ctime_ns").unwrap_or(0),
            };
            if let Some(line) = item.get("line") {
                // One line of a listing: the rest of the file may change freely.
                if now != recorded || read_it {
                    if let Some(why) = line_changed(&abs, now, line, &item, name)? {
                        return Ok(Err(why));
                    }
                }
                out.push((abs, Some(now)));
                continue;
            }
            if now != recorded || read_it {
                let digest = match file_digest(&abs) {
                    Ok(digest) => digest,
                    Err(Error::NotRegular { kind, .. }) => {
                        return Ok(Err(format!(
                            "input {name} ({}) is not a regular file ({kind}): featstore never reads it",
                            abs.display()
                        )))
                    }
                    Err(e) => return Err(e),
                };
                if item.get("blake3").and_then(Value::as_str) != Some(digest.as_str()) {
                    return Ok(Err(format!("input {name} ({}) changed", abs.display())));
                }
            }
            out.push((abs, Some(now)));
        }
        Ok(Ok(out))
    }

    /// Remembers a verdict, keyed by the stamps it was reached with and the identity of the
    /// entry file it is about, and returns it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &self,
        rel: &Path,
        src_stamp: Stamp,
        (entry, packed): (&Path, Option<&PackedAt>),
        identity: Option<Stamp>,
        inputs: CheckedInputs,
        state: State,
        reason: String,
    ) -> Result<Check> {
        if let Some(entry_stamp) = identity {
            // An input changed within the timestamp granularity of now may change again
            // without its stamp moving: then its stamp alone vouches for nothing yet.
            let racy_input = inputs.stamps.iter().any(|(_, s)| s.is_some_and(racy_now));
            self.remember(
                rel,
                Known {
                    source: src_stamp,
                    path: entry.to_path_buf(),
                    packed: packed.cloned(),
                    entry: entry_stamp,
                    inputs: inputs.stamps,
                    state,
                    reason: reason.clone(),
                    trusted: true,
                    racy: racy_now(src_stamp) || racy_input,
                    indexed: false,
                    recorded_inputs: inputs.recorded,
                    header: None,
                },
            );
        }
        Ok(Check {
            state,
            entry: match packed {
                Some(at) => packed_entry_name(entry, at),
                None => entry.to_path_buf(),
            },
            reason,
            identity,
            packed: packed.cloned(),
        })
    }

    /// Checks many sources in parallel (in featstore's pool), keeping what `keep` takes of each
    /// check (the whole check, or only its state: a million states, not a million entry paths
    /// and reasons); results in input order. `progress` counts checked sources, for a display on
    /// another thread. `stamps` (aligned with `rels`): each source's stamp as a scan just took
    /// it ([`Store::check_scanned`]).
    pub fn check_many<T: Send>(
        &self,
        rels: &[PathBuf],
        stamps: Option<&[Stamp]>,
        depth: Depth,
        threads: Option<usize>,
        progress: &AtomicU64,
        keep: impl Fn(Result<Check>) -> T + Sync,
    ) -> Vec<T> {
        pool::pool(threads).install(|| {
            rels.par_iter()
                .enumerate()
                .map(|(i, r)| {
                    progress.fetch_add(1, Ordering::Relaxed);
                    keep(match stamps.and_then(|s| s.get(i)) {
                        Some(&stamp) => self.check_scanned(r, stamp, depth),
                        None => self.check_at(r, depth),
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    //! The validity rules, one per test, on real files in a temporary directory. Sources get an
    //! mtime in the past so that entries are not racy (a racy entry is re-digested on every use,
    //! which would hide whether the stamp rules alone hold).

    use std::collections::BTreeMap;
    use std::fs::{self, File};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    use super::Depth;
    use crate::entry::{self, Dtype, ReadMode, TensorData};
    use crate::error::Error;
    use crate::key::Stamp;
    use crate::store::{Input, Layout, State, Store, StoreConfig};

    const DATA: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn store(root: &Path, layout: Layout, fingerprint: &str) -> Store {
        Store::open(StoreConfig {
            root: root.to_path_buf(),
            feature: "f".into(),
            layout,
            fingerprint: Some(fingerprint.into()),
            legacy_suffix: None,
            read_mode: ReadMode::Map,
        })
        .unwrap()
    }

    /// Writes `bytes` to `path` with an mtime `age_s` seconds in the past.
    fn write_aged(path: &Path, bytes: &[u8], age_s: u64) {
        fs::write(path, bytes).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_s);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    fn tensor() -> Vec<TensorData<'static>> {
        vec![TensorData {
            name: "features".into(),
            dtype: Dtype::U8,
            shape: vec![8],
            data: &DATA,
        }]
    }

    fn put(s: &Store, rel: &str) -> PathBuf {
        let meta = Default::default();
        s.put(Path::new(rel), &tensor(), &meta, &[], false, None)
            .unwrap()
            .path
    }

    fn state(s: &Store, rel: &str) -> State {
        s.check(Path::new(rel)).unwrap().state
    }

    #[test]
    fn written_entry_is_valid_and_stays_valid_on_the_hot_path() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        assert_eq!(state(&s, "a.png"), State::Missing);
        put(&s, "a.png");
        assert_eq!(state(&s, "a.png"), State::Valid);
        // A fresh store (another process) judges it from the header alone.
        assert_eq!(
            state(&store(dir.path(), Layout::Sidecar, "fp"), "a.png"),
            State::Valid
        );
    }

    #[test]
    fn edited_source_makes_the_entry_stale() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"edited image", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("the source changed"), "{}", c.reason);
    }

    #[test]
    fn same_size_edit_with_a_new_mtime_is_stale_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"IMAGE", 60);
        assert_eq!(state(&s, "a.png"), State::Stale);
    }

    #[test]
    fn touched_source_with_the_same_bytes_stays_valid_and_is_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        write_aged(&src, b"image", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Valid);
        assert!(c.reason.contains("refreshed"), "{}", c.reason);
        // The refreshed stamp is in the header: another process needs no digest and agrees.
        assert_eq!(
            state(&store(dir.path(), Layout::Sidecar, "fp"), "a.png"),
            State::Valid
        );
    }

    #[test]
    fn touched_source_in_the_dir_layout_moves_its_entry_to_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let (root, cache) = (dir.path().join("data"), dir.path().join("cache"));
        fs::create_dir_all(&root).unwrap();
        let src = root.join("a.png");
        write_aged(&src, b"image", 3600);
        let layout = Layout::Dir { cache_dir: cache };
        let s = store(&root, layout.clone(), "fp");
        let old = put(&s, "a.png");
        write_aged(&src, b"image", 60);
        let fresh = store(&root, layout, "fp");
        let c = fresh.check(Path::new("a.png")).unwrap();
        // A fresh store does not know the old key: the touched source's entry is missing there
        // until the store that wrote it (which remembers the old key) moves it.
        assert_eq!(c.state, State::Missing);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Valid);
        assert_ne!(c.entry, old);
        // The entry under the old key stays: a copy of the dataset sharing the cache may use it.
        assert!(c.entry.exists() && old.exists());
        assert_eq!(state(&fresh, "a.png"), State::Valid);
    }

    #[test]
    fn a_source_replaced_by_a_fifo_is_stale_at_once_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        write_aged(&dir.path().join("b.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        fs::remove_file(&src).unwrap();
        let c = std::ffi::CString::new(src.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // A digest of the FIFO would block here forever (no writer ever comes).
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("not a regular file"), "{}", c.reason);
        assert_eq!(state(&s, "b.png"), State::Missing);
        let fresh = store(dir.path(), Layout::Sidecar, "fp");
        assert_eq!(state(&fresh, "a.png"), State::Stale);
        // Writing its entry reads it: refused at once as well.
        assert!(matches!(
            s.put(
                Path::new("a.png"),
                &tensor(),
                &Default::default(),
                &[],
                false,
                None
            ),
            Err(Error::NotRegular { .. })
        ));
    }

    #[test]
    fn without_a_fingerprint_or_a_manifest_only_unfingerprinted_entries_are_served() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        write_aged(&dir.path().join("b.png"), b"other", 3600);
        put(&store(dir.path(), Layout::Sidecar, "fpA"), "a.png");
        let open = |fp: Option<&str>| {
            Store::open(StoreConfig {
                root: dir.path().to_path_buf(),
                feature: "f".into(),
                layout: Layout::Sidecar,
                fingerprint: fp.map(str::to_string),
                legacy_suffix: None,
                read_mode: ReadMode::Map,
            })
            .unwrap()
        };
        let plain = open(None);
        put(&plain, "b.png");
        // Whatever is read first decides nothing: the encoder's entry is foreign, the plain one served.
        assert_eq!(state(&plain, "a.png"), State::Foreign);
        assert_eq!(state(&plain, "b.png"), State::Valid);
        assert_eq!(state(&open(Some("fpA")), "a.png"), State::Valid);
    }

    #[test]
    fn a_copy_sharing_the_cache_never_destroys_the_original_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        write_aged(&a.join("x.png"), b"image", 3600);
        let layout = Layout::Dir { cache_dir: cache };
        let original = store(&a, layout.clone(), "fp");
        put(&original, "x.png");
        // `cp -r` (new mtime) and `cp -a` (same mtime, new inode and ctime).
        fs::create_dir_all(&b).unwrap();
        write_aged(&b.join("x.png"), b"image", 60);
        let copy = store(&b, layout.clone(), "fp");
        // The copy's store learns the original's key from the same rel path only through a
        // manifest; here it simply misses, and writing it leaves the original alone.
        put(&copy, "x.png");
        assert_eq!(state(&copy, "x.png"), State::Valid);
        assert_eq!(state(&store(&a, layout, "fp"), "x.png"), State::Valid);
        assert_eq!(state(&original, "x.png"), State::Valid);
    }

    #[test]
    fn a_file_renamed_onto_an_old_name_with_equal_size_and_mtime_is_stale() {
        // Renumbered frames: 001 -> 000 after 000 was deleted; whole-second mtimes, equal sizes.
        for layout in [
            Layout::Sidecar,
            Layout::Dir {
                cache_dir: PathBuf::from("cache"),
            },
        ] {
            let dir = tempfile::tempdir().unwrap();
            let layout = match layout {
                Layout::Dir { .. } => Layout::Dir {
                    cache_dir: dir.path().join("cache"),
                },
                l => l,
            };
            let root = dir.path().join("data");
            fs::create_dir_all(&root).unwrap();
            let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
            for (name, bytes) in [("000.bmp", b"frame-0"), ("001.bmp", b"frame-1")] {
                fs::write(root.join(name), bytes).unwrap();
                File::options()
                    .write(true)
                    .open(root.join(name))
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
            }
            let s = store(&root, layout.clone(), "fp");
            put(&s, "000.bmp");
            put(&s, "001.bmp");
            fs::remove_file(root.join("000.bmp")).unwrap();
            fs::rename(root.join("001.bmp"), root.join("000.bmp")).unwrap();
            for st in [&s, &store(&root, layout.clone(), "fp")] {
                let c = st.check(Path::new("000.bmp")).unwrap();
                assert_eq!(c.state, State::Stale, "{layout:?}: {}", c.reason);
            }
        }
    }

    #[test]
    fn a_sidecar_moved_with_its_source_is_not_served_under_the_new_name() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let entry = put(&s, "a.png");
        fs::rename(dir.path().join("a.png"), dir.path().join("b.png")).unwrap();
        fs::rename(&entry, dir.path().join("b.png.f.safetensors")).unwrap();
        let c = store(dir.path(), Layout::Sidecar, "fp")
            .check(Path::new("b.png"))
            .unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("written for a.png"), "{}", c.reason);
    }

    #[test]
    fn a_fifo_where_the_entry_belongs_is_a_corrupt_miss_found_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let fifo = dir.path().join("a.png.f.safetensors");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Corrupt);
        assert!(c.reason.contains("FIFO"), "{}", c.reason);
        assert!(s.open_valid(Path::new("a.png")).unwrap().is_none());
        assert!(crate::entry::read_header(&fifo).is_err());
        fs::remove_file(&fifo).unwrap();
        fs::create_dir(&fifo).unwrap();
        assert_eq!(state(&s, "a.png"), State::Corrupt);
    }

    #[test]
    fn a_sidecar_name_over_the_limit_is_a_miss_and_a_write_error_that_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{}.png", "x".repeat(245));
        write_aged(&dir.path().join(&name), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let c = s.check(Path::new(&name)).unwrap();
        assert_eq!(c.state, State::Missing);
        assert!(c.reason.contains("--cache-dir"), "{}", c.reason);
        let meta = Default::default();
        let err = s
            .put(Path::new(&name), &tensor(), &meta, &[], false, None)
            .unwrap_err();
        assert!(
            matches!(err, Error::NameTooLong { .. }) && err.to_string().contains("--cache-dir"),
            "{err}"
        );
    }

    #[test]
    fn a_file_the_input_rule_would_prefer_makes_the_entry_stale() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        write_aged(&dir.path().join("a.png.txt"), b"a cat", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let inputs = [
            Input::File {
                name: "caption".into(),
                path: PathBuf::from("a.png.txt"),
                expected: None,
            },
            Input::Absent {
                name: "caption".into(),
                path: PathBuf::from("a.txt"),
            },
        ];
        let meta = Default::default();
        s.put(Path::new("a.png"), &tensor(), &meta, &inputs, false, None)
            .unwrap();
        assert_eq!(state(&s, "a.png"), State::Valid);
        write_aged(&dir.path().join("a.txt"), b"a dog", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("a.txt"), "{}", c.reason);
    }

    #[test]
    fn an_input_changed_after_the_encoder_read_it_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let caption = dir.path().join("a.txt");
        write_aged(&caption, b"a cat", 3600);
        let read_at = Stamp::of(&caption).unwrap();
        write_aged(&caption, b"a dog", 60);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let inputs = [Input::File {
            name: "caption".into(),
            path: PathBuf::from("a.txt"),
            expected: Some(read_at),
        }];
        let meta = Default::default();
        let err = s
            .put(Path::new("a.png"), &tensor(), &meta, &inputs, false, None)
            .unwrap_err();
        assert!(matches!(err, Error::SourceChanged { .. }), "{err}");
        assert_eq!(state(&s, "a.png"), State::Missing);
    }

    #[test]
    fn a_digest_check_finds_what_unchanged_stamps_hide() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let entry = put(&s, "a.png");
        // The recorded digest no longer matches the bytes while every stamp does (what a
        // same-size edit that restores the mtime within one ctime tick would look like).
        let judged = Stamp::of(&entry).unwrap();
        let wrong = |m: &mut std::collections::BTreeMap<String, String>| {
            m.insert("source.blake3".into(), "0".repeat(64));
        };
        assert!(crate::entry::rewrite_metadata_to(&entry, &entry, judged, wrong, false).unwrap());
        let fresh = store(dir.path(), Layout::Sidecar, "fp");
        assert_eq!(
            fresh
                .check_at(Path::new("a.png"), Depth::Stamps)
                .unwrap()
                .state,
            State::Valid
        );
        assert_eq!(
            fresh
                .check_at(Path::new("a.png"), Depth::Digests)
                .unwrap()
                .state,
            State::Stale
        );
    }

    #[test]
    fn deleted_source_leaves_an_orphan() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        put(&s, "a.png");
        fs::remove_file(&src).unwrap();
        assert_eq!(state(&s, "a.png"), State::Orphan);
    }

    #[test]
    fn another_fingerprint_is_foreign() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        put(&store(dir.path(), Layout::Sidecar, "fp"), "a.png");
        let c = store(dir.path(), Layout::Sidecar, "other")
            .check(Path::new("a.png"))
            .unwrap();
        assert_eq!(c.state, State::Foreign);
        assert!(c.reason.contains("\"fp\""), "{}", c.reason);
    }

    #[test]
    fn damaged_entry_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let entry = put(&s, "a.png");
        fs::write(&entry, b"not a safetensors file").unwrap();
        assert_eq!(state(&s, "a.png"), State::Corrupt);
    }

    #[test]
    fn changed_extra_input_makes_the_entry_stale() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let caption = dir.path().join("a.txt");
        write_aged(&caption, b"a cat", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let inputs = [Input::File {
            name: "caption".into(),
            path: PathBuf::from("a.txt"),
            expected: None,
        }];
        let meta = Default::default();
        s.put(Path::new("a.png"), &tensor(), &meta, &inputs, false, None)
            .unwrap();
        assert_eq!(state(&s, "a.png"), State::Valid);
        write_aged(&caption, b"a dog", 60);
        let c = s.check(Path::new("a.png")).unwrap();
        assert_eq!(c.state, State::Stale);
        assert!(c.reason.contains("caption"), "{}", c.reason);
    }

    /// An input stamped within the timestamp granularity of its last change may be edited again
    /// in the same tick, keeping its stamp (size, mtime, ctime): the entry marks it racy and
    /// every check reads it, whatever its stamp, in this process and in others (the index's
    /// copy of the inputs included).
    #[test]
    fn an_input_stamped_in_its_racy_window_is_read_whatever_its_stamp() {
        let dir = tempfile::tempdir().unwrap();
        write_aged(&dir.path().join("a.png"), b"image", 3600);
        let caption = dir.path().join("cap.txt");
        fs::write(&caption, b"a cat").unwrap(); // just now: racy
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let rel = Path::new("a.png");
        let input = Input::File {
            name: "caption".into(),
            path: PathBuf::from("cap.txt"),
            expected: None,
        };
        let w = s
            .put(rel, &tensor(), &Default::default(), &[input], false, None)
            .unwrap();
        assert!(
            w.check_first,
            "a racy input keeps the index from trusting the stamps"
        );
        assert!(w.inputs.as_deref().unwrap().contains(r#""racy":true"#));
        // The same size, edited "in the same tick": forge the header so that the recorded stamp
        // is the file's new one, as a same-tick edit would leave it.
        fs::write(&caption, b"a dog").unwrap();
        let now = Stamp::of(&caption).unwrap();
        let forged = |racy: bool| {
            let judged = Stamp::of(&w.path).unwrap();
            let update = |m: &mut BTreeMap<String, String>| {
                let mut items: serde_json::Value = serde_json::from_str(&m["inputs"]).unwrap();
                let item = &mut items[1];
                item["mtime_ns"] = now.mtime_ns.into();
                item["ctime_ns"] = now.ctime_ns.into();
                item["ino"] = now.ino.into();
                if !racy {
                    item.as_object_mut().unwrap().remove("racy");
                }
                m.insert("inputs".into(), items.to_string());
            };
            assert!(entry::rewrite_metadata_to(&w.path, &w.path, judged, update, false).unwrap());
        };
        forged(true);
        let fresh = store(dir.path(), Layout::Sidecar, "fp");
        let c = fresh.check(rel).unwrap();
        assert_eq!(c.state, State::Stale, "{}", c.reason);
        assert!(c.reason.contains("caption"), "{}", c.reason);
        // Without the mark, the unchanged stamp would have vouched for the new bytes.
        forged(false);
        let fresh = store(dir.path(), Layout::Sidecar, "fp");
        assert_eq!(state(&fresh, "a.png"), State::Valid);
    }

    #[test]
    fn source_changed_after_reading_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        write_aged(&src, b"image", 3600);
        let s = store(dir.path(), Layout::Sidecar, "fp");
        let read_at = Stamp::of(&src).unwrap();
        write_aged(&src, b"edited image", 60);
        let meta = Default::default();
        let err = s
            .put(
                Path::new("a.png"),
                &tensor(),
                &meta,
                &[],
                false,
                Some(read_at),
            )
            .unwrap_err();
        assert!(matches!(err, Error::SourceChanged { .. }), "{err}");
        assert_eq!(state(&s, "a.png"), State::Missing);
    }

    #[test]
    fn state_names_are_distinct_and_listed_once() {
        let names: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }
}
