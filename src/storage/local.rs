//! `local://` storage: a directory, as BR's local storage (a shared mount in practice).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ExternalStorage;
use crate::error::{Error, Result};

pub struct LocalStorage {
    root: PathBuf,
    url: String,
}

impl LocalStorage {
    pub fn new(path: &str) -> Result<LocalStorage> {
        if path.is_empty() {
            return Err(Error::Storage { url: "local://".into(), reason: "the backend has no path".into() });
        }
        Ok(LocalStorage { root: PathBuf::from(path), url: format!("local://{path}") })
    }

    fn error(&self, what: String, e: std::io::Error) -> Error {
        Error::Storage { url: self.url.clone(), reason: format!("{what}: {e}") }
    }

    /// Writes a temporary file beside the target, syncs it and renames it over the target,
    /// so a reader (or a crash) never sees a torn 8 bytes.
    fn replace(&self, target: &Path, data: &[u8]) -> std::io::Result<()> {
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut temp = target.as_os_str().to_owned();
        temp.push(format!(".tmp.{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let written = fs::File::create(&temp).and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        });
        let renamed = written.and_then(|()| fs::rename(&temp, target));
        if renamed.is_err() {
            let _ = fs::remove_file(&temp);
        }
        renamed
    }
}

/// Local I/O has no deadline of its own; the copier's worker thread is what keeps a hung
/// mount away from the ticker.
impl ExternalStorage for LocalStorage {
    fn write(&self, name: &str, data: &[u8], _timeout: Duration) -> Result<()> {
        let target = self.root.join(name);
        self.replace(&target, data).map_err(|e| self.error(format!("writing {}", target.display()), e))
    }

    fn read(&self, name: &str, _timeout: Duration) -> Result<Option<Vec<u8>>> {
        let target = self.root.join(name);
        match fs::read(&target) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(format!("reading {}", target.display()), e)),
        }
    }

    fn url(&self) -> &str {
        &self.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_names_the_path_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().to_str().unwrap()).unwrap();
        let t = Duration::from_secs(1);
        storage.write("a/b.ts", b"12345678", t).unwrap();
        storage.write("a/b.ts", b"87654321", t).unwrap();
        assert_eq!(storage.read("a/b.ts", t).unwrap().unwrap(), b"87654321");
        let names: Vec<_> = fs::read_dir(dir.path().join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["b.ts"], "no temporary file is left behind");

        // A root that is a file: the directory cannot be created.
        let file = dir.path().join("plain");
        fs::write(&file, b"").unwrap();
        let storage = LocalStorage::new(file.to_str().unwrap()).unwrap();
        let err = storage.write("v1/x.ts", b"1", t).unwrap_err().to_string();
        assert!(err.contains(&format!("local://{}", file.display())) && err.contains("writing"), "{err}");
        assert!(LocalStorage::new("").is_err());
    }
}
