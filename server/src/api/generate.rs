use std::time::Instant;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;

use ulm_core::engine::ImageWork;
use ulm_core::record::{record_images, GenerateParams};

use super::error::{ApiError, ApiJson, ErrorBody};
use super::types::{GenerateRequest, GenerateResponse, GeneratedImage, Timings};
use super::AppState;

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
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
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
    draw(&state, body).await.map(Json)
}

/// Validates the request, draws its images and stores every one.
pub(super) async fn draw(
    state: &AppState,
    body: GenerateRequest,
) -> Result<GenerateResponse, ApiError> {
    let limits = &state.limits;
    limits.text("prompt", &body.prompt)?;
    limits.count("n", body.n, limits.max_images_per_request)?;
    let defaults = state.engine.info.sampling;
    let cfg_weight = body.cfg_weight.unwrap_or(defaults.guidance_scale);
    limits.cfg_weight(cfg_weight)?;
    let temperature = body.temperature.unwrap_or(defaults.temperature);
    limits.sampling(temperature, body.top_k, None)?;
    let params = GenerateParams {
        n: body.n,
        cfg_weight: cfg_weight as f32,
        temperature: temperature as f32,
        top_k: body.top_k,
    };
    let seeds = limits.seeds(body.seed, body.n)?;
    let deadline = Instant::now() + limits.request_timeout;
    let work = ImageWork {
        prompt: body.prompt.clone(),
        params,
        seeds: seeds.clone(),
    };
    let output = state.engine.generate(work, deadline).await?;
    let model_version = output.model_version.clone();
    let timings = Timings::from(output.timings);
    let recorded = record_images(&state.store, &body.prompt, params, &seeds, output).await?;
    let images = recorded
        .samples
        .into_iter()
        .map(|s| GeneratedImage {
            image_url: format!("/v1/images/{}", s.sample_id),
            sample_id: s.sample_id,
            seed: s.seed,
            png_base64: base64::engine::general_purpose::STANDARD.encode(&s.output),
        })
        .collect();
    Ok(GenerateResponse {
        request_id: recorded.request_id,
        model_version,
        images,
        timings,
    })
}
