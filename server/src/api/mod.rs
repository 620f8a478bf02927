//! The HTTP API (axum): routes, validation, auth, metrics and the OpenAPI
//! document. It talks to the engine and the store and never touches tensors.

pub mod answer;
pub mod auth;
pub mod error;
pub mod feedback;
pub mod generate;
pub mod health;
pub mod job_config;
pub mod limits;
pub mod models;
pub mod openai;
pub mod playground;
pub mod rl;
pub mod samples;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use auth::Auth;
use error::ApiError;
use limits::Limits;
use ulm_core::engine::Engine;
use ulm_core::registry::Registry;
use ulm_core::scheduler::Scheduler;
use ulm_core::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub store: Store,
    pub limits: Arc<Limits>,
    pub metrics: PrometheusHandle,
    pub registry: Registry,
    pub scheduler: Scheduler,
    /// Bounds the images being decoded at once (`Limits::max_concurrent_decodes`).
    pub decode_slots: Arc<tokio::sync::Semaphore>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ULM-R1 server",
        description = "Text-to-image generation and multimodal question answering with a Janus-Pro / ULM-R1 \
                       model; every sample and feedback item is stored for GRPO refinement. Errors are \
                       `{\"error\": {\"code\", \"message\"}}` with a stable code.",
        license(name = "MIT")
    ),
    paths(
        generate::generate,
        answer::answer,
        openai::chat::chat_completions,
        openai::images::generations,
        feedback::post_feedback,
        samples::get_sample,
        samples::get_image,
        models::list_models,
        models::activate,
        rl::start_job,
        rl::list_jobs,
        rl::get_job,
        rl::get_curves,
        rl::cancel_job,
        health::healthz,
        health::readyz,
        metrics_text,
        playground::page,
    ),
    modifiers(&BearerAuth, &InternalErrors),
    tags(
        (name = "inference", description = "Generate images, answer questions"),
        (name = "openai", description = "OpenAI-compatible chat completions and image generation (the `openai` SDK works against them)"),
        (name = "feedback", description = "Judgements on served samples"),
        (name = "samples", description = "Stored samples and images"),
        (name = "models", description = "Model versions: list, activate (rollback)"),
        (name = "rl", description = "GRPO refinement jobs (admin)"),
        (name = "operations", description = "Health, metrics and the playground page"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("API key"))
                    .build(),
            ),
        );
    }
}

/// Every operation that answers errors in the envelope can also fail inside
/// the server: each documents its 500. (Health and metrics answer in their
/// own shapes and cannot fail that way.)
struct InternalErrors;

impl Modify for InternalErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let internal = ResponseBuilder::new()
            .description("Internal error; the server's log has the details")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let answers_errors = operation
                    .responses
                    .responses
                    .keys()
                    .any(|s| s.starts_with('4'));
                if !answers_errors {
                    continue;
                }
                operation
                    .responses
                    .responses
                    .entry("500".into())
                    .or_insert_with(|| internal.clone().into());
            }
        }
    }
}

/// The OpenAPI document as served at `/openapi.json` and committed at `openapi/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    metrics::gauge!("ulm_queue_depth").set(state.engine.queue_depth() as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

/// Request count and latency per route and status.
async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("ulm_http_requests_total", &labels).increment(1);
    metrics::histogram!("ulm_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A panic in a handler answers a JSON 500 instead of dropping the connection.
fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response {
    ApiError::Internal("a handler panicked".into()).into_response()
}

/// What a worker process answers over HTTP: health and metrics.
pub fn operations_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

pub fn router(state: AppState, auth: Auth) -> Router {
    let auth = Arc::new(auth);
    let body_limit = state.limits.max_body_bytes;
    let body_timeout = state.limits.body_timeout;
    let user_routes = Router::new()
        .route("/v1/generate", post(generate::generate))
        .route("/v1/answer", post(answer::answer))
        .route("/v1/chat/completions", post(openai::chat::chat_completions))
        .route("/v1/images/generations", post(openai::images::generations))
        .route("/v1/feedback", post(feedback::post_feedback))
        .route("/v1/samples/{id}", get(samples::get_sample))
        .route("/v1/images/{sample_id}", get(samples::get_image))
        .route("/v1/models", get(models::list_models))
        .route_layer(middleware::from_fn_with_state(
            auth.clone(),
            auth::require_user,
        ));
    let admin_routes = Router::new()
        .route("/v1/models/{version}/activate", post(models::activate))
        .route("/v1/rl/jobs", post(rl::start_job).get(rl::list_jobs))
        .route("/v1/rl/jobs/{id}", get(rl::get_job))
        .route("/v1/rl/jobs/{id}/curves.png", get(rl::get_curves))
        .route("/v1/rl/jobs/{id}/cancel", post(rl::cancel_job))
        .route_layer(middleware::from_fn_with_state(auth, auth::require_admin));
    let public = Router::new()
        .route("/", get(playground::page))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics_text));
    Router::new()
        .merge(user_routes)
        .merge(admin_routes)
        .merge(public)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(track))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500() {
        let app = Router::new()
            .route("/boom", get(|| async { panic!("boom") as &str }))
            .layer(CatchPanicLayer::custom(panic_response));
        let request = Request::builder()
            .uri("/boom")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal");
    }
}
