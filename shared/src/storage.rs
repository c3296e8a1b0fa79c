//! The object store (`object_store`): files of every job under one root, local files by
//! default, `memory://` for tests; and the layout of a job's objects.
//!
//! DuckDB reads and writes local files, so the table code asks for a local path: a file
//! store hands out the object's own path, other stores go through a scratch directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::messages::ShardKey;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("store url {url:?} is not supported: use file:///dir, a directory path or memory://")]
    UnsupportedUrl { url: String },
    #[error("store {url:?} could not be opened: {source}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("object {key:?}: {source}")]
    Object {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("object key {key:?} is invalid: {source}")]
    Key {
        key: String,
        #[source]
        source: object_store::path::Error,
    },
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("local file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configured object store.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The root directory when the store is the local file system.
    local_root: Option<PathBuf>,
    url: String,
}

impl Store {
    /// Opens `file:///abs/dir`, a plain directory path (made absolute) or `memory://`.
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        if url == "memory://" || url == "memory:" {
            return Ok(Self {
                inner: Arc::new(InMemory::new()),
                local_root: None,
                url: url.into(),
            });
        }
        let dir = if let Some(rest) = url.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if url.contains("://") {
            return Err(StorageError::UnsupportedUrl { url: url.into() });
        } else {
            PathBuf::from(url)
        };
        let dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .map_err(|source| StorageError::Io {
                    path: dir.clone(),
                    source,
                })?
                .join(dir)
        };
        std::fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
            path: dir.clone(),
            source,
        })?;
        let local =
            LocalFileSystem::new_with_prefix(&dir).map_err(|source| StorageError::Open {
                url: url.into(),
                source,
            })?;
        Ok(Self {
            inner: Arc::new(local),
            local_root: Some(dir),
            url: url.into(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.clone()
    }

    /// The object's path on disk, when the store is the local file system.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key))
    }

    fn path(key: &str) -> Result<ObjectPath, StorageError> {
        ObjectPath::parse(key).map_err(|source| StorageError::Key {
            key: key.into(),
            source,
        })
    }

    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.inner
            .put(&Self::path(key)?, PutPayload::from(bytes))
            .await
            .map_err(|source| StorageError::Object {
                key: key.into(),
                source,
            })?;
        Ok(())
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StorageError> {
        let result = self
            .inner
            .get(&Self::path(key)?)
            .await
            .map_err(|source| match source {
                object_store::Error::NotFound { .. } => StorageError::NotFound { key: key.into() },
                source => StorageError::Object {
                    key: key.into(),
                    source,
                },
            })?;
        result.bytes().await.map_err(|source| StorageError::Object {
            key: key.into(),
            source,
        })
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match self.inner.head(&Self::path(key)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(StorageError::Object {
                key: key.into(),
                source,
            }),
        }
    }

    /// A local file holding the object: its own path on a file store, else a download into
    /// `scratch`.
    pub async fn fetch_local(&self, key: &str, scratch: &Path) -> Result<PathBuf, StorageError> {
        if let Some(path) = self.local_path(key) {
            if !path.exists() {
                return Err(StorageError::NotFound { key: key.into() });
            }
            return Ok(path);
        }
        let bytes = self.get_bytes(key).await?;
        let path = scratch.join(key.replace('/', "_"));
        tokio::fs::write(&path, &bytes)
            .await
            .map_err(|source| StorageError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Where to write a file that is to become object `key`: the object's own path on a file
    /// store (parents created), else a file in `scratch` to hand to [`Store::commit_local`].
    pub fn local_target(&self, key: &str, scratch: &Path) -> Result<PathBuf, StorageError> {
        if let Some(path) = self.local_path(key) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| StorageError::Io {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            return Ok(path);
        }
        Ok(scratch.join(key.replace('/', "_")))
    }

    /// Makes the file written at a [`Store::local_target`] the object `key`.
    pub async fn commit_local(&self, key: &str, written: &Path) -> Result<(), StorageError> {
        if self.local_path(key).as_deref() == Some(written) {
            return Ok(());
        }
        let bytes = tokio::fs::read(written)
            .await
            .map_err(|source| StorageError::Io {
                path: written.to_owned(),
                source,
            })?;
        self.put_bytes(key, Bytes::from(bytes)).await
    }
}

/// Where a job's objects live (DESIGN.md §3).
pub mod layout {
    use super::ShardKey;

    pub fn job_dir(job_id: &str) -> String {
        format!("jobs/{job_id}")
    }
    pub fn indexed(job_id: &str) -> String {
        format!("jobs/{job_id}/input.indexed.parquet")
    }
    pub fn requests(key: &ShardKey) -> String {
        format!("jobs/{}/requests/{}.jsonl", key.job_id, key.file_stem())
    }
    pub fn results_output(key: &ShardKey) -> String {
        format!(
            "jobs/{}/results/{}.output.jsonl",
            key.job_id,
            key.file_stem()
        )
    }
    pub fn results_errors(key: &ShardKey) -> String {
        format!(
            "jobs/{}/results/{}.errors.jsonl",
            key.job_id,
            key.file_stem()
        )
    }
    pub fn duplicates(job_id: &str) -> String {
        format!("jobs/{job_id}/duplicates.parquet")
    }
    pub fn rows(key: &ShardKey) -> String {
        format!("jobs/{}/rows/{}.parquet", key.job_id, key.file_stem())
    }
    pub fn output(job_id: &str, file: &str) -> String {
        format!("jobs/{job_id}/output/{file}")
    }
    pub fn upload(job_id: &str, file_name: &str) -> String {
        format!("inputs/{job_id}/{file_name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_and_exposes_local_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::from_url(&format!("file://{}", dir.path().display())).expect("store");
        store
            .put_bytes("jobs/j/a.txt", Bytes::from_static(b"hello"))
            .await
            .expect("put");
        assert_eq!(
            store.get_bytes("jobs/j/a.txt").await.expect("get"),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            std::fs::read(dir.path().join("jobs/j/a.txt")).expect("read"),
            b"hello"
        );
        assert!(matches!(
            store.get_bytes("nope").await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(Store::from_url("ftp://x").is_err());
    }
}
