use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;

use super::error::{ApiError, ErrorBody};
use super::limits::MAX_SCORE;
use super::types::{
    FeedbackItem, FeedbackResponse, FeedbackResult, FeedbackSource, FeedbackSourceType,
    FeedbackStatus, FeedbackView,
};
use super::AppState;
use ulm_core::store::{now_ms, sha256_hex, FeedbackOutcome, FeedbackRecord, StoreError};

const MAX_KEY_CHARS: usize = 64;
const MAX_TEXT_CHARS: usize = 16_384;
const MAX_ID_CHARS: usize = 128;

/// Record feedback on served samples: one item, or an array of items.
///
/// Every item is validated and its sample looked up before any is stored; an
/// item with a `client_id` seen before with the same body is answered as it
/// was the first time (`replayed`), with a different body it is a 409.
#[utoipa::path(
    post,
    path = "/v1/feedback",
    tag = "feedback",
    request_body(content = FeedbackItem, description = "One FeedbackItem or an array of them"),
    responses(
        (status = 201, description = "Stored (or replayed) items", body = FeedbackResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "An item names an unknown sample", body = ErrorBody),
        (status = 409, description = "A client_id was used before with a different body", body = ErrorBody),
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid item", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn post_feedback(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<FeedbackResponse>), ApiError> {
    // One object or an array of them.
    let Json(body) = body?;
    if super::limits::contains_nul(&body) {
        return Err(ApiError::InvalidParameter(
            "feedback text must not contain NUL characters".into(),
        ));
    }
    let (values, batch) = match body {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    if values.is_empty() {
        return Err(ApiError::InvalidParameter(
            "the feedback array is empty".into(),
        ));
    }
    if values.len() > state.limits.max_feedback_items {
        return Err(ApiError::InvalidParameter(format!(
            "at most {} feedback items per request",
            state.limits.max_feedback_items
        )));
    }
    let label = |i: usize| {
        if batch {
            format!("item {i}: ")
        } else {
            String::new()
        }
    };
    let mut records = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let item: FeedbackItem = serde_json::from_value(value)
            .map_err(|e| ApiError::InvalidBody(format!("{}{e}", label(i))))?;
        validate(&item).map_err(|m| ApiError::InvalidParameter(format!("{}{m}", label(i))))?;
        records.push(to_record(item));
    }
    // One transaction: an unknown sample or a conflict stores nothing.
    let outcomes = state
        .store
        .insert_feedback(&records)
        .await
        .map_err(|e| match e {
            StoreError::UnknownSample(id) => {
                let i = records.iter().position(|r| r.sample_id == id).unwrap_or(0);
                ApiError::NotFound(format!("{}sample {id} does not exist", label(i)))
            }
            other => other.into(),
        })?;
    let mut items = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let (status, stored) = match outcome {
            FeedbackOutcome::Created(r) => (FeedbackStatus::Created, r),
            FeedbackOutcome::Replayed(r) => (FeedbackStatus::Replayed, r),
        };
        if status == FeedbackStatus::Created {
            metrics::counter!("ulm_feedback_received_total", "source" => stored.source.clone())
                .increment(1);
        }
        items.push(FeedbackResult {
            status,
            feedback: view(stored),
        });
    }
    Ok((StatusCode::CREATED, Json(FeedbackResponse { items })))
}

fn validate(item: &FeedbackItem) -> Result<(), String> {
    let too_long = |field: &str, v: &Option<String>, max: usize| match v {
        Some(s) if s.chars().count() > max => {
            Err(format!("{field} is longer than {max} characters"))
        }
        _ => Ok(()),
    };
    if item.sample_id.trim().is_empty() || item.sample_id.len() > MAX_ID_CHARS {
        return Err("sample_id must be a sample id".into());
    }
    if item.key.trim().is_empty() || item.key.chars().count() > MAX_KEY_CHARS {
        return Err(format!("key must be 1 to {MAX_KEY_CHARS} characters"));
    }
    if let Some(score) = item.score {
        if !score.is_finite() || score.abs() > MAX_SCORE {
            return Err(format!(
                "score must be between -{MAX_SCORE} and {MAX_SCORE}"
            ));
        }
    }
    if item.score.is_none() && item.value.is_none() && item.correction.is_none() {
        return Err("give at least one of score, value or correction".into());
    }
    too_long("value", &item.value, MAX_KEY_CHARS * 4)?;
    too_long("comment", &item.comment, MAX_TEXT_CHARS)?;
    too_long("correction", &item.correction, MAX_TEXT_CHARS)?;
    too_long("client_id", &item.client_id, MAX_ID_CHARS)?;
    if let Some(source) = &item.source {
        too_long("source.user_id", &source.user_id, MAX_ID_CHARS)?;
    }
    if item
        .client_id
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err("client_id must not be empty".into());
    }
    Ok(())
}

fn source_name(t: FeedbackSourceType) -> &'static str {
    match t {
        FeedbackSourceType::Human => "human",
        FeedbackSourceType::Model => "model",
        FeedbackSourceType::Api => "api",
    }
}

fn to_record(item: FeedbackItem) -> FeedbackRecord {
    // The idempotency fingerprint is the canonical JSON of the parsed item.
    let body_sha256 = sha256_hex(serde_json::to_string(&item).unwrap_or_default().as_bytes());
    let source = item.source.unwrap_or(FeedbackSource {
        source_type: FeedbackSourceType::Api,
        user_id: None,
    });
    FeedbackRecord {
        id: uuid::Uuid::new_v4().to_string(),
        client_id: item.client_id,
        body_sha256,
        sample_id: item.sample_id,
        key: item.key,
        score: item.score,
        value: item.value,
        comment: item.comment,
        correction: item.correction,
        source: source_name(source.source_type).to_string(),
        user_id: source.user_id,
        created_at: now_ms(),
    }
}

pub fn view(r: FeedbackRecord) -> FeedbackView {
    let source_type = match r.source.as_str() {
        "human" => FeedbackSourceType::Human,
        "model" => FeedbackSourceType::Model,
        _ => FeedbackSourceType::Api,
    };
    FeedbackView {
        id: r.id,
        sample_id: r.sample_id,
        key: r.key,
        score: r.score,
        value: r.value,
        comment: r.comment,
        correction: r.correction,
        source: FeedbackSource {
            source_type,
            user_id: r.user_id,
        },
        client_id: r.client_id,
        created_at: r.created_at,
    }
}
