//! Parallel discovery of source files: by extension in a directory tree, from the path fields of
//! `.jsonl` files, or from an explicit list. Results are sorted afterwards so they are
//! deterministic; errors per entry (unreadable directory, symlink loop, missing listed file) are
//! collected, never fatal.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ignore::{DirEntry, ParallelVisitor, ParallelVisitorBuilder, WalkBuilder, WalkState};
use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::key::Stamp;
use crate::pool;

/// Image extensions scanned by default (compared without case).
pub const DEFAULT_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"];

/// Directory name of featstore's own per-root state (frame sets, locks); never scanned.
pub const STATE_DIR: &str = ".featstore";

/// What to scan and how.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Lower-case extensions without the dot; empty means [`DEFAULT_EXTENSIONS`].
    pub extensions: Vec<String>,
    /// Follow symbolic links (loops are detected and reported).
    pub follow_symlinks: bool,
    /// Absolute directories to leave out (a cache directory inside the data root).
    pub skip_dirs: Vec<PathBuf>,
    /// Worker threads; None means one per core.
    pub threads: Option<usize>,
    /// Files whose name ends with this are collected in [`Scan::named`] by name alone, without a
    /// `stat`: a feature's sidecar entries found in the same walk as the sources (`status`
    /// needs their names to count orphans, and stats the ones it checks anyway).
    pub named_suffix: Option<String>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            extensions: Vec::new(),
            follow_symlinks: true,
            skip_dirs: Vec::new(),
            threads: None,
            named_suffix: None,
        }
    }
}

/// One source file: its path relative to the data root and its stamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub rel: PathBuf,
    pub stamp: Stamp,
}

/// The result of a scan.
#[derive(Debug, Default)]
pub struct Scan {
    /// Sources sorted by relative path (byte order).
    pub sources: Vec<Source>,
    /// `(path, reason)` for everything that could not be scanned.
    pub errors: Vec<(String, String)>,
    /// Ordered groups of relative paths (one per `.jsonl` line whose field is a list).
    pub sets: Vec<Vec<PathBuf>>,
    /// Relative paths of the files named like [`ScanOptions::named_suffix`], sorted.
    pub named: Vec<PathBuf>,
}

/// Resolves the data root to an absolute directory, or says clearly why it cannot be used.
pub fn check_root(root: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(root).map_err(|e| Error::io(root, e))?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_dir() => Ok(abs),
        Ok(_) => Err(Error::DataRoot {
            path: abs,
            reason: "is not a directory; pass the dataset's top directory".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::DataRoot {
            path: abs,
            reason: "does not exist; check the path (DATA_ROOT / --data-root)".into(),
        }),
        Err(e) => Err(Error::io(abs, e)),
    }
}

fn wanted_extensions(opts: &ScanOptions) -> Vec<String> {
    if opts.extensions.is_empty() {
        DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.extensions
            .iter()
            .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
            .collect()
    }
}

fn has_extension(name: &OsStr, wanted: &[String]) -> bool {
    let name = name.as_encoded_bytes();
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let ext = &name[dot + 1..];
    wanted
        .iter()
        .any(|w| w.as_bytes().eq_ignore_ascii_case(ext))
}

fn walk_error_path(err: &ignore::Error) -> Option<String> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path.display().to_string()),
        ignore::Error::Loop { child, .. } => Some(child.display().to_string()),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            walk_error_path(err)
        }
        _ => None,
    }
}

fn describe_walk_error(err: &ignore::Error) -> String {
    match err {
        ignore::Error::Loop { ancestor, child } => {
            format!(
                "symlink loop: {} leads back to {}; skipped",
                child.display(),
                ancestor.display()
            )
        }
        ignore::Error::WithPath { err, .. }
        | ignore::Error::WithDepth { err, .. }
        | ignore::Error::WithLineNumber { err, .. } => describe_walk_error(err),
        other => other.to_string(),
    }
}

#[derive(Default)]
struct Found {
    sources: Vec<Source>,
    errors: Vec<(String, String)>,
    named: Vec<PathBuf>,
}

struct Collector<'s> {
    root: &'s Path,
    wanted: &'s [String],
    named_suffix: Option<&'s [u8]>,
    shared: &'s Mutex<Found>,
    progress: &'s AtomicU64,
    local: Found,
}

impl Collector<'_> {
    fn flush(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.sources.append(&mut self.local.sources);
        shared.errors.append(&mut self.local.errors);
        shared.named.append(&mut self.local.named);
    }

    fn accept(&mut self, entry: DirEntry) {
        if entry.file_type().is_some_and(|t| t.is_dir()) {
            return;
        }
        let name = entry.file_name().as_encoded_bytes();
        if self
            .named_suffix
            .is_some_and(|s| name.len() > s.len() && name.ends_with(s))
        {
            let path = entry.path();
            self.local
                .named
                .push(path.strip_prefix(self.root).unwrap_or(path).to_path_buf());
            return;
        }
        if !has_extension(entry.file_name(), self.wanted) {
            return;
        }
        let path = entry.path();
        match entry.metadata() {
            Ok(meta) if meta.is_file() => {
                let rel = path.strip_prefix(self.root).unwrap_or(path).to_path_buf();
                self.local.sources.push(Source {
                    rel,
                    stamp: Stamp::from_metadata(&meta),
                });
                self.progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => self
                .local
                .errors
                .push((path.display().to_string(), describe_walk_error(&e))),
        }
    }
}

impl ParallelVisitor for Collector<'_> {
    fn visit(&mut self, entry: std::result::Result<DirEntry, ignore::Error>) -> WalkState {
        match entry {
            Ok(e) => self.accept(e),
            Err(err) => {
                let path = walk_error_path(&err).unwrap_or_else(|| self.root.display().to_string());
                self.local.errors.push((path, describe_walk_error(&err)));
            }
        }
        if self.local.sources.len() + self.local.named.len() >= 4096 {
            self.flush();
        }
        WalkState::Continue
    }
}

impl Drop for Collector<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

struct CollectorBuilder<'s> {
    root: &'s Path,
    wanted: &'s [String],
    named_suffix: Option<&'s [u8]>,
    shared: &'s Mutex<Found>,
    progress: &'s AtomicU64,
}

impl<'s> ParallelVisitorBuilder<'s> for CollectorBuilder<'s> {
    fn build(&mut self) -> Box<dyn ParallelVisitor + 's> {
        Box::new(Collector {
            root: self.root,
            wanted: self.wanted,
            named_suffix: self.named_suffix,
            shared: self.shared,
            progress: self.progress,
            local: Found::default(),
        })
    }
}

fn finish(mut found: Found) -> Scan {
    found.sources.sort_by(|a, b| {
        a.rel
            .as_os_str()
            .as_encoded_bytes()
            .cmp(b.rel.as_os_str().as_encoded_bytes())
    });
    found.errors.sort();
    found.named.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Scan {
        sources: found.sources,
        errors: found.errors,
        sets: Vec::new(),
        named: found.named,
    }
}

/// Walks `root` in parallel and returns every file with a wanted extension, with its stamp.
///
/// Hidden files and `.gitignore` rules are not applied (datasets are not source trees);
/// `.featstore` state directories and `opts.skip_dirs` are left out. `progress` counts sources
/// found so far, for a progress display on another thread.
pub fn scan_tree(root: &Path, opts: &ScanOptions, progress: &AtomicU64) -> Result<Scan> {
    let root = check_root(root)?;
    let wanted = wanted_extensions(opts);
    let skip = opts.skip_dirs.clone();
    let shared = Mutex::new(Found::default());
    let mut builder = WalkBuilder::new(&root);
    builder
        .standard_filters(false)
        .follow_links(opts.follow_symlinks)
        .threads(opts.threads.unwrap_or_else(pool::default_threads))
        .filter_entry(move |e| {
            let is_dir = e.file_type().is_some_and(|t| t.is_dir());
            !(is_dir && (e.file_name() == STATE_DIR || skip.iter().any(|s| s == e.path())))
        });
    let mut visitors = CollectorBuilder {
        root: &root,
        wanted: &wanted,
        named_suffix: opts.named_suffix.as_deref().map(str::as_bytes),
        shared: &shared,
        progress,
    };
    builder.build_parallel().visit(&mut visitors);
    Ok(finish(
        shared.into_inner().unwrap_or_else(|p| p.into_inner()),
    ))
}

/// Resolves one listed path: absolute as is, else relative to `base_dir` first, then to `root`.
fn resolve_listed(
    root: &Path,
    base_dir: &Path,
    listed: &str,
) -> std::result::Result<(PathBuf, Stamp), String> {
    let p = Path::new(listed);
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![base_dir.join(p), root.join(p)]
    };
    let mut last_err = String::new();
    for cand in &candidates {
        match std::fs::metadata(cand) {
            Ok(meta) if meta.is_file() => {
                let normal = normalize(cand);
                return match normal.strip_prefix(root) {
                    Ok(rel) => Ok((rel.to_path_buf(), Stamp::from_metadata(&meta))),
                    Err(_) => Err(format!(
                        "{} is outside the data root {}",
                        cand.display(),
                        root.display()
                    )),
                };
            }
            Ok(_) => last_err = format!("{} is not a file", cand.display()),
            Err(e) => last_err = format!("{}: {e}", cand.display()),
        }
    }
    Err(last_err)
}

/// Removes `.` and `..` components lexically (the dataset may be a tree of symlinks, so we do not
/// canonicalize: the relative path must stay the one the user sees).
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Stats a list of paths (relative to `root`, or absolute inside it) in parallel: `--files-from`.
pub fn scan_list(
    root: &Path,
    listed: &[String],
    threads: Option<usize>,
    progress: &AtomicU64,
) -> Result<Scan> {
    let root = check_root(root)?;
    let results: Vec<_> = pool::pool(threads).install(|| {
        listed
            .par_iter()
            .map(|l| {
                let r = resolve_listed(&root, &root, l);
                progress.fetch_add(1, Ordering::Relaxed);
                (l, r)
            })
            .collect()
    });
    let mut found = Found::default();
    let mut seen = BTreeSet::new();
    for (listed, r) in results {
        match r {
            Ok((rel, stamp)) => {
                if seen.insert(rel.clone()) {
                    found.sources.push(Source { rel, stamp });
                }
            }
            Err(reason) => found.errors.push((listed.clone(), reason)),
        }
    }
    Ok(finish(found))
}

/// Reads the `field` of every line of every `.jsonl` file under `root` (a path or a list of
/// paths, relative to the jsonl's folder or to the root) and stats the files named there. Each
/// line whose field is a list becomes one set, in the listed order.
pub fn scan_jsonl(
    root: &Path,
    field: &str,
    opts: &ScanOptions,
    progress: &AtomicU64,
) -> Result<Scan> {
    let root = check_root(root)?;
    let jsonl_opts = ScanOptions {
        extensions: vec!["jsonl".into()],
        ..opts.clone()
    };
    let files = scan_tree(&root, &jsonl_opts, &AtomicU64::new(0))?;
    let mut errors = files.errors;
    // Where a listing is, for messages only: formatted when one is needed, never per line.
    let paths: Vec<PathBuf> = files.sources.iter().map(|f| root.join(&f.rel)).collect();
    let bases: Vec<&Path> = paths.iter().map(|p| p.parent().unwrap_or(&root)).collect();
    let at = |file: usize, line: usize| format!("{}:{}", paths[file].display(), line + 1);
    // (the .jsonl's index, its line, the listed path, index of its set or usize::MAX)
    let mut listed: Vec<(usize, usize, String, usize)> = Vec::new();
    let mut set_members: Vec<Vec<String>> = Vec::new();
    for (file, path) in paths.iter().enumerate() {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                errors.push((path.display().to_string(), e.to_string()));
                continue;
            }
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    errors.push((at(file, i), format!("not valid JSON: {e}")));
                    continue;
                }
            };
            match value.get(field) {
                Some(Value::String(s)) => listed.push((file, i, s.clone(), usize::MAX)),
                Some(Value::Array(items)) => {
                    let set_index = set_members.len();
                    let mut members = Vec::new();
                    for item in items {
                        match item.as_str() {
                            Some(s) => {
                                members.push(s.to_string());
                                listed.push((file, i, s.to_string(), set_index));
                            }
                            None => errors.push((
                                at(file, i),
                                format!("field {field:?} holds a non-string item {item}"),
                            )),
                        }
                    }
                    set_members.push(members);
                }
                Some(other) => errors.push((
                    at(file, i),
                    format!("field {field:?} is neither a path nor a list of paths: {other}"),
                )),
                None => errors.push((at(file, i), format!("no field {field:?} on this line"))),
            }
        }
    }
    // Each distinct (folder, listed path) is resolved once: a history dataset lists every frame
    // of an episode on each of its steps' lines, T(T+1)/2 mentions of T files. Keys are compared
    // as bytes (a `Path` hashes and compares component by component: most of a million-line
    // scan's time).
    let mut slots: HashMap<(&OsStr, &str), usize> = HashMap::new();
    let mut distinct: Vec<(&Path, &str)> = Vec::new();
    let slot_of: Vec<usize> = listed
        .iter()
        .map(|(file, _, p, _)| {
            let base = bases[*file];
            *slots
                .entry((base.as_os_str(), p.as_str()))
                .or_insert_with(|| {
                    distinct.push((base, p.as_str()));
                    distinct.len() - 1
                })
        })
        .collect();
    let looked_up: Vec<_> = pool::pool(opts.threads).install(|| {
        distinct
            .par_iter()
            .map(|(base, p)| {
                progress.fetch_add(1, Ordering::Relaxed);
                resolve_listed(&root, base, p)
            })
            .collect()
    });
    let mut found = Found::default();
    let mut seen: HashSet<&OsStr> = HashSet::new();
    let mut sets: Vec<Vec<PathBuf>> = vec![Vec::new(); set_members.len()];
    let mut broken_sets = BTreeSet::new();
    for ((file, line, p, set), slot) in listed.iter().zip(slot_of) {
        match &looked_up[slot] {
            Ok((rel, stamp)) => {
                if *set != usize::MAX {
                    sets[*set].push(rel.clone());
                }
                if seen.insert(rel.as_os_str()) {
                    found.sources.push(Source {
                        rel: rel.clone(),
                        stamp: *stamp,
                    });
                }
            }
            Err(reason) => {
                if *set != usize::MAX {
                    broken_sets.insert(*set);
                }
                found
                    .errors
                    .push((at(*file, *line), format!("listed path {p:?}: {reason}")));
            }
        }
    }
    found.errors.extend(errors);
    let mut scan = finish(found);
    // A set with a missing member would give its frames different context: leave it out whole.
    scan.sets = sets
        .into_iter()
        .enumerate()
        .filter(|(i, s)| !broken_sets.contains(i) && !s.is_empty())
        .map(|(_, s)| s)
        .collect();
    Ok(scan)
}
