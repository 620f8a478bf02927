//! RL jobs, model versions and the active version, plus the queries that
//! gather a job's training data.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    corrupt, feedback_from_row, now_ms, sample_from_row, FeedbackRecord, SampleRecord, Store,
    StoreError, FEEDBACK_SELECT, SAMPLE_SELECT,
};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Evaluating,
    Promoted,
    Rejected,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Evaluating => "evaluating",
            JobStatus::Promoted => "promoted",
            JobStatus::Rejected => "rejected",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Queued, running or evaluating.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobStatus::Queued | JobStatus::Running | JobStatus::Evaluating
        )
    }
}

impl FromStr for JobStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "evaluating" => JobStatus::Evaluating,
            "promoted" => JobStatus::Promoted,
            "rejected" => JobStatus::Rejected,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => return Err(StoreError::Corrupt(format!("unknown job status {other}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub status: JobStatus,
    /// `api`, `timer` or `feedback`.
    pub trigger: String,
    pub config: serde_json::Value,
    pub parent_version: Option<String>,
    pub candidate_version: Option<String>,
    pub data_counts: Option<serde_json::Value>,
    pub metrics: Option<serde_json::Value>,
    pub evaluation: Option<serde_json::Value>,
    pub error: Option<String>,
    pub steps_done: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub id: String,
    pub parent: Option<String>,
    pub job_id: Option<String>,
    /// Adapter checkpoint directory; none for the base model.
    pub checkpoint_path: Option<String>,
    pub metrics: serde_json::Value,
    pub created_at: i64,
}

/// A stored sample with the feedback it received.
#[derive(Debug, Clone)]
pub struct RatedSample {
    pub sample: SampleRecord,
    /// Numeric scores, by feedback key.
    pub scores: Vec<(String, f64)>,
    /// Reference answers given as corrections.
    pub corrections: Vec<String>,
}

const JOB_SELECT: &str = "SELECT id, status, trigger_reason, config, parent_version, candidate_version, \
    data_counts, metrics, evaluation, error, steps_done, created_at, started_at, finished_at FROM rl_jobs";
const VERSION_SELECT: &str =
    "SELECT id, parent, job_id, checkpoint_path, metrics, created_at FROM model_versions";
const ACTIVE_KEY: &str = "active_version";

fn json_opt(row: &AnyRow, col: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(col, e)))
        .transpose()
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let status: String = row.try_get("status")?;
    let config: String = row.try_get("config")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        status: status.parse()?,
        trigger: row.try_get("trigger_reason")?,
        config: serde_json::from_str(&config).map_err(|e| corrupt("config", e))?,
        parent_version: row.try_get("parent_version")?,
        candidate_version: row.try_get("candidate_version")?,
        data_counts: json_opt(row, "data_counts")?,
        metrics: json_opt(row, "metrics")?,
        evaluation: json_opt(row, "evaluation")?,
        error: row.try_get("error")?,
        steps_done: row.try_get("steps_done")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn version_from_row(row: &AnyRow) -> Result<VersionRecord, StoreError> {
    Ok(VersionRecord {
        id: row.try_get("id")?,
        parent: row.try_get("parent")?,
        job_id: row.try_get("job_id")?,
        checkpoint_path: row.try_get("checkpoint_path")?,
        metrics: json_opt(row, "metrics")?.unwrap_or_default(),
        created_at: row.try_get("created_at")?,
    })
}

/// Every change a finished job records.
#[derive(Debug, Clone, Default)]
pub struct JobOutcome {
    pub evaluation: Option<serde_json::Value>,
    pub error: Option<String>,
}

impl Store {
    /// Queues a job unless one is queued, running or evaluating.
    pub async fn create_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let active = sqlx::query(
            "SELECT id FROM rl_jobs WHERE status IN ('queued', 'running', 'evaluating') LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = active {
            return Err(StoreError::JobActive(row.try_get("id")?));
        }
        sqlx::query(
            "INSERT INTO rl_jobs (id, status, trigger_reason, config, steps_done, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(&job.id)
        .bind(job.status.as_str())
        .bind(&job.trigger)
        .bind(job.config.to_string())
        .bind(job.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_job(&self, id: &str) -> Result<JobRecord, StoreError> {
        let row = sqlx::query(&format!("{JOB_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        job_from_row(&row)
    }

    /// Newest first.
    pub async fn list_jobs(&self, limit: i64) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{JOB_SELECT} ORDER BY created_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The oldest queued job.
    pub async fn next_queued_job(&self) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "{JOB_SELECT} WHERE status = 'queued' ORDER BY created_at, id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Moves a job from `from` to `to`; false when it was not in `from`
    /// (cancelled meanwhile, say).
    pub async fn transition_job(
        &self,
        id: &str,
        from: JobStatus,
        to: JobStatus,
    ) -> Result<bool, StoreError> {
        let started = (to == JobStatus::Running).then(now_ms);
        let done = sqlx::query(
            "UPDATE rl_jobs SET status = $1, started_at = COALESCE($2, started_at) \
             WHERE id = $3 AND status = $4",
        )
        .bind(to.as_str())
        .bind(started)
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_job_parent(&self, id: &str, parent: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE rl_jobs SET parent_version = $1 WHERE id = $2")
            .bind(parent)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_job_data_counts(
        &self,
        id: &str,
        counts: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE rl_jobs SET data_counts = $1 WHERE id = $2")
            .bind(counts.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_job_progress(
        &self,
        id: &str,
        steps_done: i64,
        metrics: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE rl_jobs SET steps_done = $1, metrics = $2 WHERE id = $3")
            .bind(steps_done)
            .bind(metrics.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a job that is still active with a terminal status.
    pub async fn finish_job(
        &self,
        id: &str,
        status: JobStatus,
        outcome: JobOutcome,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE rl_jobs SET status = $1, evaluation = COALESCE($2, evaluation), error = $3, finished_at = $4 \
             WHERE id = $5 AND status IN ('queued', 'running', 'evaluating')",
        )
        .bind(status.as_str())
        .bind(outcome.evaluation.map(|e| e.to_string()))
        .bind(outcome.error)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Cancels a job that has not started; false when it is not queued.
    pub async fn cancel_queued_job(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE rl_jobs SET status = 'cancelled', error = 'cancelled before it started', finished_at = $1 \
             WHERE id = $2 AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// After a crash: jobs that were running or evaluating cannot resume
    /// (their in-memory policy is gone) and are marked failed.
    pub async fn fail_interrupted_jobs(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE rl_jobs SET status = 'failed', error = $1, finished_at = $2 \
             WHERE status IN ('running', 'evaluating')",
        )
        .bind("interrupted: the server stopped while the job ran")
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records a promoted version and makes it active, and marks its job
    /// promoted, in one transaction. The checkpoint is on disk before this.
    pub async fn promote(
        &self,
        version: &VersionRecord,
        evaluation: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO model_versions (id, parent, job_id, checkpoint_path, metrics, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&version.id)
        .bind(version.parent.clone())
        .bind(version.job_id.clone())
        .bind(version.checkpoint_path.clone())
        .bind(version.metrics.to_string())
        .bind(version.created_at)
        .execute(&mut *tx)
        .await?;
        set_active(&mut tx, &version.id).await?;
        sqlx::query(
            "UPDATE rl_jobs SET status = 'promoted', candidate_version = $1, evaluation = $2, finished_at = $3 \
             WHERE id = $4",
        )
        .bind(&version.id)
        .bind(evaluation.to_string())
        .bind(now_ms())
        .bind(version.job_id.clone())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the base model's version once.
    pub async fn ensure_base_version(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO model_versions (id, parent, job_id, checkpoint_path, metrics, created_at) \
             VALUES ($1, NULL, NULL, NULL, '{}', $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_version(&self, id: &str) -> Result<VersionRecord, StoreError> {
        let row = sqlx::query(&format!("{VERSION_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        version_from_row(&row)
    }

    /// Oldest first.
    pub async fn list_versions(&self) -> Result<Vec<VersionRecord>, StoreError> {
        let rows = sqlx::query(&format!("{VERSION_SELECT} ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(version_from_row).collect()
    }

    pub async fn version_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM model_versions")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    pub async fn active_version(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM registry_state WHERE key = $1")
            .bind(ACTIVE_KEY)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    pub async fn set_active_version(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        set_active(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Feedback items stored after `since_ms`.
    pub async fn feedback_count_since(&self, since_ms: i64) -> Result<i64, StoreError> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM feedback WHERE created_at > $1")
                .bind(since_ms)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// When the newest job was created (0 without jobs).
    pub async fn last_job_created_at(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT MAX(created_at) AS t FROM rl_jobs")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("t")?.unwrap_or(0))
    }

    /// The requests of the newest `limit` feedback items stored up to
    /// `until_ms`, newest first, each once.
    pub async fn rated_request_ids(
        &self,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.request_id AS request_id, MAX(f.created_at) AS t FROM feedback f \
             JOIN samples s ON s.id = f.sample_id WHERE f.created_at <= $1 \
             GROUP BY s.request_id ORDER BY t DESC, request_id LIMIT $2",
        )
        .bind(until_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("request_id").map_err(StoreError::from))
            .collect()
    }

    /// Every sample of one request with its feedback, in group order.
    pub async fn rated_group(
        &self,
        request_id: &str,
        until_ms: i64,
    ) -> Result<Vec<RatedSample>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SAMPLE_SELECT} WHERE request_id = $1 ORDER BY group_index"
        ))
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        let feedback = sqlx::query(&format!(
            "{FEEDBACK_SELECT} WHERE sample_id IN (SELECT id FROM samples WHERE request_id = $1) \
             AND created_at <= $2 ORDER BY created_at, id"
        ))
        .bind(request_id)
        .bind(until_ms)
        .fetch_all(&self.pool)
        .await?;
        let feedback: Vec<FeedbackRecord> = feedback
            .iter()
            .map(feedback_from_row)
            .collect::<Result<_, _>>()?;
        rows.iter()
            .map(|row| {
                let sample = sample_from_row(row)?;
                let mine = feedback.iter().filter(|f| f.sample_id == sample.id);
                Ok(RatedSample {
                    scores: mine
                        .clone()
                        .filter_map(|f| f.score.map(|s| (f.key.clone(), s)))
                        .collect(),
                    corrections: mine.filter_map(|f| f.correction.clone()).collect(),
                    sample,
                })
            })
            .collect()
    }

    /// Prompts of generation requests that received no feedback, newest first.
    pub async fn unrated_generation_prompts(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.prompt AS prompt, MAX(s.created_at) AS t FROM samples s \
             WHERE s.task = 'generate' AND NOT EXISTS \
             (SELECT 1 FROM feedback f JOIN samples r ON r.id = f.sample_id WHERE r.request_id = s.request_id) \
             GROUP BY s.prompt ORDER BY t DESC, prompt LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("prompt").map_err(StoreError::from))
            .collect()
    }
}

async fn set_active(tx: &mut sqlx::Transaction<'_, sqlx::Any>, id: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO registry_state (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(ACTIVE_KEY)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
