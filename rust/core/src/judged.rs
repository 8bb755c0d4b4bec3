//! Destructive operations that act only on the file that was judged.
//!
//! `gc`, `verify --quarantine` and `migrate --delete-old` judge an entry, then remove or move
//! it. Between the two a concurrent writer (a lazy training loop, a precompute run) may replace
//! the file by renaming a fresh one over its name. Acting on the name would destroy that fresh,
//! valid entry. So the file at the name is first renamed to a private name in the same
//! directory (atomic: from then on no writer can replace what is held), its stamp is compared
//! with the judged one, and only then is it removed or moved; a file that is not the judged one
//! is put back, unless an even newer one took the name meanwhile.

use std::ffi::CString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::key::Stamp;

/// Removes the file at `path` if it is still the one with stamp `judged`; false (and nothing
/// removed) when the file is gone or another one is there now.
pub fn remove_judged(path: &Path, judged: Stamp) -> Result<bool> {
    take_judged(path, judged, |held| fs::remove_file(held).at(held))
}

/// Moves the file at `path` to `dest` (same file system) if it is still the one with stamp
/// `judged`; false (and nothing moved) when the file is gone or another one is there now.
pub fn move_judged(path: &Path, dest: &Path, judged: Stamp) -> Result<bool> {
    take_judged(path, judged, |held| fs::rename(held, dest).at(dest))
}

fn take_judged(path: &Path, judged: Stamp, act: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    let held = held_name(path);
    match fs::rename(path, &held) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path, e)),
    }
    let now = fs::symlink_metadata(&held).at(&held)?;
    // Our own rename changed its ctime; inode, size and mtime say whether it is the judged file
    // (an atomic write makes a new inode, and the judged one is still allocated until now).
    let held_stamp = Stamp::from_metadata(&now);
    let same = Stamp {
        ctime_ns: judged.ctime_ns,
        ..held_stamp
    } == judged;
    if now.file_type().is_file() && same {
        act(&held)?;
        return Ok(true);
    }
    put_back(&held, path)?;
    Ok(false)
}

/// A private name beside `path` for the file being judged: `.<name>.<pid>-<n>.judged`.
fn held_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tag = format!(
        ".{}-{}.judged",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let room = crate::entry::NAME_MAX.saturating_sub(1 + tag.len());
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    path.with_file_name(format!(".{}{tag}", &name[..cut]))
}

/// Renames `held` back to `path` unless something is at `path` now (a newer write, which wins:
/// the held file is then older and is removed).
fn put_back(held: &Path, path: &Path) -> Result<()> {
    match rename_noreplace(held, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => fs::remove_file(held).at(held),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// `rename` that fails with AlreadyExists instead of replacing; `link` + `unlink` where the file
/// system has no `renameat2` (some network file systems).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 only renames.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(err);
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_judged_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.safetensors");
        fs::write(&p, b"old").unwrap();
        let judged = Stamp::of(&p).unwrap();
        assert!(remove_judged(&p, judged).unwrap());
        assert!(!p.exists());
        assert!(!remove_judged(&p, judged).unwrap());
    }

    #[test]
    fn a_file_written_over_the_name_after_judgment_survives() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.safetensors");
        fs::write(&p, b"old").unwrap();
        let judged = Stamp::of(&p).unwrap();
        // A concurrent writer's atomic replace: a new inode renamed over the name.
        let tmp = dir.path().join("tmp");
        fs::write(&tmp, b"fresh").unwrap();
        fs::rename(&tmp, &p).unwrap();
        assert!(!remove_judged(&p, judged).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"fresh");
        let dest = dir.path().join("quarantined");
        assert!(!move_judged(&p, &dest, judged).unwrap());
        assert!(!dest.exists());
        // Nothing of the attempt is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn moves_the_judged_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.safetensors");
        fs::write(&p, b"bad").unwrap();
        let judged = Stamp::of(&p).unwrap();
        let dest = dir.path().join("q");
        assert!(move_judged(&p, &dest, judged).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"bad");
    }
}
