//! RL jobs (admin): start, list, inspect, cancel.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::job_config::JobConfig;
use super::types::{JobList, JobView, PngImage};
use super::AppState;
use ulm_core::jobs::{JobRecord, JobTrigger};
use ulm_core::scheduler::curves::job_curves_png;
use ulm_core::scheduler::SchedulerError;
use ulm_core::store::StoreError;

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> Self {
        match e {
            SchedulerError::InvalidConfig(e) => ApiError::InvalidParameter(e.to_string()),
            SchedulerError::Finished(id) => {
                ApiError::Conflict(format!("job {id} has already finished"))
            }
            SchedulerError::Store(StoreError::NotFound) => ApiError::NotFound("no such job".into()),
            SchedulerError::Store(e) => e.into(),
        }
    }
}

fn view(j: JobRecord) -> JobView {
    JobView {
        curves_url: (j.steps_done > 0).then(|| format!("/v1/rl/jobs/{}/curves.png", j.id)),
        id: j.id,
        status: j.status.as_str().to_string(),
        trigger: j.trigger.as_str().to_string(),
        config: j.config,
        parent_version: j.parent_version,
        candidate_version: j.candidate_version,
        data_counts: j.data_counts,
        metrics: j.metrics,
        evaluation: j.evaluation,
        error: j.error,
        steps_done: j.steps_done,
        worker: j.worker,
        created_at: j.created_at,
        started_at: j.started_at,
        finished_at: j.finished_at,
    }
}

/// Queues a GRPO refinement job over the stored samples and feedback. One
/// job at a time: while another is queued or running this is a conflict.
#[utoipa::path(post, path = "/v1/rl/jobs", tag = "rl",
    request_body(content = JobConfig, description = "Job configuration; `{}` for the defaults"),
    responses(
        (status = 202, description = "Queued", body = JobView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "Another job is queued or running", body = ErrorBody),
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid configuration", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn start_job(
    State(state): State<AppState>,
    ApiJson(config): ApiJson<JobConfig>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = state
        .scheduler
        .submit(config.try_into()?, JobTrigger::Api)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(view(job))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListJobs {
    /// At most this many jobs, newest first (1 to 500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/v1/rl/jobs", tag = "rl",
    params(ListJobs),
    responses(
        (status = 200, description = "Jobs", body = JobList),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_jobs(
    State(state): State<AppState>,
    query: Result<Query<ListJobs>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidParameter(e.body_text()))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::InvalidParameter(
            "limit must be between 1 and 500".into(),
        ));
    }
    let jobs = state.store.list_jobs(limit).await?;
    Ok(Json(JobList {
        data: jobs.into_iter().map(view).collect(),
    }))
}

/// One job: status, data counts, per-step metrics, evaluation and decision.
#[utoipa::path(get, path = "/v1/rl/jobs/{id}", tag = "rl",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = state
        .store
        .get_job(&id)
        .await
        .map_err(SchedulerError::Store)?;
    Ok(Json(view(job)))
}

/// The job's learning curves as PNG: the mean of each reward function, the
/// KL to the reference, the loss and the gradient norm by step. Drawn from
/// the steps recorded so far, so it follows a running job; a finished job
/// also has it on the server's disk next to its `metrics.jsonl`.
#[utoipa::path(get, path = "/v1/rl/jobs/{id}/curves.png", tag = "rl",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "PNG image", content_type = "image/png", body = PngImage),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has trained no step yet", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_curves(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let job = state
        .store
        .get_job(&id)
        .await
        .map_err(SchedulerError::Store)?;
    let metrics = job.metrics.unwrap_or_default();
    let png = tokio::task::spawn_blocking(move || job_curves_png(&metrics))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "job {id} has trained no step yet; its curves appear with its first step"
            ))
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    ))
}

/// Cancels a job: a queued one at once, a running one before its next
/// training step (the job then reads `cancelled`; nothing is promoted).
#[utoipa::path(post, path = "/v1/rl/jobs/{id}/cancel", tag = "rl",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancelled, or cancelling at the next step", body = JobView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has already finished", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cancel_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = state.scheduler.cancel(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(job))))
}
