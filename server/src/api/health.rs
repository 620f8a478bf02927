use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::error::ErrorBody;
use super::types::{Health, ModelList, ModelView};
use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        model_loaded: state.engine.is_alive(),
        database: true,
        queue_depth: state.engine.queue_depth(),
    })
}

/// Readiness: the model is loaded and the database reachable.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let model_loaded = state.engine.is_alive();
    let database = state.store.ping().await;
    let ready = model_loaded && database;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ready { "ready" } else { "not_ready" }.into(),
            model_loaded,
            database,
            queue_depth: state.engine.queue_depth(),
        }),
    )
}

/// The served model.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "Models", body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let info = &state.engine.info;
    Json(ModelList {
        data: vec![ModelView {
            id: state.engine.model_version().to_string(),
            description: info.description.clone(),
            demo: info.is_demo,
            active: true,
            max_context_tokens: info.max_positions,
            image_tokens_per_image: info.image_tokens_per_image,
            generated_image_size: info.generated_image_size,
            understanding_image_size: info.understanding_image_size,
        }],
    })
}
