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
    data_counts, metrics, evaluation, error, steps_done, worker, created_at, started_at, finished_at FROM rl_jobs";
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
        worker: row.try_get("worker")?,
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
    /// Queues a job unless one is queued, running or evaluating (a unique
    /// index makes this hold across processes). A job with a `trigger_key`
    /// is created once per key.
    pub async fn create_job(
        &self,
        job: &JobRecord,
        trigger_key: Option<&str>,
    ) -> Result<(), StoreError> {
        if let Some(id) = self.active_job_id().await? {
            return Err(StoreError::JobActive(id));
        }
        let inserted = sqlx::query(
            "INSERT INTO rl_jobs (id, status, trigger_reason, config, steps_done, created_at, trigger_key) \
             VALUES ($1, $2, $3, $4, 0, $5, $6)",
        )
        .bind(&job.id)
        .bind(job.status.as_str())
        .bind(job.trigger.as_str())
        .bind(job.config.to_string())
        .bind(job.created_at)
        .bind(trigger_key)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            // Another process queued a job, or fired this trigger, first.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                match (self.active_job_id().await?, trigger_key) {
                    (Some(id), _) => Err(StoreError::JobActive(id)),
                    (None, Some(key)) => Err(StoreError::TriggerFired(key.to_string())),
                    (None, None) => Err(sqlx::Error::Database(e).into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn active_job_id(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT id FROM rl_jobs WHERE status IN ({}) LIMIT 1",
            status_list(&JobStatus::ACTIVE)
        ))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("id")).transpose()?)
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

    /// Claims the oldest queued job for `worker`: running, with a fresh
    /// lease. One statement, so two processes never claim the same job
    /// (PostgreSQL skips a row another claim holds; SQLite writes one at a
    /// time).
    pub async fn claim_next_job(&self, worker: &str) -> Result<Option<JobRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let scope = Scope::NextQueued {
            worker,
            skip_locked: self.postgres,
        };
        let claimed = apply_transition(&mut tx, scope, &Transition::Start).await?;
        tx.commit().await?;
        match claimed.first() {
            Some(id) => Ok(Some(self.get_job(id).await?)),
            None => Ok(None),
        }
    }

    /// Renews `worker`'s lease on job `id`, and says whether it should go on.
    pub async fn renew_lease(&self, id: &str, worker: &str) -> Result<Lease, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE rl_jobs SET heartbeat_at = $1 WHERE id = $2 AND worker = $3 AND status IN ({}) \
             RETURNING cancel_requested",
            status_list(&[JobStatus::Running, JobStatus::Evaluating])
        ))
        .bind(now_ms())
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Lease::Lost);
        };
        let cancel: i64 = row.try_get("cancel_requested")?;
        Ok(if cancel != 0 {
            Lease::CancelRequested
        } else {
            Lease::Held
        })
    }

    /// Asks the worker running job `id` to cancel it; false when the job
    /// is not running or evaluating.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE rl_jobs SET cancel_requested = 1 WHERE id = $1 AND status IN ({})",
            status_list(&[JobStatus::Running, JobStatus::Evaluating])
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Applies `transition` to job `id` if the job is in one of the
    /// statuses the transition may leave; false when it is not (cancelled
    /// meanwhile, say).
    pub async fn transition_job(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let moved = apply_transition(&mut tx, Scope::Job(id), transition).await?;
        tx.commit().await?;
        Ok(moved.len() == 1)
    }

    /// Fails the running jobs whose worker renewed no lease for `lease`
    /// (it died or hung): their in-memory policy is gone.
    pub async fn expire_leases(&self, lease: std::time::Duration) -> Result<u64, StoreError> {
        let before = now_ms() - lease.as_millis() as i64;
        let mut tx = self.begin_write().await?;
        let moved =
            apply_transition(&mut tx, Scope::Stale { before }, &Transition::Interrupt).await?;
        tx.commit().await?;
        Ok(moved.len() as u64)
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
        let mut tx = self.begin_write().await?;
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
        if apply_transition(&mut tx, Scope::Job(&job), &promote)
            .await?
            .len()
            != 1
        {
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
        let mut tx = self.begin_write().await?;
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

/// What a lease renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// Still held, and someone asked for the job to be cancelled.
    CancelRequested,
    /// The job ended elsewhere (cancelled, or failed when the lease lapsed).
    Lost,
}

/// The rows a transition applies to.
enum Scope<'a> {
    Job(&'a str),
    /// Jobs whose last heartbeat (none counts as oldest) is before `before`.
    Stale {
        before: i64,
    },
    /// The oldest queued job, claimed by `worker` with a fresh heartbeat.
    NextQueued {
        worker: &'a str,
        skip_locked: bool,
    },
}

/// The one statement that changes a job's status: the rows of `scope` that
/// are in a status the transition may leave. Returns their ids.
async fn apply_transition(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    scope: Scope<'_>,
    transition: &Transition,
) -> Result<Vec<String>, StoreError> {
    let to = transition.to();
    let now = now_ms();
    let candidate = match transition {
        Transition::Promote { version, .. } => Some(version.clone()),
        _ => None,
    };
    let (rows, claim) = match &scope {
        Scope::Job(_) => ("id = $8".to_string(), ""),
        Scope::Stale { .. } => ("COALESCE(heartbeat_at, 0) < $8".to_string(), ""),
        Scope::NextQueued { skip_locked, .. } => (
            format!(
                "id = (SELECT id FROM rl_jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1{})",
                if *skip_locked { " FOR UPDATE SKIP LOCKED" } else { "" }
            ),
            ", worker = $8, heartbeat_at = $3",
        ),
    };
    let query = format!(
        "UPDATE rl_jobs SET status = $1, \
         started_at = CASE WHEN $2 THEN $3 ELSE started_at END, \
         finished_at = CASE WHEN $4 THEN $3 ELSE finished_at END, \
         error = COALESCE($5, error), evaluation = COALESCE($6, evaluation), \
         candidate_version = COALESCE($7, candidate_version){claim} \
         WHERE {rows} AND status IN ({}) RETURNING id",
        status_list(transition.from())
    );
    let query = sqlx::query(&query)
        .bind(to.as_str())
        .bind(to == JobStatus::Running)
        .bind(now)
        .bind(!to.is_active())
        .bind(transition.error())
        .bind(transition.evaluation().map(|e| e.to_string()))
        .bind(candidate);
    let query = match scope {
        Scope::Job(id) => query.bind(id.to_string()),
        Scope::Stale { before } => query.bind(before),
        Scope::NextQueued { worker, .. } => query.bind(worker.to_string()),
    };
    let rows = query.fetch_all(&mut **tx).await?;
    rows.iter().map(|row| Ok(row.try_get("id")?)).collect()
}
