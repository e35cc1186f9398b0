//! The store chosen by configuration (`[storage] backend`), as one type the agent and the
//! relay can hold without being generic over the adapter.

use std::collections::BTreeMap;

use tokio::io::AsyncRead;

use super::fs::FsStore;
use super::s3::{S3Credentials, S3Settings, S3Store};
use super::{ListPage, ObjectMeta, ObjectReader, ObjectStore, PutResult, Result};
use crate::config::{Config, StorageBackend};

#[derive(Debug, Clone)]
pub enum AnyStore {
    Fs(FsStore),
    S3(S3Store),
}

impl AnyStore {
    /// Open the configured backend. S3 credentials come from `storage.s3.credentials_file`,
    /// or else from `OUTPOST_S3_ACCESS_KEY_ID` / `OUTPOST_S3_SECRET_ACCESS_KEY` in `env`.
    pub async fn open(config: &Config, env: &BTreeMap<String, String>) -> Result<Self> {
        match config.storage.backend {
            StorageBackend::Fs => Ok(AnyStore::Fs(FsStore::open(config.objects_root()).await?)),
            StorageBackend::S3 => {
                let Some(s3) = &config.storage.s3 else {
                    return Err(super::ObjectStoreError::Config(
                        "storage.backend = \"s3\" needs a [storage.s3] section".into(),
                    ));
                };
                let credentials = match &s3.credentials_file {
                    Some(path) => S3Credentials::from_file(path)?,
                    None => S3Credentials::from_env(env)?,
                };
                Ok(AnyStore::S3(S3Store::new(S3Settings {
                    endpoint: s3.endpoint.clone(),
                    region: s3.region.clone(),
                    bucket: s3.bucket.clone(),
                    credentials,
                })?))
            }
        }
    }
}

impl ObjectStore for AnyStore {
    async fn put<R>(&self, key: &str, body: R) -> Result<PutResult>
    where
        R: AsyncRead + Unpin + Send,
    {
        match self {
            AnyStore::Fs(s) => s.put(key, body).await,
            AnyStore::S3(s) => s.put(key, body).await,
        }
    }

    async fn get(&self, key: &str) -> Result<ObjectReader> {
        match self {
            AnyStore::Fs(s) => s.get(key).await,
            AnyStore::S3(s) => s.get(key).await,
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        match self {
            AnyStore::Fs(s) => s.head(key).await,
            AnyStore::S3(s) => s.head(key).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self {
            AnyStore::Fs(s) => s.delete(key).await,
            AnyStore::S3(s) => s.delete(key).await,
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        match self {
            AnyStore::Fs(s) => s.list(prefix, start_after, limit).await,
            AnyStore::S3(s) => s.list(prefix, start_after, limit).await,
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<ObjectMeta> {
        match self {
            AnyStore::Fs(s) => s.copy(from, to).await,
            AnyStore::S3(s) => s.copy(from, to).await,
        }
    }
}
