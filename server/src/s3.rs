//! The S3-compatible blob store (`--blob-url s3://bucket/prefix`) through
//! the `object_store` crate: AWS S3, MinIO, Ceph, R2 and the like. The
//! endpoint, region and credentials come from the usual `AWS_*` environment
//! variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true` for a plain-HTTP
//! endpoint, `AWS_ACCESS_KEY_ID`, ...).

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};
use ulm_core::store::blobs::{checked, BlobStore, RemoteBlobs};
use ulm_core::store::StoreError;

pub struct S3Blobs {
    store: Box<dyn ObjectStore>,
    url: String,
}

fn blob_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound,
        other => StoreError::Blob(other.to_string()),
    }
}

/// The blob store a `--blob-url` names.
pub fn open(url: &str) -> Result<BlobStore, StoreError> {
    Ok(BlobStore::Remote(Arc::new(S3Blobs::from_url(url)?)))
}

impl S3Blobs {
    /// `s3://bucket[/prefix]`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(StoreError::Blob(format!(
                "unsupported blob URL {url:?}: expected s3://bucket/prefix"
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Blob(format!(
                "blob URL {url:?} names no bucket"
            )));
        }
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(blob_error)?;
        let prefix = prefix.trim_matches('/');
        let store: Box<dyn ObjectStore> = if prefix.is_empty() {
            Box::new(s3)
        } else {
            Box::new(PrefixStore::new(s3, checked(prefix)?))
        };
        Ok(Self {
            store,
            url: url.to_string(),
        })
    }
}

impl RemoteBlobs for S3Blobs {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let path = Path::from(key);
            // Keys are content addresses: one already there holds these bytes.
            match self.store.head(&path).await {
                Ok(_) => return Ok(()),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(blob_error(e)),
            }
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(blob_error)?;
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        async move {
            let got = self.store.get(&Path::from(key)).await.map_err(blob_error)?;
            Ok(got.bytes().await.map_err(blob_error)?.to_vec())
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        async move {
            let listed: Vec<_> = self
                .store
                .list(Some(&Path::from(prefix)))
                .try_collect()
                .await
                .map_err(blob_error)?;
            Ok(listed
                .into_iter()
                .filter_map(|meta| {
                    let name = meta
                        .location
                        .as_ref()
                        .strip_prefix(prefix)?
                        .strip_prefix('/')?;
                    (!name.contains('/')).then(|| name.to_string())
                })
                .collect())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s3_urls_name_a_bucket() {
        assert!(S3Blobs::from_url("http://bucket/x").is_err());
        assert!(S3Blobs::from_url("s3:///prefix").is_err());
        assert!(S3Blobs::from_url("s3://bucket/a/../b").is_err());
        assert!(S3Blobs::from_url("s3://bucket/ulm/blobs").is_ok());
    }
}
