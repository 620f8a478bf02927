//! Blob storage: images and adapter checkpoints, by key. A local directory
//! by default (files written atomically: temporary file, fsync, rename), or
//! a remote store shared by every replica and worker (the server plugs in
//! an S3-compatible one: this crate speaks no HTTP). Blobs are
//! content-addressed by their callers and written before the database row
//! that names them, so a blob is never replaced by different bytes and a
//! row never names a missing blob.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;

use super::StoreError;

/// A store of blobs on other machines. Keys reach it checked (see
/// [`BlobStore`]); a missing blob is [`StoreError::NotFound`].
pub trait RemoteBlobs: Send + Sync {
    /// Stores `bytes` under `key`, leaving a key already present as it is.
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, StoreError>>;
    /// The names of the blobs directly under `prefix/`.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
    /// Where the blobs live, for logs.
    fn describe(&self) -> String;
}

#[derive(Clone)]
pub enum BlobStore {
    Local { root: PathBuf },
    Remote(Arc<dyn RemoteBlobs>),
}

/// Keys are made by the server (hashes, fixed names), never by clients;
/// refusing anything else keeps a key from leaving the local root.
pub fn checked(key: &str) -> Result<&str, StoreError> {
    let fine = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if fine {
        Ok(key)
    } else {
        Err(StoreError::Blob(format!("invalid blob key {key:?}")))
    }
}

impl BlobStore {
    pub fn local(root: &FsPath) -> Self {
        BlobStore::Local {
            root: root.to_path_buf(),
        }
    }

    /// Where blobs live, for logs.
    pub fn describe(&self) -> String {
        match self {
            BlobStore::Local { root } => root.display().to_string(),
            BlobStore::Remote(remote) => remote.describe(),
        }
    }

    /// The blob's file when blobs are local files.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        match self {
            BlobStore::Local { root } => Some(root.join(key)),
            BlobStore::Remote(_) => None,
        }
    }

    /// Stores `bytes` under `key`; a key already present is left as it is
    /// (keys are content addresses).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let key = checked(key)?;
        match self {
            BlobStore::Local { root } => {
                let path = root.join(key);
                tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
                Ok(())
            }
            BlobStore::Remote(remote) => remote.put(key, bytes).await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let key = checked(key)?;
        match self {
            BlobStore::Local { root } => match tokio::fs::read(root.join(key)).await {
                Ok(bytes) => Ok(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound),
                Err(e) => Err(e.into()),
            },
            BlobStore::Remote(remote) => remote.get(key).await,
        }
    }

    /// The names of the blobs directly under `prefix/`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = checked(prefix)?;
        let mut names = match self {
            BlobStore::Local { root } => {
                let dir = root.join(prefix);
                let mut names = Vec::new();
                let mut entries = match tokio::fs::read_dir(&dir).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                    Err(e) => return Err(e.into()),
                };
                while let Some(entry) = entries.next_entry().await? {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if entry.file_type().await?.is_file() && !name.starts_with('.') {
                        names.push(name);
                    }
                }
                names
            }
            BlobStore::Remote(remote) => remote.list(prefix).await?,
        };
        names.sort();
        Ok(names)
    }
}

/// Writes `bytes` to `path` unless it exists: temporary file, fsync,
/// rename, fsync of the directory.
fn write_atomically(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if path.exists() {
        return Ok(());
    }
    let dir = path.parent().expect("blob paths have a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_the_store() {
        for bad in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a b", "a/b/"] {
            assert!(checked(bad).is_err(), "{bad:?}");
        }
        for good in ["images/ab/abc.png", "adapters/0f/adapter.safetensors", "x"] {
            assert_eq!(checked(good).unwrap(), good);
        }
    }

    #[tokio::test]
    async fn local_blobs_are_written_once_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path());
        blobs.put("set/b.bin", vec![2]).await.unwrap();
        blobs.put("set/a.bin", vec![1]).await.unwrap();
        // A key is a content address: a second write keeps the first bytes.
        blobs.put("set/a.bin", vec![9]).await.unwrap();
        assert_eq!(blobs.get("set/a.bin").await.unwrap(), vec![1]);
        assert_eq!(blobs.list("set").await.unwrap(), ["a.bin", "b.bin"]);
        assert!(blobs.list("none").await.unwrap().is_empty());
        assert!(matches!(
            blobs.get("set/c.bin").await,
            Err(StoreError::NotFound)
        ));
    }
}
