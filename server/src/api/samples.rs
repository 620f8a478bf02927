use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::error::{ApiError, ApiPath, ErrorBody};
use super::feedback::view;
use super::types::{PngImage, SampleView, Timings};
use super::AppState;
use ulm_core::record::Task;
use ulm_core::store::StoreError;

fn not_found(what: &'static str, id: &str) -> impl FnOnce(StoreError) -> ApiError {
    let id = id.to_string();
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(format!("{what} {id} does not exist")),
        other => other.into(),
    }
}

/// A served sample with its inputs, output, behaviour log-probs and feedback.
#[utoipa::path(
    get,
    path = "/v1/samples/{id}",
    tag = "samples",
    params(("id" = String, Path, description = "Sample id")),
    responses(
        (status = 200, description = "The sample", body = SampleView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such sample", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_sample(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SampleView>, ApiError> {
    let s = state
        .store
        .get_sample(&id)
        .await
        .map_err(not_found("sample", &id))?;
    let feedback = state.store.feedback_for_sample(&id).await?;
    Ok(Json(SampleView {
        image_url: (s.task == Task::Generate).then(|| format!("/v1/images/{}", s.id)),
        task: s.task.as_str().to_string(),
        id: s.id,
        request_id: s.request_id,
        model_version: s.model_version,
        prompt: s.prompt,
        params: serde_json::to_value(s.params).unwrap_or_default(),
        seed: s.seed as u64,
        output_text: s.output_text,
        input_image_sha256: s.input_image_sha256,
        token_ids: s.token_ids,
        logprobs: s.logprobs,
        guided_logprobs: s.guided_logprobs,
        finish_reason: s.finish_reason.map(|f| f.as_str().to_string()),
        timings: Timings {
            queue_ms: s.queue_ms as u64,
            compute_ms: s.compute_ms as u64,
        },
        created_at: s.created_at,
        feedback: feedback.into_iter().map(view).collect(),
    }))
}

/// The PNG of a generated image.
#[utoipa::path(
    get,
    path = "/v1/images/{sample_id}",
    tag = "samples",
    params(("sample_id" = String, Path, description = "Sample id of a generated image")),
    responses(
        (status = 200, description = "PNG image", content_type = "image/png", body = PngImage),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_image(
    State(state): State<AppState>,
    ApiPath(sample_id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let s = state
        .store
        .get_sample(&sample_id)
        .await
        .map_err(not_found("image", &sample_id))?;
    let sha = s
        .output_image_sha256
        .ok_or_else(|| ApiError::NotFound(format!("sample {sample_id} has no generated image")))?;
    let png = state
        .store
        .get_image(&sha)
        .await
        .map_err(not_found("image", &sample_id))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable",
            ),
        ],
        png,
    ))
}
