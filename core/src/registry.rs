//! The model registry: the base model and every promoted version (LoRA
//! adapters over the base, content-addressed blobs under `adapters/<hash>/`
//! in the blob store), which one is active, and activation (promotion or
//! rollback) by swapping the engine's serving model between batches. The
//! active version is a row every process shares: each one follows it, so a
//! promotion or an activation anywhere is served everywhere within a poll.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ulm_model::bundle::ModelBundle;
use ulm_rl::{lora, RlError};

use crate::engine::{Engine, ServingModel};
use crate::store::jobs::VersionRecord;
use crate::store::{sha256_hex, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no model version {0}")]
    UnknownVersion(String),
    #[error("version {version} cannot be loaded: {source}")]
    Load { version: String, source: RlError },
    #[error("loading version {version} stopped: {source}")]
    Thread {
        version: String,
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    engine: Engine,
    /// The base weights; every version shares their storage.
    base: ModelBundle,
    /// Local copies of checkpoints kept in a remote blob store, and
    /// checkpoints being written before they are published.
    cache_dir: PathBuf,
    /// Activations (promotions, rollbacks, following) one at a time.
    switching: tokio::sync::Mutex<()>,
    /// The last failure to follow the active version, logged once.
    follow_error: Mutex<Option<String>>,
}

impl Registry {
    /// Records the base version, then serves the active version if it is
    /// another one. A version that does not load leaves the base served
    /// here, with an error in the log, and [`Self::follow`] tries again.
    pub async fn open(
        store: Store,
        engine: Engine,
        base: ModelBundle,
        base_version: String,
        data_dir: &Path,
    ) -> Result<Self, RegistryError> {
        store.ensure_base_version(&base_version).await?;
        let registry = Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                engine,
                base,
                cache_dir: data_dir.join("cache"),
                switching: tokio::sync::Mutex::new(()),
                follow_error: Mutex::new(None),
            }),
        };
        if store.active_version().await?.is_none() {
            store.set_active_version(&base_version).await?;
        }
        registry.sync_active().await;
        Ok(registry)
    }

    /// Serves whatever version is active in the store, checking every
    /// `poll`: promotions and activations made by other processes.
    pub fn follow(&self, poll: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                this.sync_active().await;
            }
        })
    }

    /// Swaps in the active version if another one is served here.
    async fn sync_active(&self) {
        let outcome = self.try_sync_active().await;
        let Ok(mut last) = self.inner.follow_error.lock() else {
            return;
        };
        match outcome {
            Ok(Some(version)) => {
                tracing::info!(version, "serving the version made active in the store");
                *last = None;
            }
            Ok(None) => *last = None,
            Err(error) => {
                let message = error.to_string();
                if last.as_deref() != Some(message.as_str()) {
                    tracing::error!(%error, "the active version does not load; serving the previous one");
                    *last = Some(message);
                }
            }
        }
    }

    /// The version swapped in, if any.
    async fn try_sync_active(&self) -> Result<Option<String>, RegistryError> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let Some(active) = self.inner.store.active_version().await? else {
            return Ok(None);
        };
        if active == self.inner.engine.serving().version {
            return Ok(None);
        }
        let record = self.inner.store.get_version(&active).await?;
        let serving = self.load(&record).await?;
        self.inner.engine.activate(serving);
        Ok(Some(active))
    }

    pub fn base(&self) -> &ModelBundle {
        &self.inner.base
    }

    /// A fresh local directory for a checkpoint being written, before
    /// [`Self::publish`].
    pub fn staging_dir(&self, name: &str) -> PathBuf {
        self.inner
            .cache_dir
            .join("staging")
            .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Stores the checkpoint in the staging directory `dir` in the blob
    /// store, content-addressed: `adapters/<hash of its files>`, the key a
    /// version row names. `dir` is used up: with a remote store it becomes
    /// the local copy [`Self::checkpoint_dir`] would otherwise download.
    pub async fn publish(&self, dir: &Path) -> Result<String, RegistryError> {
        let published = self.upload(dir).await;
        let cache = match &published {
            Ok(key) if self.inner.store.blobs().local_path(key).is_none() => {
                Some(self.inner.cache_dir.join(key))
            }
            _ => None,
        };
        let kept = match cache {
            Some(cache) => self.keep_in_cache(dir, &cache).await,
            None => false,
        };
        if !kept {
            if let Err(error) = tokio::fs::remove_dir_all(dir).await {
                tracing::warn!(dir = %dir.display(), %error, "removing a staged checkpoint failed");
            }
        }
        published
    }

    /// Moves the complete checkpoint `dir` to `cache`; false when it stays
    /// where it is (a copy is already cached, or the move failed).
    async fn keep_in_cache(&self, dir: &Path, cache: &Path) -> bool {
        if cache.exists() {
            return false;
        }
        if let Some(parent) = cache.parent() {
            if tokio::fs::create_dir_all(parent).await.is_err() {
                return false;
            }
        }
        tokio::fs::rename(dir, cache).await.is_ok()
    }

    async fn upload(&self, dir: &Path) -> Result<String, RegistryError> {
        let mut files = Vec::new();
        let mut entries = tokio::fs::read_dir(dir).await.map_err(StoreError::Io)?;
        while let Some(entry) = entries.next_entry().await.map_err(StoreError::Io)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = tokio::fs::read(entry.path())
                .await
                .map_err(StoreError::Io)?;
            files.push((name, bytes));
        }
        files.sort();
        let mut manifest = String::new();
        for (name, bytes) in &files {
            manifest.push_str(&format!("{name} {}\n", sha256_hex(bytes)));
        }
        let key = format!("adapters/{}", sha256_hex(manifest.as_bytes()));
        let blobs = self.inner.store.blobs();
        for (name, bytes) in files {
            blobs.put(&format!("{key}/{name}"), bytes).await?;
        }
        Ok(key)
    }

    /// A local directory holding the checkpoint a version row names: the
    /// blob store's own files when blobs are local, else a cached copy.
    /// Rows written before blob storage name an absolute directory.
    pub async fn checkpoint_dir(&self, checkpoint: &str) -> Result<PathBuf, RegistryError> {
        if Path::new(checkpoint).is_absolute() {
            return Ok(PathBuf::from(checkpoint));
        }
        let blobs = self.inner.store.blobs();
        if let Some(path) = blobs.local_path(checkpoint) {
            return Ok(path);
        }
        let dir = self.inner.cache_dir.join(checkpoint);
        if dir.exists() {
            return Ok(dir);
        }
        let names = blobs.list(checkpoint).await?;
        if names.is_empty() {
            return Err(StoreError::NotFound.into());
        }
        let tmp = self.staging_dir("download");
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(StoreError::Io)?;
        for name in names {
            let bytes = blobs.get(&format!("{checkpoint}/{name}")).await?;
            tokio::fs::write(tmp.join(&name), bytes)
                .await
                .map_err(StoreError::Io)?;
        }
        // A copy made meanwhile by another load holds the same bytes.
        if !self.keep_in_cache(&tmp, &dir).await {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            if !dir.exists() {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "caching {checkpoint} in {} failed",
                    dir.display()
                )))
                .into());
            }
        }
        Ok(dir)
    }

    /// The id the next promoted version gets: `v1`, `v2`, ...
    pub async fn next_version_id(&self) -> Result<String, StoreError> {
        let mut n = self.inner.store.version_count().await?;
        loop {
            let id = format!("v{n}");
            match self.inner.store.get_version(&id).await {
                Err(StoreError::NotFound) => return Ok(id),
                Ok(_) => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The serving model of a version: the base plus its adapters.
    pub async fn load(&self, version: &VersionRecord) -> Result<ServingModel, RegistryError> {
        let dir = match &version.checkpoint_path {
            Some(checkpoint) => Some(self.checkpoint_dir(checkpoint).await?),
            None => None,
        };
        let mut model = self.inner.base.model.clone();
        let id = version.id.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = dir {
                let device = model.device().clone();
                lora::load_for_inference(&mut model, &dir, &device)?;
            }
            Ok(ServingModel { version: id, model })
        })
        .await
        .map_err(|source| RegistryError::Thread {
            version: version.id.clone(),
            source,
        })?
        .map_err(|source| RegistryError::Load {
            version: version.id.clone(),
            source,
        })
    }

    /// Serves `version` from the next batch on and records it as active.
    pub async fn activate(&self, version: &str) -> Result<VersionRecord, RegistryError> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let record = match self.inner.store.get_version(version).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => {
                return Err(RegistryError::UnknownVersion(version.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let serving = self.load(&record).await?;
        self.inner.store.set_active_version(version).await?;
        self.inner.engine.activate(serving);
        Ok(record)
    }

    /// Records a promoted version (its checkpoint already published), makes it
    /// active and marks its job promoted in one transaction, then serves it.
    pub async fn promote(
        &self,
        record: &VersionRecord,
        evaluation: &serde_json::Value,
        serving: ServingModel,
    ) -> Result<(), StoreError> {
        let _one_at_a_time = self.inner.switching.lock().await;
        self.inner.store.promote(record, evaluation).await?;
        self.inner.engine.activate(serving);
        Ok(())
    }

    /// The version being served now.
    pub fn serving(&self) -> Arc<ServingModel> {
        self.inner.engine.serving()
    }
}
