use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::types::Health;
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
