//! The model registry: the base model and every promoted version (LoRA
//! adapters over the base, saved under `data_dir/versions/<id>`), which one
//! is active, and activation (promotion or rollback) by swapping the
//! engine's serving model between batches.

use std::path::PathBuf;
use std::sync::Arc;

use ulm_model::bundle::ModelBundle;
use ulm_rl::{lora, RlError};

use crate::engine::{Engine, ServingModel};
use crate::store::jobs::VersionRecord;
use crate::store::{Store, StoreError};

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
    versions_dir: PathBuf,
    /// Activations (promotions, rollbacks) one at a time.
    switching: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Records the base version, then serves the active version if it is
    /// another one. A version that no longer loads leaves the base served,
    /// with an error in the log.
    pub async fn open(
        store: Store,
        engine: Engine,
        base: ModelBundle,
        base_version: String,
        data_dir: &std::path::Path,
    ) -> Result<Self, RegistryError> {
        store.ensure_base_version(&base_version).await?;
        let registry = Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                engine,
                base,
                versions_dir: data_dir.join("versions"),
                switching: tokio::sync::Mutex::new(()),
            }),
        };
        let active = store.active_version().await?;
        match active {
            Some(id) if id != base_version => {
                if let Err(error) = registry.activate(&id).await {
                    tracing::error!(%error, version = %id, "the active version does not load; serving the base model");
                    store.set_active_version(&base_version).await?;
                }
            }
            Some(_) => {}
            None => store.set_active_version(&base_version).await?,
        }
        Ok(registry)
    }

    pub fn base(&self) -> &ModelBundle {
        &self.inner.base
    }

    /// Where a version's adapters live.
    pub fn checkpoint_dir(&self, version: &str) -> PathBuf {
        self.inner.versions_dir.join(version)
    }

    /// The id the next promoted version gets: `v1`, `v2`, ...
    pub async fn next_version_id(&self) -> Result<String, StoreError> {
        let mut n = self.inner.store.version_count().await?;
        loop {
            let id = format!("v{n}");
            match self.inner.store.get_version(&id).await {
                Err(StoreError::NotFound) if !self.checkpoint_dir(&id).exists() => return Ok(id),
                Err(StoreError::NotFound) | Ok(_) => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The serving model of a version: the base plus its adapters.
    pub fn load(&self, version: &VersionRecord) -> Result<ServingModel, RlError> {
        let mut model = self.inner.base.model.clone();
        if let Some(dir) = &version.checkpoint_path {
            let device = model.device().clone();
            lora::load_for_inference(&mut model, std::path::Path::new(dir), &device)?;
        }
        Ok(ServingModel {
            version: version.id.clone(),
            model,
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
        let registry = self.clone();
        let to_load = record.clone();
        let serving = tokio::task::spawn_blocking(move || registry.load(&to_load))
            .await
            .map_err(|source| RegistryError::Thread {
                version: version.to_string(),
                source,
            })?
            .map_err(|source| RegistryError::Load {
                version: version.to_string(),
                source,
            })?;
        self.inner.store.set_active_version(version).await?;
        self.inner.engine.activate(serving);
        Ok(record)
    }

    /// Records a promoted version (its checkpoint already on disk), makes it
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
