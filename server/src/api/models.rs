//! Model versions: list them, activate one (promotion by hand, or rollback).

use axum::extract::State;
use axum::Extension;
use axum::Json;

use super::auth::Role;
use super::error::{ApiError, ApiPath, ErrorBody};
use super::types::{ModelList, ModelView, SamplingDefaultsView};
use super::AppState;
use ulm_core::registry::RegistryError;
use ulm_core::store::jobs::VersionRecord;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownVersion(v) => {
                ApiError::NotFound(format!("model version {v} does not exist"))
            }
            RegistryError::Store(e) => e.into(),
            load @ (RegistryError::Load { .. } | RegistryError::Thread { .. }) => {
                ApiError::Internal(load.to_string())
            }
        }
    }
}

fn view(state: &AppState, v: VersionRecord, active: &str) -> ModelView {
    let info = &state.engine.info;
    let base = v.parent.is_none();
    ModelView {
        description: if base {
            info.description.clone()
        } else {
            format!(
                "LoRA adapters over the base model, trained by job {}",
                v.job_id.clone().unwrap_or_default()
            )
        },
        demo: info.is_demo,
        active: v.id == active,
        id: v.id,
        object: "model".into(),
        created: v.created_at / 1000,
        owned_by: "ulm-server".into(),
        parent: v.parent,
        job_id: v.job_id,
        checkpoint_path: v.checkpoint_path,
        metrics: v.metrics,
        created_at: v.created_at,
        max_context_tokens: info.max_positions,
        image_tokens_per_image: info.image_tokens_per_image,
        generated_image_size: info.generated_image_size,
        understanding_image_size: info.understanding_image_size,
        sampling: SamplingDefaultsView {
            cfg_weight: info.sampling.guidance_scale,
            temperature: info.sampling.temperature,
            plan_temperature: info.sampling.plan_temperature,
            best_of: info.sampling.best_of,
        },
    }
}

/// What `role` may see of a version: server paths are for admins.
fn for_role(mut view: ModelView, role: Role) -> ModelView {
    if role < Role::Admin {
        view.checkpoint_path = None;
    }
    view
}

/// Every model version, oldest first; `active` marks the one served.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "Model versions", body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_models(
    State(state): State<AppState>,
    Extension(role): Extension<Role>,
) -> Result<Json<ModelList>, ApiError> {
    let active = state.engine.model_version();
    let versions = state.store.list_versions().await?;
    Ok(Json(ModelList {
        object: "list".into(),
        data: versions
            .into_iter()
            .map(|v| for_role(view(&state, v, &active), role))
            .collect(),
    }))
}

/// Serves this version from the next batch on (requests already running
/// finish on theirs). Activating an earlier version is a rollback.
#[utoipa::path(post, path = "/v1/models/{version}/activate", tag = "models",
    params(("version" = String, Path, description = "Version id")),
    responses(
        (status = 200, description = "Now active", body = ModelView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such version", body = ErrorBody),
        (status = 500, description = "The version's checkpoint does not load", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn activate(
    State(state): State<AppState>,
    ApiPath(version): ApiPath<String>,
) -> Result<Json<ModelView>, ApiError> {
    let record = state.registry.activate(&version).await?;
    let active = record.id.clone();
    Ok(Json(view(&state, record, &active)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_admins_see_where_adapters_are_stored() {
        let version: ModelView = serde_json::from_value(serde_json::json!({
            "id": "v1", "object": "model", "created": 0, "owned_by": "ulm-server", "description": "", "demo": true, "active": true, "parent": "demo-base",
            "job_id": "job", "checkpoint_path": "adapters/0f3a", "metrics": {}, "created_at": 0,
            "max_context_tokens": 1, "image_tokens_per_image": 1, "generated_image_size": 1,
            "understanding_image_size": 1, "sampling": {"cfg_weight": 5.0, "temperature": 1.0},
        }))
        .unwrap();
        assert!(for_role(version.clone(), Role::User)
            .checkpoint_path
            .is_none());
        assert_eq!(
            for_role(version, Role::Admin).checkpoint_path.as_deref(),
            Some("adapters/0f3a")
        );
    }
}
