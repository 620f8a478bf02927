//! Durable storage of everything served and every piece of feedback.
//!
//! One code path through sqlx's `Any` driver: an SQLite file in the data
//! directory by default (WAL, `synchronous = FULL`), PostgreSQL when a
//! `postgres://` URL is given. Migrations are embedded and portable. Images
//! are content-addressed blobs ([`blobs`]: files under the data directory by
//! default, or a bucket every replica shares), written before the row that
//! names them.

use std::path::Path;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, FromRow, Row};

pub mod blobs;
pub mod jobs;
pub mod training_data;

use crate::record::{usable_logprobs, SampleRecord};
use blobs::BlobStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("a different feedback item was already stored under client id {0}")]
    Conflict(String),
    #[error("job {0} is already queued or running")]
    JobActive(String),
    #[error("the trigger {0} already started its job")]
    TriggerFired(String),
    #[error("job {0} has already finished")]
    JobFinished(String),
    #[error("the sample {0} does not exist")]
    UnknownSample(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("file error: {0}")]
    Io(#[from] std::io::Error),
    #[error("blob storage error: {0}")]
    Blob(String),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Feedback scores lie in `[-MAX_FEEDBACK_SCORE, MAX_FEEDBACK_SCORE]`:
/// rewards stay in a range where GRPO's arithmetic is sound.
pub const MAX_FEEDBACK_SCORE: f64 = 1000.0;

/// One feedback item, as stored (a row of `feedback`, by column name).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FeedbackRecord {
    pub id: String,
    pub client_id: Option<String>,
    pub body_sha256: String,
    pub sample_id: String,
    pub key: String,
    pub score: Option<f64>,
    pub value: Option<String>,
    pub comment: Option<String>,
    pub correction: Option<String>,
    pub source: String,
    pub user_id: Option<String>,
    pub created_at: i64,
}

/// How a feedback insert ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackOutcome {
    Created(FeedbackRecord),
    /// The same client id with the same body was stored before.
    Replayed(FeedbackRecord),
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    blobs: BlobStore,
    /// PostgreSQL, where claims can skip rows other workers hold.
    postgres: bool,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// An enum stored by name in `column`.
fn parse_name<T: std::str::FromStr>(column: &str, value: &str) -> Result<T, StoreError> {
    value
        .parse()
        .map_err(|_| corrupt(column, format!("unknown value {value:?}")))
}

impl Store {
    /// Opens (and migrates) the database. Without a URL: `data_dir/ulm.sqlite`.
    /// Blobs go to `blobs`, or under `data_dir` when it is none.
    pub async fn open(
        data_dir: &Path,
        database_url: Option<&str>,
        blobs: Option<BlobStore>,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(data_dir)?;
        let blobs = blobs.unwrap_or_else(|| BlobStore::local(data_dir));
        let url = match database_url {
            Some(url) => url.to_string(),
            None => format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("ulm.sqlite").display()
            ),
        };
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // Durable on acknowledgement, concurrent readers, wait on locks.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            blobs,
            postgres: !sqlite,
        })
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// A transaction that writes. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so that it waits its turn behind other writers
    /// instead of failing "database is locked" when a read turns into a write.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(if self.postgres {
            self.pool.begin().await?
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        })
    }

    /// Database reachable.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Stores PNG bytes under their hash (idempotent) and returns the hash.
    pub async fn put_image(&self, png: Vec<u8>) -> Result<String, StoreError> {
        let sha = sha256_hex(&png);
        self.blobs.put(&image_key(&sha), png).await?;
        Ok(sha)
    }

    pub async fn get_image(&self, sha: &str) -> Result<Vec<u8>, StoreError> {
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NotFound);
        }
        self.blobs.get(&image_key(sha)).await
    }

    /// Inserts the samples of one request in one transaction.
    pub async fn insert_samples(&self, samples: &[SampleRecord]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for s in samples {
            sqlx::query(
                "INSERT INTO samples (id, request_id, group_index, task, model_version, prompt, input_image_sha256, \
                 params, seed, output_text, output_image_sha256, token_ids, logprobs, guided_logprobs, finish_reason, \
                 queue_ms, compute_ms, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
            )
            .bind(&s.id)
            .bind(&s.request_id)
            .bind(s.group_index)
            .bind(s.task.as_str())
            .bind(&s.model_version)
            .bind(&s.prompt)
            .bind(s.input_image_sha256.clone())
            .bind(serde_json::to_string(&s.params).unwrap_or_default())
            .bind(s.seed)
            .bind(s.output_text.clone())
            .bind(s.output_image_sha256.clone())
            .bind(serde_json::to_string(&s.token_ids).unwrap_or_default())
            .bind(serde_json::to_string(&usable_logprobs(&s.logprobs)).unwrap_or_default())
            .bind(serde_json::to_string(&usable_logprobs(&s.guided_logprobs)).unwrap_or_default())
            .bind(s.finish_reason.map(|f| f.as_str()))
            .bind(s.queue_ms)
            .bind(s.compute_ms)
            .bind(s.created_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_sample(&self, id: &str) -> Result<SampleRecord, StoreError> {
        let row = sqlx::query(&format!("{SAMPLE_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        sample_from_row(&row)
    }

    /// Stores the feedback items of one request in one transaction: all of
    /// them or none. With a client id an item is idempotent: the same body
    /// again is the stored item (replayed), a different body is a conflict,
    /// which stores nothing of the request.
    pub async fn insert_feedback(
        &self,
        items: &[FeedbackRecord],
    ) -> Result<Vec<FeedbackOutcome>, StoreError> {
        match self.try_insert_feedback(items).await {
            // A concurrent request stored the same client id first: once
            // more, now seeing its row.
            Err(StoreError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                self.try_insert_feedback(items).await
            }
            other => other,
        }
    }

    async fn try_insert_feedback(
        &self,
        items: &[FeedbackRecord],
    ) -> Result<Vec<FeedbackOutcome>, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            if let Some(client_id) = &item.client_id {
                let existing = sqlx::query(&format!("{FEEDBACK_SELECT} WHERE client_id = $1"))
                    .bind(client_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = existing {
                    outcomes.push(replay_or_conflict(feedback_from_row(&row)?, item)?);
                    continue;
                }
            }
            let known = sqlx::query("SELECT 1 FROM samples WHERE id = $1")
                .bind(&item.sample_id)
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_none() {
                return Err(StoreError::UnknownSample(item.sample_id.clone()));
            }
            sqlx::query(
                "INSERT INTO feedback (id, client_id, body_sha256, sample_id, key, score, value, comment, correction, \
                 source, user_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&item.id)
            .bind(item.client_id.clone())
            .bind(&item.body_sha256)
            .bind(&item.sample_id)
            .bind(&item.key)
            .bind(item.score)
            .bind(item.value.clone())
            .bind(item.comment.clone())
            .bind(item.correction.clone())
            .bind(&item.source)
            .bind(item.user_id.clone())
            .bind(item.created_at)
            .execute(&mut *tx)
            .await?;
            outcomes.push(FeedbackOutcome::Created(item.clone()));
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    pub async fn feedback_for_sample(
        &self,
        sample_id: &str,
    ) -> Result<Vec<FeedbackRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{FEEDBACK_SELECT} WHERE sample_id = $1 ORDER BY created_at, id"
        ))
        .bind(sample_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(feedback_from_row).collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `images/ab/abcd....png`: the layout image files always had under the data directory.
fn image_key(sha: &str) -> String {
    format!("images/{}/{sha}.png", &sha[..2])
}

const SAMPLE_SELECT: &str =
    "SELECT id, request_id, group_index, task, model_version, prompt, input_image_sha256, params, seed, \
     output_text, output_image_sha256, token_ids, logprobs, guided_logprobs, finish_reason, queue_ms, \
     compute_ms, created_at FROM samples";

const FEEDBACK_SELECT: &str =
    "SELECT id, client_id, body_sha256, sample_id, key, score, value, comment, correction, \
                               source, user_id, created_at FROM feedback";

fn replay_or_conflict(
    existing: FeedbackRecord,
    item: &FeedbackRecord,
) -> Result<FeedbackOutcome, StoreError> {
    if existing.body_sha256 == item.body_sha256 {
        Ok(FeedbackOutcome::Replayed(existing))
    } else {
        Err(StoreError::Conflict(
            item.client_id.clone().unwrap_or_default(),
        ))
    }
}

fn sample_from_row(row: &AnyRow) -> Result<SampleRecord, StoreError> {
    let task: String = row.try_get("task")?;
    let finish_reason: Option<String> = row.try_get("finish_reason")?;
    let params: String = row.try_get("params")?;
    let token_ids: String = row.try_get("token_ids")?;
    let logprobs: String = row.try_get("logprobs")?;
    let guided_logprobs: String = row.try_get("guided_logprobs")?;
    Ok(SampleRecord {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        group_index: row.try_get("group_index")?,
        task: parse_name("task", &task)?,
        model_version: row.try_get("model_version")?,
        prompt: row.try_get("prompt")?,
        input_image_sha256: row.try_get("input_image_sha256")?,
        params: serde_json::from_str(&params).map_err(|e| corrupt("params", e))?,
        seed: row.try_get("seed")?,
        output_text: row.try_get("output_text")?,
        output_image_sha256: row.try_get("output_image_sha256")?,
        token_ids: serde_json::from_str(&token_ids).map_err(|e| corrupt("token_ids", e))?,
        logprobs: read_logprobs("logprobs", &logprobs)?,
        guided_logprobs: read_logprobs("guided_logprobs", &guided_logprobs)?,
        finish_reason: finish_reason
            .map(|f| parse_name("finish_reason", &f))
            .transpose()?,
        queue_ms: row.try_get("queue_ms")?,
        compute_ms: row.try_get("compute_ms")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Stored log-probs. Rows written before non-finite values were refused
/// hold `null` for them: such a sample has no usable log-probs.
fn read_logprobs(column: &str, text: &str) -> Result<Vec<f32>, StoreError> {
    let values: Vec<Option<f32>> = serde_json::from_str(text).map_err(|e| corrupt(column, e))?;
    Ok(values
        .into_iter()
        .collect::<Option<Vec<f32>>>()
        .unwrap_or_default())
}

fn feedback_from_row(row: &AnyRow) -> Result<FeedbackRecord, StoreError> {
    Ok(FeedbackRecord::from_row(row)?)
}
