//! The queries that gather an RL job's data: rated served groups, unrated
//! generation prompts, and the counts the triggers look at.

use sqlx::Row;

use super::{
    feedback_from_row, sample_from_row, FeedbackRecord, Store, StoreError, FEEDBACK_SELECT,
    SAMPLE_SELECT,
};
use crate::record::SampleRecord;

/// A stored sample with the feedback it received.
#[derive(Debug, Clone)]
pub struct RatedSample {
    pub sample: SampleRecord,
    /// Numeric scores, by feedback key.
    pub scores: Vec<(String, f64)>,
    /// Reference answers given as corrections.
    pub corrections: Vec<String>,
}

impl Store {
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
