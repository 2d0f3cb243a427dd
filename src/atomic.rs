//! Files published whole or not at all: written beside their place under a temporary name,
//! flushed to the disk, renamed over the place, and the folder flushed after the rename. A
//! reader sees the old file or the new one, never a torn one, and a crash cannot publish a name
//! whose data did not reach the disk. Every file `pixel` writes whole goes through here.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    publish(path, |tmp| std::fs::write(tmp, bytes))
}

/// Lets `write` make the file at a temporary path beside `path` (with the same extension, for
/// writers that choose a format by it), then publishes it at `path`. On an error nothing is left
/// at the temporary path and `path` is untouched.
pub fn publish(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let tmp = temporary(path);
    let done = write(&tmp)
        .and_then(|()| sync(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return done;
    }
    sync_folder_of(path)
}

/// A file written in pieces at a temporary path beside `path`, published there by
/// [`Pending::finish`]; dropped unfinished (an error on the way), it is removed.
pub struct Pending {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<io::BufWriter<std::fs::File>>,
}

impl Pending {
    pub fn create(path: &Path) -> io::Result<Pending> {
        let tmp = temporary(path);
        let file = std::fs::File::create(&tmp)?;
        Ok(Pending {
            tmp,
            path: path.to_path_buf(),
            file: Some(io::BufWriter::new(file)),
        })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        use io::Write;
        self.file.as_mut().expect("not finished").write_all(bytes)
    }

    pub fn finish(mut self) -> io::Result<()> {
        let file = self.file.take().expect("finished once");
        file.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        sync_folder_of(&self.path)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Bytes free for an unprivileged user on the file system holding `path` (or its nearest
/// existing folder), if the OS says.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut at = path;
    while !at.exists() {
        at = at.parent().filter(|p| !p.as_os_str().is_empty())?;
    }
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `stat` a statvfs the call fills.
    match unsafe { libc::statvfs(c.as_ptr(), &mut stat) } {
        0 => Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64)),
        _ => None,
    }
}

/// Flushes a file or a folder to the disk.
pub fn sync(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Flushes the folder holding `path`, so that a rename into it is on the disk.
pub fn sync_folder_of(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync(dir),
        _ => sync(Path::new(".")),
    }
}

/// `a/b.png` -> `a/b.tmp.png`; `a/b` -> `a/b.tmp`.
fn temporary(path: &Path) -> PathBuf {
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => {
            let mut name = stem.to_os_string();
            name.push(".tmp.");
            name.push(ext);
            path.with_file_name(name)
        }
        _ => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(".tmp");
            path.with_file_name(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        write(&path, b"old").unwrap();
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }

    /// A writer that fails leaves the old file as it was and no temporary file behind.
    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        write(&path, b"old").unwrap();
        let err = publish(&path, |tmp| {
            assert_eq!(tmp, dir.path().join("grid.tmp.png"));
            std::fs::write(tmp, b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Written in pieces: nothing at the path until finished; dropped unfinished, nothing left.
    #[test]
    fn a_pending_file_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.npy");
        let mut p = Pending::create(&path).unwrap();
        p.write_all(b"ab").unwrap();
        p.write_all(b"cd").unwrap();
        assert!(!path.exists());
        p.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcd");
        let mut q = Pending::create(&dir.path().join("other.npy")).unwrap();
        q.write_all(b"half").unwrap();
        drop(q);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(free_bytes(&dir.path().join("no/such/folder")).unwrap() > 0);
    }

    #[test]
    fn temporary_names_keep_the_extension() {
        assert_eq!(temporary(Path::new("a/b.png")), Path::new("a/b.tmp.png"));
        assert_eq!(temporary(Path::new("a/b")), Path::new("a/b.tmp"));
        assert_eq!(temporary(Path::new("x.tar.gz")), Path::new("x.tar.tmp.gz"));
    }
}
