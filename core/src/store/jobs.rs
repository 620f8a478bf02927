//! RL jobs, model versions and the active version. Job statuses change
//! only through [`Transition`]s (see `crate::jobs`).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{corrupt, now_ms, parse_name, Store, StoreError};
use crate::jobs::{JobRecord, JobStatus, Transition};

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
    let trigger: String = row.try_get("trigger_reason")?;
    let config: String = row.try_get("config")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        status: parse_name("status", &status)?,
        trigger: parse_name("trigger_reason", &trigger)?,
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

impl Store {
    /// Queues a job unless one is queued, running or evaluating.
    pub async fn create_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let active = sqlx::query(&format!(
            "SELECT id FROM rl_jobs WHERE status IN ({}) LIMIT 1",
            status_list(&JobStatus::ACTIVE)
        ))
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
        .bind(job.trigger.as_str())
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

    /// Applies `transition` to job `id` if the job is in one of the
    /// statuses the transition may leave; false when it is not (cancelled
    /// meanwhile, say).
    pub async fn transition_job(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved = apply_transition(&mut tx, Some(id), transition).await?;
        tx.commit().await?;
        Ok(moved == 1)
    }

    /// After a crash: jobs that were running or evaluating cannot resume
    /// (their in-memory policy is gone) and are marked failed.
    pub async fn interrupt_jobs(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved = apply_transition(&mut tx, None, &Transition::Interrupt).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// Records a promoted version, makes it active, and moves its job to
    /// promoted, in one transaction: all of it or none. The checkpoint is
    /// on disk before this.
    pub async fn promote(
        &self,
        version: &VersionRecord,
        evaluation: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let job = version
            .job_id
            .clone()
            .ok_or_else(|| StoreError::Corrupt(format!("version {} names no job", version.id)))?;
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
        let promote = Transition::Promote {
            version: version.id.clone(),
            evaluation: evaluation.clone(),
        };
        if apply_transition(&mut tx, Some(&job), &promote).await? != 1 {
            // Dropping the transaction rolls the version back.
            return Err(StoreError::JobFinished(job));
        }
        tx.commit().await?;
        Ok(())
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

/// `'queued', 'running'`: statuses as an SQL list (fixed words, never client text).
fn status_list(statuses: &[JobStatus]) -> String {
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one statement that changes a job's status: `id`'s row, or every job
/// when `id` is none, if it is in a status the transition may leave.
async fn apply_transition(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: Option<&str>,
    transition: &Transition,
) -> Result<u64, StoreError> {
    let to = transition.to();
    let now = now_ms();
    let candidate = match transition {
        Transition::Promote { version, .. } => Some(version.clone()),
        _ => None,
    };
    let done = sqlx::query(&format!(
        "UPDATE rl_jobs SET status = $1, \
         started_at = CASE WHEN $2 THEN $3 ELSE started_at END, \
         finished_at = CASE WHEN $4 THEN $3 ELSE finished_at END, \
         error = COALESCE($5, error), evaluation = COALESCE($6, evaluation), \
         candidate_version = COALESCE($7, candidate_version) \
         WHERE ($8 IS NULL OR id = $8) AND status IN ({})",
        status_list(transition.from())
    ))
    .bind(to.as_str())
    .bind(to == JobStatus::Running)
    .bind(now)
    .bind(!to.is_active())
    .bind(transition.error())
    .bind(transition.evaluation().map(|e| e.to_string()))
    .bind(candidate)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}
