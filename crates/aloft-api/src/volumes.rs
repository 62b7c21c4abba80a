//! Volumes (`/apps/{app}/volumes…`): placed like machines, then owned by their host's agent.

use aloft_agent::CreateVolume;
use aloft_types::machine::Volume;
use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::JsonBody;
use crate::openapi::doc;
use crate::placement::{place_volume, volume_agent};

/// Fly's `CreateVolumeRequest` (the fields Aloft honours).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateVolumeRequest {
    pub name: String,
    pub size_gb: Option<i64>,
    pub region: Option<String>,
    pub snapshot_retention: Option<i64>,
    pub encrypted: Option<bool>,
    pub fstype: Option<String>,
}

/// Fly's `ExtendVolumeRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ExtendVolumeRequest {
    pub size_gb: i64,
}

/// Fly's `ExtendVolumeResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExtendVolumeResponse {
    #[schema(value_type = doc::Volume)]
    pub volume: Volume,
    pub needs_restart: bool,
}

/// Fly's `VolumeSnapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    pub id: String,
    pub created_at: String,
    pub size: i64,
    pub status: String,
}

fn valid_volume_name(n: &str) -> bool {
    (1..=30).contains(&n.len())
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[utoipa::path(get, path = "/apps/{app_name}/volumes", tag = "Volumes", operation_id = "Volumes_list",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 200, description = "OK", body = Vec<doc::Volume>)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<Vec<Volume>>, ApiError> {
    let mut out = Vec::new();
    for a in state.agents() {
        out.extend(a.list_volumes(&app).await?);
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(Json(out))
}

#[utoipa::path(post, path = "/apps/{app_name}/volumes", tag = "Volumes", operation_id = "Volumes_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateVolumeRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = doc::Volume),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<CreateVolumeRequest>,
) -> Result<Json<Volume>, ApiError> {
    if !valid_volume_name(&req.name) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `name`: {:?} must be 1-30 lowercase letters, digits or _",
            req.name
        )));
    }
    let size_gb = req.size_gb.unwrap_or(1);
    if !(1..=500).contains(&size_gb) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `size_gb`: {size_gb} is not between 1 and 500"
        )));
    }
    if let Some(fs) = req.fstype.as_deref().filter(|f| *f != "ext4") {
        return Err(ApiError::BadRequest(format!(
            "invalid field `fstype`: only ext4 is supported, not {fs:?}"
        )));
    }
    let agent = place_volume(&state, &app, req.region.as_deref()).await?;
    let v = agent
        .create_volume(CreateVolume {
            app,
            name: req.name,
            size_gb,
            region: Some(agent.region().to_string()),
            snapshot_retention: req.snapshot_retention,
        })
        .await?;
    Ok(Json(v))
}

#[utoipa::path(get, path = "/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volumes_get_by_id",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    responses((status = 200, description = "OK", body = doc::Volume)))]
pub async fn show(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Volume>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    Ok(Json(a.get_volume(&app, &id).await?))
}

#[utoipa::path(delete, path = "/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volume_delete",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    responses((status = 200, description = "OK", body = doc::Volume)))]
pub async fn destroy(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Volume>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    Ok(Json(a.destroy_volume(&app, &id).await?))
}

#[utoipa::path(put, path = "/apps/{app_name}/volumes/{volume_id}/extend", tag = "Volumes", operation_id = "Volumes_extend",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    request_body(content = ExtendVolumeRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = ExtendVolumeResponse)))]
pub async fn extend(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<ExtendVolumeRequest>,
) -> Result<Json<ExtendVolumeResponse>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    let before = a.get_volume(&app, &id).await?;
    if req.size_gb <= before.size_gb || req.size_gb > 500 {
        return Err(ApiError::BadRequest(format!(
            "invalid field `size_gb`: {} must be larger than the current {} GB and at most 500",
            req.size_gb, before.size_gb
        )));
    }
    let volume = a.extend_volume(&app, &id, req.size_gb).await?;
    Ok(Json(ExtendVolumeResponse {
        needs_restart: volume.attached_machine_id.is_some(),
        volume,
    }))
}

/// Aloft takes no volume snapshots yet, so the list is empty for an existing volume.
#[utoipa::path(get, path = "/apps/{app_name}/volumes/{volume_id}/snapshots", tag = "Volumes", operation_id = "Volumes_list_snapshots",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    responses((status = 200, description = "OK", body = Vec<VolumeSnapshot>)))]
pub async fn snapshots(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Vec<VolumeSnapshot>>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    a.get_volume(&app, &id).await?;
    Ok(Json(Vec::new()))
}
