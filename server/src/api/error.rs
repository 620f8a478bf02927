//! The one error type of the API. Every error leaves as
//! `{"error": {"code": "...", "message": "..."}}` with a stable `code`.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use ulm_core::engine::EngineError;
use ulm_core::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// The JSON does not have the expected shape (missing field, wrong type, unknown field).
    #[error("{0}")]
    InvalidBody(String),
    /// A field is out of its documented range.
    #[error("{0}")]
    InvalidParameter(String),
    /// The image could not be decoded, or is in an unsupported format.
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body stalled: nothing arrived within the body timeout")]
    RequestTimeout,
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this API key may not use this endpoint")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("the server is busy: the request queue is full")]
    QueueFull,
    #[error("{0}")]
    Unavailable(String),
    #[error("the request did not finish before its deadline")]
    DeadlineExceeded,
    #[error("internal error: {0}")]
    Internal(String),
}

/// Error body of every non-2xx response. It has the shape OpenAI clients
/// parse (`error.message`, `error.type`, `error.code`), so the `openai` SDK
/// raises its errors with our code and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: invalid_json, invalid_body,
    /// invalid_parameter, invalid_image, image_too_large, payload_too_large,
    /// unsupported_media_type, request_timeout, unauthorized, forbidden, not_found,
    /// method_not_allowed, conflict, queue_full, unavailable,
    /// deadline_exceeded, internal.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The class of error as OpenAI names it: invalid_request_error,
    /// authentication_error, permission_error, not_found_error,
    /// rate_limit_error, timeout_error or server_error.
    #[serde(rename = "type")]
    pub error_type: String,
}

impl ApiError {
    /// What the client is told: the error's own text, except for internal
    /// errors, whose details go to the log only.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "the server failed to complete the request; its log has the details".into()
            }
            other => other.to_string(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::QueueFull => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded => "deadline_exceeded",
            ApiError::Internal(_) => "internal",
        }
    }

    /// OpenAI's name for the class of this error.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "timeout_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The body this error is sent as.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.public_message(),
                error_type: self.error_type().to_string(),
            },
        }
    }

    /// The body of an error that ends a stream whose headers were already
    /// sent (logged here, as the response's status cannot carry it).
    pub fn streamed_body(&self) -> ErrorBody {
        if self.status().is_server_error() {
            tracing::error!(code = self.code(), error = %self, "streamed request failed");
        }
        self.body()
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidBody(_)
            | ApiError::InvalidParameter(_)
            | ApiError::InvalidImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ImageTooLarge(_) | ApiError::PayloadTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let retry_after = match self {
            ApiError::QueueFull => Some("1"),
            ApiError::Unavailable(_) => Some("5"),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The body was not read to its end, so the connection cannot carry
        // another request: saying so keeps the client from reusing it while
        // the server closes it (a race the client would see as a dropped
        // request).
        if matches!(
            self,
            ApiError::PayloadTooLarge(_) | ApiError::RequestTimeout
        ) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonSyntaxError(e) => ApiError::InvalidJson(e.body_text()),
            JsonRejection::JsonDataError(e) => ApiError::InvalidBody(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
            }
            JsonRejection::BytesRejection(e) if caused_by_timeout(&e) => ApiError::RequestTimeout,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(
                    "the request body is larger than the server accepts".into(),
                )
            }
            other => ApiError::InvalidBody(other.body_text()),
        }
    }
}

/// Whether the body timeout (tower-http's `TimeoutError`) is in the chain.
fn caused_by_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::NotFound(r.body_text())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull => ApiError::QueueFull,
            EngineError::Unavailable => {
                ApiError::Unavailable("the model worker is not running".into())
            }
            EngineError::DeadlineExceeded => ApiError::DeadlineExceeded,
            EngineError::InvalidInput(m) => ApiError::InvalidParameter(m),
            EngineError::InvalidImage(m) => ApiError::InvalidImage(m),
            EngineError::ImageTooLarge(m) => ApiError::ImageTooLarge(m),
            EngineError::Model(m) => ApiError::Internal(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("no such resource".into()),
            StoreError::UnknownSample(id) => {
                ApiError::NotFound(format!("sample {id} does not exist"))
            }
            StoreError::Conflict(id) => ApiError::Conflict(format!(
                "feedback with client_id {id:?} was already stored with a different body"
            )),
            StoreError::JobActive(id) => ApiError::Conflict(format!(
                "job {id} is already queued or running; one job runs at a time"
            )),
            StoreError::JobFinished(id) => {
                ApiError::Conflict(format!("job {id} has already finished"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// JSON body extractor whose rejections are [`ApiError`]s. The body must be
/// a JSON object: serde would also read a struct from an array.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) =
            axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if !value.is_object() {
            return Err(ApiError::InvalidBody(
                "the body must be a JSON object".into(),
            ));
        }
        serde_json::from_value(value)
            .map(ApiJson)
            .map_err(|e| ApiError::InvalidBody(format!("invalid body: {e}")))
    }
}

/// Path parameters extractor whose rejections are [`ApiError`]s (a path
/// that is not UTF-8 names nothing: 404).
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_details_stay_in_the_log() {
        let response = ApiError::Internal("tensor shape [3, 7] at layer 12".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("\"internal\""), "{text}");
        assert!(!text.contains("tensor"), "{text}");
    }
}
