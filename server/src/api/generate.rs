use std::time::Instant;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;

use ulm_core::engine::ImageWork;
use ulm_core::engine::MAX_BEST_OF;
use ulm_core::record::{record_images, GenerateParams};

use super::error::{ApiError, ApiJson, ErrorBody};
use super::types::{GenerateRequest, GenerateResponse, GeneratedImage, Timings};
use super::AppState;

/// Images a request may draw, candidates included.
const MAX_CANDIDATES: u32 = 64;

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
    let plan_temperature = match (body.plan, defaults.plan_temperature) {
        (Some(false), _) | (None, None) => None,
        (_, Some(plan_temperature)) => Some(plan_temperature as f32),
        (Some(true), None) => {
            return Err(ApiError::InvalidParameter(
                "plan: this model was not trained to plan its images".into(),
            ))
        }
    };
    let best_of = match (body.best_of, plan_temperature) {
        (Some(k), _) if !(1..=MAX_BEST_OF).contains(&k) => {
            return Err(ApiError::InvalidParameter(format!(
                "best_of must be between 1 and {MAX_BEST_OF}, got {k}"
            )))
        }
        (Some(k), None) if k > 1 => {
            return Err(ApiError::InvalidParameter(
                "best_of: the candidates are read against a plan, and this request has none".into(),
            ))
        }
        (Some(k), _) => k,
        // The model's, as far as the request's candidates stay in bounds.
        (None, Some(_)) => defaults
            .best_of
            .unwrap_or(1)
            .min(MAX_CANDIDATES / body.n)
            .max(1),
        (None, None) => 1,
    };
    if best_of > 1 {
        limits.count("n * best_of", body.n * best_of, MAX_CANDIDATES)?;
    }
    let params = GenerateParams {
        n: body.n,
        cfg_weight: cfg_weight as f32,
        temperature: temperature as f32,
        top_k: body.top_k,
        plan_temperature,
        best_of: (best_of > 1).then_some(best_of),
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
    let plan = output.plan.clone();
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
        plan,
        timings,
    })
}
