//! The object store (`object_store`): files of every job under one root, local files by
//! default, `memory://` for tests; and the layout of a job's objects.
//!
//! DuckDB reads and writes local files, so the table code asks for a local path: a file
//! store hands out the object's own path, other stores go through a scratch directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use tokio::io::AsyncWriteExt;

use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rowsmith_config::{S3Settings, StoreSettings};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "store url {url:?} is not supported: use file:///dir, a directory path, s3://bucket[/prefix] or memory://"
    )]
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

/// A scratch directory of its own under the system's temporary directory (`TMPDIR`), removed
/// when dropped; an error names the directory that refused it.
pub fn scratch_dir() -> Result<tempfile::TempDir, StorageError> {
    tempfile::tempdir().map_err(|source| StorageError::Io {
        path: std::env::temp_dir(),
        source,
    })
}

/// Part size of uploads; files larger than this go up as a multipart upload.
const UPLOAD_PART: usize = 16 * 1024 * 1024;

/// The configured object store.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The root directory when the store is the local file system.
    local_root: Option<PathBuf>,
    url: String,
}

impl Store {
    /// Opens the store of `settings`: see [`Store::from_url`]; `s3://` takes `settings.s3`.
    pub fn open(settings: &StoreSettings) -> Result<Self, StorageError> {
        if settings.url.starts_with("s3://") {
            return Self::s3(&settings.url, &settings.s3);
        }
        Self::from_url(&settings.url)
    }

    /// `s3://bucket[/prefix]`; the endpoint, region, addressing style and credentials from
    /// `s3` over the `AWS_*` environment.
    fn s3(url: &str, s3: &S3Settings) -> Result<Self, StorageError> {
        Ok(Self::s3_with_credentials(url, s3)?.0)
    }

    /// `s3://bucket[/prefix]` as [`Store::open`] opens it, with the credential provider of its
    /// client: what signs other AWS calls (Bedrock's) made with the same credentials.
    pub fn s3_with_credentials(
        url: &str,
        s3: &S3Settings,
    ) -> Result<(Self, object_store::aws::AwsCredentialProvider), StorageError> {
        let rest = url.trim_start_matches("s3://");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StorageError::UnsupportedUrl { url: url.into() });
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let Some(path_style) = s3.path_style {
            builder = builder.with_virtual_hosted_style_request(!path_style);
        }
        if let Some(allow_http) = s3.allow_http {
            builder = builder.with_allow_http(allow_http);
        }
        if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
            use secrecy::ExposeSecret;
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose_secret());
            if let Some(token) = &s3.session_token {
                builder = builder.with_token(token.expose_secret());
            }
        }
        let s3_store = builder.build().map_err(|source| StorageError::Open {
            url: url.into(),
            source,
        })?;
        let credentials = s3_store.credentials().clone();
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3_store)
        } else {
            Arc::new(PrefixStore::new(s3_store, Self::path(prefix)?))
        };
        let store = Self {
            inner,
            local_root: None,
            url: url.into(),
        };
        Ok((store, credentials))
    }

    /// Opens `file:///abs/dir`, a plain directory path (made absolute) or `memory://`.
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        if url.starts_with("s3://") {
            return Self::s3(url, &S3Settings::default());
        }
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

    /// The object's size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64, StorageError> {
        match self.inner.head(&Self::path(key)?).await {
            Ok(meta) => Ok(meta.size),
            Err(source) => Err(Self::read_error(key, source)),
        }
    }

    /// Bytes `range` of the object.
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StorageError> {
        self.inner
            .get_range(&Self::path(key)?, range)
            .await
            .map_err(|source| Self::read_error(key, source))
    }

    /// The object's bytes as they are read, chunk by chunk.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, StorageError>>, StorageError>
    {
        let result = self
            .inner
            .get(&Self::path(key)?)
            .await
            .map_err(|source| Self::read_error(key, source))?;
        let key = key.to_owned();
        Ok(result
            .into_stream()
            .map(move |chunk| chunk.map_err(|source| Self::read_error(&key, source)))
            .boxed())
    }

    fn read_error(key: &str, source: object_store::Error) -> StorageError {
        match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound { key: key.into() },
            source => StorageError::Object {
                key: key.into(),
                source,
            },
        }
    }

    /// The keys of the objects under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let prefix_path = Self::path(prefix.trim_end_matches('/'))?;
        let mut listing = self.inner.list(Some(&prefix_path));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            match meta {
                Ok(meta) => keys.push(meta.location.to_string()),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(source) => {
                    return Err(StorageError::Object {
                        key: prefix.into(),
                        source,
                    });
                }
            }
        }
        keys.sort();
        Ok(keys)
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
        let path = scratch.join(key.replace('/', "_"));
        self.download(key, &path).await?;
        Ok(path)
    }

    /// Streams object `key` into the local file `path`, never holding it in memory.
    pub async fn download(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let object_error = |source| StorageError::Object {
            key: key.into(),
            source,
        };
        let io_error = |source| StorageError::Io {
            path: path.to_owned(),
            source,
        };
        let result = self
            .inner
            .get(&Self::path(key)?)
            .await
            .map_err(|source| match source {
                object_store::Error::NotFound { .. } => StorageError::NotFound { key: key.into() },
                source => object_error(source),
            })?;
        let mut file = tokio::fs::File::create(path).await.map_err(io_error)?;
        let mut chunks = result.into_stream();
        while let Some(chunk) = chunks.next().await {
            file.write_all(&chunk.map_err(object_error)?)
                .await
                .map_err(io_error)?;
        }
        file.flush().await.map_err(io_error)?;
        Ok(())
    }

    /// A writer of object `key` that holds a few parts in memory (multipart upload on
    /// S3 for large objects): the object appears whole at [`ObjectWriter::finish`], and not
    /// at all after [`ObjectWriter::abort`].
    pub fn writer(&self, key: &str) -> Result<ObjectWriter, StorageError> {
        Ok(ObjectWriter {
            key: key.to_owned(),
            // Two parts in flight and one filling: a few parts of memory, however large the
            // object (the default, 8 in flight, holds 128 MiB).
            inner: BufWriter::with_capacity(self.inner.clone(), Self::path(key)?, UPLOAD_PART)
                .with_max_concurrency(2),
        })
    }

    /// Streams the local file `path` into object `key`, in parts (multipart upload on S3)
    /// for large files.
    pub async fn upload(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let io_error = |source| StorageError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let mut writer =
            BufWriter::with_capacity(self.inner.clone(), Self::path(key)?, UPLOAD_PART);
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        let finished = match copied {
            Ok(_) => writer.shutdown().await,
            Err(error) => {
                let _ = writer.abort().await;
                Err(error)
            }
        };
        finished.map_err(|source| StorageError::Object {
            key: key.into(),
            source: object_store::Error::Generic {
                store: "upload",
                source: Box::new(source),
            },
        })
    }

    /// Where to write a file that is to become object `key`: the object's own path on a file
    /// store (parents created), else a file in `scratch` to hand to [`Store::commit_local`].
    pub fn local_target(&self, key: &str, scratch: &Path) -> Result<PathBuf, StorageError> {
        if let Some(root) = &self.local_root {
            // A name of its own beside the store (same file system, so the rename that
            // commits it is atomic), keeping the file's extension for DuckDB. Two writers never
            // share it, and a reader never sees a half-written object.
            let staging = root.join(STAGING_DIR);
            std::fs::create_dir_all(&staging).map_err(|source| StorageError::Io {
                path: staging.clone(),
                source,
            })?;
            let name = key.rsplit('/').next().unwrap_or(key);
            return Ok(staging.join(format!("{}-{name}", nuid::next())));
        }
        Ok(scratch.join(key.replace('/', "_")))
    }

    /// Makes the file written at a [`Store::local_target`] the object `key`: on the file
    /// system a rename into place (atomic), elsewhere an upload. Returns where the object can
    /// be read locally from then on.
    pub async fn commit_local(&self, key: &str, written: &Path) -> Result<PathBuf, StorageError> {
        let staged = self
            .local_root
            .as_ref()
            .is_some_and(|root| written.parent() == Some(root.join(STAGING_DIR).as_path()));
        if let (true, Some(path)) = (staged, self.local_path(key)) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| StorageError::Io {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            std::fs::rename(written, &path).map_err(|source| StorageError::Io {
                path: path.clone(),
                source,
            })?;
            return Ok(path);
        }
        self.upload(key, written).await?;
        Ok(written.to_owned())
    }
}

/// Where files written for the local store wait (under its root) until they are renamed into
/// place; object listings never see it.
const STAGING_DIR: &str = ".staging";

/// Where a job's objects live (DESIGN.md §3): part of the contract, so every service and
/// the CLI agree.
pub use rowsmith_contract::layout;

impl rowsmith_contract::step::Retryable for StorageError {
    /// The store may answer again later.
    fn is_retryable(&self) -> bool {
        true
    }
}

/// See [`Store::writer`].
pub struct ObjectWriter {
    key: String,
    inner: BufWriter,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ObjectWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        let written = self.inner.write_all(chunk).await;
        written.map_err(|source| self.error(source))
    }

    /// Completes the object.
    pub async fn finish(mut self) -> Result<(), StorageError> {
        let finished = self.inner.shutdown().await;
        finished.map_err(|source| self.error(source))
    }

    /// Drops what was written; the object stays as it was.
    pub async fn abort(mut self) {
        if let Err(error) = self.inner.abort().await {
            tracing::warn!(key = %self.key, %error, "could not abort a partial write");
        }
    }

    fn error(&self, source: std::io::Error) -> StorageError {
        StorageError::Object {
            key: self.key.clone(),
            source: object_store::Error::Generic {
                store: "write",
                source: Box::new(source),
            },
        }
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

    #[tokio::test]
    async fn a_writer_makes_the_object_whole_at_finish_and_not_at_all_after_abort() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::from_url(&format!("file://{}", dir.path().display())).expect("store");
        // More than two parts.
        let part: Vec<u8> = (0..UPLOAD_PART).map(|i| (i % 251) as u8).collect();
        let mut writer = store.writer("results/out.jsonl").expect("writer");
        for _ in 0..2 {
            writer.write(&part).await.expect("write");
        }
        writer.write(b"tail").await.expect("write");
        writer.finish().await.expect("finish");
        let stored = store.get_bytes("results/out.jsonl").await.expect("get");
        assert_eq!(stored.len(), 2 * UPLOAD_PART + 4);
        assert_eq!(&stored[UPLOAD_PART..2 * UPLOAD_PART], &part[..]);
        assert!(stored.ends_with(b"tail"));

        let mut cut = store.writer("results/cut.jsonl").expect("writer");
        cut.write(&part).await.expect("write");
        cut.write(&part).await.expect("write");
        cut.abort().await;
        assert!(matches!(
            store.get_bytes("results/cut.jsonl").await,
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(
            store.list("results/").await.expect("list"),
            vec!["results/out.jsonl".to_owned()],
            "nothing of the aborted write is left"
        );
    }

    #[tokio::test]
    async fn local_writes_get_names_of_their_own_and_appear_whole_on_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::from_url(&format!("file://{}", dir.path().display())).expect("store");
        let key = "jobs/j/output/enriched.csv";
        store
            .put_bytes(key, Bytes::from_static(b"old, complete\n"))
            .await
            .expect("put");
        // Two writers of one object (two finalizes) never share a file.
        let first = store.local_target(key, dir.path()).expect("target");
        let second = store.local_target(key, dir.path()).expect("target");
        assert_ne!(first, second);
        assert_ne!(Some(first.clone()), store.local_path(key));
        assert_eq!(first.extension(), Some(std::ffi::OsStr::new("csv")));
        std::fs::write(&first, b"new, half").expect("write");
        // Half-written: readers still see the old object whole, listings see no staged file.
        assert_eq!(
            store.get_bytes(key).await.expect("get"),
            Bytes::from_static(b"old, complete\n")
        );
        assert_eq!(
            store.list("jobs/").await.expect("list"),
            vec![key.to_owned()]
        );
        std::fs::write(&first, b"new, complete\n").expect("write");
        store.commit_local(key, &first).await.expect("commit");
        assert_eq!(
            store.get_bytes(key).await.expect("get"),
            Bytes::from_static(b"new, complete\n")
        );
        assert!(!first.exists(), "renamed into place");
    }
}
