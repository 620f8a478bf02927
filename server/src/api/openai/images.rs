use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;

use super::types::{ImageData, ImageGenerationRequest, ImageResponseFormat, ImagesResponse};
use super::unix_seconds;
use crate::api::error::{ApiError, ApiJson, ErrorBody};
use crate::api::generate::draw;
use crate::api::types::GenerateRequest;
use crate::api::AppState;

/// Image generation (OpenAI-compatible).
///
/// `size` must be the model's one size (or `auto`). With
/// `"response_format": "url"` each image is a link to
/// `GET /v1/images/{sample_id}`, which asks for the same API key.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "Generated images", body = ImagesResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field, or a size the model does not make", body = ErrorBody),
        (status = 429, description = "Queue full; retry after Retry-After seconds", body = ErrorBody),
        (status = 503, description = "Model unavailable", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ImageGenerationRequest>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let side = state.engine.info.generated_image_size;
    check_size(body.size.as_deref(), side)?;
    let format = body.response_format;
    let drawn = draw(
        &state,
        GenerateRequest {
            prompt: body.prompt,
            n: body.n,
            cfg_weight: body.cfg_weight,
            temperature: body.temperature,
            top_k: body.top_k,
            seed: body.seed,
            plan: body.plan,
            best_of: body.best_of,
        },
    )
    .await?;
    let origin = origin(&headers);
    let data = drawn
        .images
        .into_iter()
        .map(|image| {
            let (b64_json, url) = match format {
                ImageResponseFormat::B64Json => (Some(image.png_base64), None),
                ImageResponseFormat::Url => (None, Some(format!("{origin}{}", image.image_url))),
            };
            ImageData {
                b64_json,
                url,
                sample_id: image.sample_id,
                seed: image.seed,
                revised_prompt: drawn.plan.clone(),
            }
        })
        .collect();
    Ok(Json(ImagesResponse {
        created: unix_seconds(),
        data,
        model: drawn.model_version,
    }))
}

/// `auto`, absent, or the model's `side x side`.
fn check_size(size: Option<&str>, side: usize) -> Result<(), ApiError> {
    let made = format!("{side}x{side}");
    match size {
        None | Some("auto") => Ok(()),
        Some(s) if s == made => Ok(()),
        Some(s) => Err(ApiError::InvalidParameter(format!(
            "size must be {made} (the one size this model draws) or auto, got {s:?}"
        ))),
    }
}

/// `scheme://host` as the client reached us (behind a proxy, as it
/// forwarded); empty, so that URLs stay relative, when the request names
/// no host.
fn origin(headers: &HeaderMap) -> String {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let Some(host) = value("host") else {
        return String::new();
    };
    let scheme = match value("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_models_size_is_accepted() {
        assert!(check_size(None, 384).is_ok());
        assert!(check_size(Some("auto"), 384).is_ok());
        assert!(check_size(Some("384x384"), 384).is_ok());
        let e = check_size(Some("1024x1024"), 384).unwrap_err();
        assert_eq!(e.code(), "invalid_parameter");
        assert!(e.to_string().contains("384x384"), "{e}");
    }

    #[test]
    fn urls_point_where_the_client_reached_us() {
        let mut headers = HeaderMap::new();
        assert_eq!(origin(&headers), "");
        headers.insert(axum::http::header::HOST, "gpu-7:8000".parse().unwrap());
        assert_eq!(origin(&headers), "http://gpu-7:8000");
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(origin(&headers), "https://gpu-7:8000");
    }
}
