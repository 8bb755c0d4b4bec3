//! Where entries live and whether they may be served.
//!
//! One vocabulary of states for every command and API ([`State`]). The hot path ([`Store::check`]
//! on an entry seen before) costs two `stat`s (source and entry) plus one per extra file input,
//! and opens nothing: the stamps from the entry's header, or from the manifest's index, are kept
//! in memory and compared with fresh ones. A packed entry costs one more (its pack). Everything slower (first look at an entry, a touched
//! source, a racy entry) runs once per entry and process, then is remembered.

mod history_read;
mod index;
mod pack_stream;
mod packing;
mod read;
mod recorded;

pub use pack_stream::PackStream;
pub use packing::{pack_name, LiveEntry, PackRun, PackUsage};
pub use recorded::NowInput;
mod validity;

pub use validity::Depth;
mod write;
pub use write::{sync_all, PutRequest};

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::entry::{self, ReadMode};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::key::{path_bytes, stamp_key, Stamp, KEY_NAME_LEN};
use crate::manifest::Manifest;
use crate::pack::PackedAt;

/// Sources modified less than this long before their entry was written are *racy*: a same-size
/// edit within the file system's timestamp granularity would keep the stamp, so such entries are
/// checked by digest on first use. 2 s covers the coarsest local file systems (FAT, ext3: 1-2 s).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Where entries are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `<source>.<feature>.safetensors` beside each source.
    Sidecar,
    /// `<cache_dir>/<feature>/<key[:2]>/<key32>.safetensors`.
    Dir { cache_dir: PathBuf },
}

/// The state of a source's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Valid,
    Missing,
    Stale,
    Foreign,
    Corrupt,
    Orphan,
    Legacy,
}

impl State {
    /// Every state, in the order the reports list them (Python's `featstore.vocabulary.STATES`
    /// is the same list; a test holds them equal).
    pub const ALL: [State; 7] = [
        State::Valid,
        State::Missing,
        State::Stale,
        State::Foreign,
        State::Corrupt,
        State::Orphan,
        State::Legacy,
    ];

    /// The name used everywhere (CLI output, JSON, Python).
    pub fn name(self) -> &'static str {
        match self {
            State::Valid => "valid",
            State::Missing => "missing",
            State::Stale => "stale",
            State::Foreign => "foreign",
            State::Corrupt => "corrupt",
            State::Orphan => "orphan",
            State::Legacy => "legacy",
        }
    }
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Absolute data root.
    pub root: PathBuf,
    /// Feature name (`vggt`, `pixel_latent`, ...): part of entry and manifest names.
    pub feature: String,
    pub layout: Layout,
    /// Expected encoder fingerprint; None adopts the manifest's (or accepts any, without one).
    pub fingerprint: Option<String>,
    /// Suffix of legacy sidecars (`.vggt_cache.pt`), reported as `legacy` when present.
    pub legacy_suffix: Option<String>,
    pub read_mode: ReadMode,
}

/// The answer of a check: the state, where the entry is (or would be), and why.
#[derive(Debug, Clone)]
pub struct Check {
    pub state: State,
    pub entry: PathBuf,
    pub reason: String,
    /// The stamp of the entry file the verdict is about, as it was when judged (None when there
    /// is no such file). Destructive commands act on that very file and no other.
    pub identity: Option<Stamp>,
    /// Where the entry is when a pack holds it; `entry` is then `<pack>@<offset>`, a name no
    /// file has (so nothing that removes the file `entry` names can remove the pack), and
    /// `identity` is the pack's stamp.
    pub packed: Option<PackedAt>,
}

impl Check {
    fn about(state: State, entry: PathBuf, reason: impl Into<String>) -> Check {
        Check {
            state,
            entry,
            reason: reason.into(),
            identity: None,
            packed: None,
        }
    }
}

impl Check {
    /// A verdict about the entry `at` in the pack `pack`.
    fn packed_about(state: State, pack: &Path, at: PackedAt, reason: impl Into<String>) -> Check {
        Check {
            packed: Some(at.clone()),
            ..Check::about(state, packed_entry_name(pack, &at), reason)
        }
    }
}

/// Where in its pack a packed entry's bytes are.
fn span_of(at: &PackedAt) -> entry::Span {
    entry::Span {
        offset: at.offset,
        len: at.len,
    }
}

/// The name a packed entry goes by in a [`Check`]: `<pack path>@<offset>`.
pub fn packed_entry_name(pack: &Path, at: &PackedAt) -> PathBuf {
    let mut name = pack.as_os_str().to_os_string();
    name.push(format!("@{}", at.offset));
    PathBuf::from(name)
}

/// An input of an entry besides its source.
#[derive(Debug, Clone)]
pub enum Input {
    /// A file (caption `.txt`, control image): recorded by stamp and digest, checked on lookup.
    /// `expected` is its stamp when the encoder read it: changed since, nothing is written.
    File {
        name: String,
        path: PathBuf,
        expected: Option<Stamp>,
    },
    /// A text (a caption from a `.jsonl` field): recorded by digest.
    Text { name: String, text: Vec<u8> },
    /// A file that must not exist for the entry to hold: one an input rule would prefer (the
    /// caption rule takes `img.txt` over `img.png.txt`). Checked on lookup like any input.
    Absent { name: String, path: PathBuf },
    /// One line of a `.jsonl` listing: the line that lists `listed` (as it spells it) in
    /// `fields.image_field` gave `text` as `fields.field`. The entry holds while the listing
    /// still gives `listed` a value with that digest, whatever else in the file changes.
    JsonlLine {
        name: String,
        path: PathBuf,
        fields: crate::jsonl::Fields,
        listed: String,
        text: Vec<u8>,
    },
}

/// What [`Store::put`] wrote (the journal records it).
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub source: Stamp,
    pub entry: Stamp,
    pub racy: bool,
    /// The index must not trust this entry's stamps alone: it (or one of its inputs) is racy.
    pub check_first: bool,
    /// The extra inputs as the header records them (None: none), for the index.
    pub inputs: Option<Arc<str>>,
    pub bytes: u64,
}

/// What this process knows about one entry, valid while every stamp in it is unchanged.
#[derive(Debug, Clone)]
struct Known {
    source: Stamp,
    /// The entry file the verdict is about (in the dir layout its name follows the stamp the
    /// entry was written for, which may be older than `source`), or the pack holding it.
    path: PathBuf,
    /// Where in the pack `path` the entry is (None: `path` is the entry's own file).
    packed: Option<PackedAt>,
    entry: Stamp,
    /// Extra file inputs: absolute path and stamp when the entry was checked (None: a file
    /// that must stay absent).
    inputs: Vec<(PathBuf, Option<Stamp>)>,
    state: State,
    reason: String,
    /// False for racy manifest records: they locate the entry but still need a full check.
    trusted: bool,
    /// Reached (or written) while the source's mtime was within [`RACY_WINDOW_NS`] of the clock:
    /// a same-size edit since then may have kept the stamp, so every use checks again (digest
    /// included) until a check made outside the window settles it.
    racy: bool,
    /// Taken from the manifest's index and not judged since: the index already holds it.
    indexed: bool,
    /// The extra inputs as the entry's header records them (None: none). For a record taken
    /// from the index, `inputs` is empty and these are checked on use.
    recorded_inputs: Option<Arc<str>>,
    /// The entry's validated header and the file it was validated for, once read.
    header: Option<(entry::FileId, Arc<entry::Header>)>,
}

impl Known {
    /// True when unchanged stamps alone vouch for this verdict (the hot path).
    fn hot(&self) -> bool {
        self.trusted && !self.racy
    }
}

/// True while a same-size edit of a source with this stamp could keep its mtime: the mtime is
/// within the file system's timestamp granularity of now (or in the future).
fn racy_now(source: Stamp) -> bool {
    now_ns() - source.mtime_ns <= RACY_WINDOW_NS
}

/// A feature's entries under one data root.
pub struct Store {
    cfg: StoreConfig,
    known: RwLock<HashMap<PathBuf, Known>>,
    /// The index segments of the store's fingerprint, mapped when the store was opened: a lookup
    /// of an entry not yet known in this process finds its record there (docs/design.md). Mapped
    /// again when an entry it vouched for is gone and the index directory changed since (another
    /// process moved entries into a pack, say).
    index: RwLock<Arc<Index>>,
    /// The index directory's stamp before the index was last mapped (None: no directory), and
    /// whether it was racy then (changed within the timestamp granularity: a change in the same
    /// tick keeps the stamp, so it vouches for nothing).
    index_dir_seen: RwLock<(Option<Stamp>, bool)>,
    /// The manifest of an earlier version holds the index inline and no segment holds it yet:
    /// the next merge moves it.
    inline_index: bool,
    /// Opened without a fingerprint and without a manifest: the fingerprint of a manifest that
    /// appeared since (the first lazy write or `put` with a fingerprint creates one), taken once.
    adopted: OnceLock<String>,
    /// The data root with every symbolic link resolved (where sidecars may be written).
    real_root: OnceLock<PathBuf>,
}

/// What is at an entry's path, from one `stat`.
enum EntryFile {
    Absent,
    Regular(Stamp),
    /// A FIFO, socket, device or directory: never opened (a FIFO would block), a counted miss.
    Special(&'static str),
    /// The name is longer than the file system allows (a long source name plus the suffix).
    NameTooLong,
}

fn stat_entry(path: &Path) -> Result<EntryFile> {
    match fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(EntryFile::Regular(Stamp::from_metadata(&m))),
        Ok(m) => Ok(EntryFile::Special(entry::file_kind(&m.file_type()))),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
            Ok(EntryFile::Absent)
        }
        Err(e) if e.raw_os_error() == Some(ENAMETOOLONG) => Ok(EntryFile::NameTooLong),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Linux's errno for a file name over NAME_MAX.
const ENAMETOOLONG: i32 = 36;

/// Why an entry cannot live at `path`, and the fix.
fn name_too_long(path: &Path) -> String {
    let len = path.file_name().map_or(0, |n| n.len());
    format!(
        "the entry's file name would be {len} bytes, over the file system's limit of {}: keep \
         entries in a cache directory instead (--cache-dir DIR, the dir layout names them by key)",
        entry::NAME_MAX
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn stat_opt(path: &Path) -> Result<Option<Stamp>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp::from_metadata(&m))),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
            Ok(None)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// What a source's `stat` found (following symlinks).
enum SourceFile {
    Absent,
    Regular(Stamp),
    /// A FIFO, socket, device or directory: judged without ever being opened.
    Special(&'static str),
}

fn stat_source(path: &Path) -> Result<SourceFile> {
    match fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(SourceFile::Regular(Stamp::from_metadata(&m))),
        Ok(m) => Ok(SourceFile::Special(entry::file_kind(&m.file_type()))),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
            Ok(SourceFile::Absent)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

fn recorded_stamp(meta: &BTreeMap<String, String>, prefix: &str) -> Option<Stamp> {
    let field = |name: &str| meta.get(&format!("{prefix}.{name}"));
    let mut stamp = Stamp::sized(
        field("size")?.parse().ok()?,
        field("mtime_ns")?.parse().ok()?,
    );
    // Entries written before inodes and ctimes were recorded lack them: such a stamp never
    // equals a file's, so the digest decides (and the refreshed header then has them).
    if let (Some(ino), Some(ctime)) = (field("ino"), field("ctime_ns")) {
        stamp.ino = ino.parse().ok()?;
        stamp.ctime_ns = ctime.parse().ok()?;
    }
    Some(stamp)
}

impl Store {
    /// Opens a store. Reads the feature's manifest, if any, to adopt its fingerprint (when none
    /// is given), and maps the index segments of that fingerprint, so lookups of indexed entries
    /// open no entry file. Costs the same at ten entries and ten million (an index still inline
    /// in a manifest of an earlier version is read whole, until the next merge moves it).
    pub fn open(mut cfg: StoreConfig) -> Result<Store> {
        let manifest_path = Store::manifest_path_of(&cfg);
        let manifest = Manifest::read(&manifest_path)?;
        let manifest_fp = manifest
            .as_ref()
            .and_then(|m| m.fields.get("fingerprint"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if cfg.fingerprint.is_none() {
            cfg.fingerprint = manifest_fp.clone();
        }
        // Index records were valid for the fingerprint they were judged for: trust only those.
        let index_dir = Store::index_dir_of(&cfg);
        let index_dir_seen = stat_opt(&index_dir)?;
        let index = Index::open(&index_dir, cfg.fingerprint.as_deref())?;
        let inline_index = index.segments().is_empty()
            && manifest
                .as_ref()
                .is_some_and(|m| !m.legacy_index.is_empty());
        let store = Store {
            cfg,
            known: RwLock::new(HashMap::new()),
            index: RwLock::new(Arc::new(index)),
            index_dir_seen: RwLock::new((index_dir_seen, index_dir_seen.is_some_and(racy_now))),
            inline_index,
            adopted: OnceLock::new(),
            real_root: OnceLock::new(),
        };
        if let Some(m) = manifest {
            // Segments written from this inline index since are newer and hold the same records.
            if manifest_fp == store.cfg.fingerprint && store.index().segments().is_empty() {
                store.seed(&m);
            }
        }
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The fingerprint entries are checked against: the one given or the manifest's when the
    /// store was opened, else one a manifest created since records (None: neither).
    pub fn fingerprint(&self) -> Option<&str> {
        self.cfg
            .fingerprint
            .as_deref()
            .or_else(|| self.adopted.get().map(String::as_str))
    }

    /// Why an entry written with fingerprint `actual` is foreign here, or None when it is not.
    pub fn foreign_reason(&self, actual: &str) -> Option<String> {
        let expected = match self.fingerprint() {
            Some(fp) => Some(fp),
            None if actual.is_empty() => None,
            None => self.adopt_manifest_fingerprint(),
        };
        match expected {
            Some(expected) if actual != expected => Some(format!(
                "written by encoder fingerprint {actual:?}, this store expects {expected:?}"
            )),
            Some(_) => None,
            // No manifest says which encoder wrote this feature, and the caller named none: only
            // entries written without a fingerprint (`put` on such a store) are served. Deciding
            // by whichever entry is read first would serve another encoder's entry.
            None if actual.is_empty() => None,
            None => Some(format!(
                "written by encoder fingerprint {actual:?}, and no manifest records which encoder's \
                 entries this feature holds: open the store with fingerprint=... (the encoder's \
                 fingerprint()), or run `featstore precompute` with the encoder, which writes the \
                 manifest and keeps its own entries"
            )),
        }
    }

    /// The fingerprint of a manifest written since the store was opened without one, taken for
    /// good (a lazily filled cache: the first write creates the manifest other processes go by).
    fn adopt_manifest_fingerprint(&self) -> Option<&str> {
        if let Some(fp) = self.adopted.get() {
            return Some(fp);
        }
        let manifest = Manifest::read(&self.manifest_path()).ok().flatten()?;
        let fp = manifest.fields.get("fingerprint")?.as_str()?.to_string();
        Some(self.adopted.get_or_init(|| fp))
    }

    fn manifest_path_of(cfg: &StoreConfig) -> PathBuf {
        match &cfg.layout {
            Layout::Sidecar => cfg
                .root
                .join(format!("{}_cache_manifest.json", cfg.feature)),
            Layout::Dir { cache_dir } => cache_dir.join(&cfg.feature).join("manifest.json"),
        }
    }

    /// The feature's manifest: `<root>/<feature>_cache_manifest.json` (sidecar) or
    /// `<cache_dir>/<feature>/manifest.json` (dir).
    pub fn manifest_path(&self) -> PathBuf {
        Store::manifest_path_of(&self.cfg)
    }

    /// Where featstore keeps frame sets, locks and the index:
    /// `<root or cache_dir>/.featstore/<feature>`.
    pub fn state_dir(&self) -> PathBuf {
        Store::state_dir_of(&self.cfg)
    }

    fn state_dir_of(cfg: &StoreConfig) -> PathBuf {
        let base = match &cfg.layout {
            Layout::Sidecar => &cfg.root,
            Layout::Dir { cache_dir } => cache_dir,
        };
        base.join(crate::scan::STATE_DIR).join(&cfg.feature)
    }

    fn index_dir_of(cfg: &StoreConfig) -> PathBuf {
        Store::state_dir_of(cfg).join("index")
    }

    /// The directory of the index's segments: `<state dir>/index`.
    pub fn index_dir(&self) -> PathBuf {
        Store::index_dir_of(&self.cfg)
    }

    /// The index as this store mapped it (when it was opened, or again since).
    pub fn index(&self) -> Arc<Index> {
        Arc::clone(&self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Maps the index again if its directory changed since it was mapped (a segment written or
    /// compacted by another process), or may have (its stamp was taken within the timestamp
    /// granularity of a change); true when it did. One `stat` when nothing changed.
    pub fn reload_index_if_changed(&self) -> Result<bool> {
        let dir = self.index_dir();
        let now = stat_opt(&dir)?;
        let (seen, racy) = *self
            .index_dir_seen
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if now == seen && !racy {
            return Ok(false);
        }
        let index = Index::open(&dir, self.fingerprint())?;
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        *self
            .index_dir_seen
            .write()
            .unwrap_or_else(|p| p.into_inner()) = (now, now.is_some_and(racy_now));
        Ok(true)
    }

    /// True when the manifest (of an earlier version) holds the index inline and no segment
    /// holds it yet: the next merge of journals moves it into one.
    pub fn holds_inline_index(&self) -> bool {
        self.inline_index
    }

    /// Where the feature's packs are: `<state dir>/packs`.
    pub fn packs_dir(&self) -> PathBuf {
        self.state_dir().join("packs")
    }

    /// The path of the pack named `name` (a name [`crate::pack::is_pack_name`] accepts).
    pub fn pack_path(&self, name: &str) -> PathBuf {
        self.packs_dir().join(name)
    }

    /// The entry path of source `rel` with stamp `stamp` (the sidecar layout ignores the stamp).
    pub fn entry_path(&self, rel: &Path, stamp: Stamp) -> PathBuf {
        match &self.cfg.layout {
            Layout::Sidecar => {
                let mut name = self.cfg.root.join(rel).into_os_string();
                name.push(format!(".{}.safetensors", self.cfg.feature));
                PathBuf::from(name)
            }
            Layout::Dir { cache_dir } => {
                let key = stamp_key(path_bytes(rel), stamp);
                cache_dir
                    .join(&self.cfg.feature)
                    .join(&key[..2])
                    .join(format!("{}.safetensors", &key[..KEY_NAME_LEN]))
            }
        }
    }

    /// The legacy sidecar of `rel`, when this store reads legacy sidecars.
    pub fn legacy_path(&self, rel: &Path) -> Option<PathBuf> {
        let suffix = self.cfg.legacy_suffix.as_ref()?;
        let mut name = self.cfg.root.join(rel).into_os_string();
        name.push(suffix);
        Some(PathBuf::from(name))
    }

    fn remember(&self, rel: &Path, k: Known) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rel.to_path_buf(), k);
    }

    /// What this process knows of `rel`: judged here, or else the index's record.
    fn recall(&self, rel: &Path) -> Option<Known> {
        let known = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(rel)
            .cloned();
        known.or_else(|| self.learn_from_index(rel))
    }

    /// Forgets what this process knows about `rel` (after a removal).
    pub fn forget(&self, rel: &Path) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(rel);
    }
}
