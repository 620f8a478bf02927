use std::time::Instant;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;

use super::error::{ApiError, ApiJson, ErrorBody};
use super::types::{GenerateRequest, GenerateResponse, GeneratedImage, Timings};
use super::AppState;
use crate::engine;
use crate::store::{now_ms, SampleRecord, Task};

/// Generate images from a text prompt.
///
/// Every image is stored with its tokens and behaviour log-probs before the
/// response is sent.
#[utoipa::path(
    post,
    path = "/v1/generate",
    tag = "inference",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated images", body = GenerateResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
        (status = 429, description = "Queue full; retry after Retry-After seconds", body = ErrorBody),
        (status = 503, description = "Model unavailable", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let limits = &state.limits;
    limits.text("prompt", &body.prompt)?;
    limits.count("n", body.n, limits.max_images_per_request)?;
    if !body.cfg_weight.is_finite() || !(0.0..=20.0).contains(&body.cfg_weight) {
        return Err(ApiError::InvalidParameter(format!(
            "cfg_weight must be between 0 and 20, got {}",
            body.cfg_weight
        )));
    }
    let sampling = limits.sampling(body.temperature, body.top_k, None)?;
    let seeds = limits.seeds(body.seed, body.n)?;
    let deadline = Instant::now() + limits.request_timeout;
    let request = engine::GenerateRequest {
        prompt: body.prompt.clone(),
        cfg_weight: body.cfg_weight,
        sampling,
        seeds: seeds.clone(),
    };
    let output = state.engine.generate(request, deadline).await?;

    let request_id = uuid::Uuid::new_v4().to_string();
    let params = serde_json::json!({
        "n": body.n, "cfg_weight": body.cfg_weight, "temperature": body.temperature, "top_k": body.top_k,
    });
    let created_at = now_ms();
    let pngs = tokio::task::spawn_blocking(move || {
        output
            .images
            .into_iter()
            .map(|img| encode_png(&img.image).map(|png| (png, img.tokens, img.logprobs)))
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut records = Vec::with_capacity(pngs.len());
    let mut images = Vec::with_capacity(pngs.len());
    for (i, ((png, tokens, logprobs), seed)) in pngs.into_iter().zip(&seeds).enumerate() {
        let sha = state.store.put_image(png.clone()).await?;
        let id = uuid::Uuid::new_v4().to_string();
        images.push(GeneratedImage {
            image_url: format!("/v1/images/{id}"),
            sample_id: id.clone(),
            seed: *seed,
            png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
        });
        records.push(SampleRecord {
            id,
            request_id: request_id.clone(),
            group_index: i as i64,
            task: Task::Generate,
            model_version: output.model_version.clone(),
            prompt: body.prompt.clone(),
            input_image_sha256: None,
            params: params.clone(),
            seed: *seed as i64,
            output_text: None,
            output_image_sha256: Some(sha),
            token_ids: tokens,
            logprobs,
            finish_reason: None,
            queue_ms: output.timings.queue_ms as i64,
            compute_ms: output.timings.compute_ms as i64,
            created_at,
        });
    }
    state.store.insert_samples(&records).await?;
    Ok(Json(GenerateResponse {
        request_id,
        model_version: output.model_version,
        images,
        timings: Timings {
            queue_ms: output.timings.queue_ms,
            compute_ms: output.timings.compute_ms,
        },
    }))
}

pub fn encode_png(image: &image::RgbImage) -> Result<Vec<u8>, ApiError> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::Internal(format!("PNG encoding failed: {e}")))?;
    Ok(out.into_inner())
}
