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
    /// Restore from this snapshot (held by the host of the volume it was taken of).
    pub snapshot_id: Option<String>,
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
    /// Bytes on disk (sparse).
    pub size: i64,
    pub status: String,
    /// Bytes of the volume it was taken of.
    pub volume_size: i64,
    /// Empty: Aloft does not hash snapshots.
    pub digest: String,
    pub retention_days: i64,
}

impl From<aloft_types::machine::VolumeSnapshot> for VolumeSnapshot {
    fn from(s: aloft_types::machine::VolumeSnapshot) -> Self {
        VolumeSnapshot {
            id: s.id,
            created_at: s.created_at,
            size: s.size,
            status: s.status,
            volume_size: s.volume_size,
            digest: s.digest,
            retention_days: s.retention_days,
        }
    }
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
    if let Some(r) = req.snapshot_retention
        && !(1..=60).contains(&r)
    {
        return Err(ApiError::BadRequest(format!(
            "invalid field `snapshot_retention`: {r} days is not between 1 and 60"
        )));
    }
    let snapshot_id = req.snapshot_id.filter(|s| !s.is_empty());
    let agent = match &snapshot_id {
        // A restore happens where the snapshot is.
        Some(snap) => snapshot_agent(&state, &app, snap).await?,
        None => place_volume(&state, &app, req.region.as_deref()).await?,
    };
    let v = agent
        .create_volume(CreateVolume {
            app,
            name: req.name,
            size_gb,
            region: Some(agent.region().to_string()),
            snapshot_retention: req.snapshot_retention,
            snapshot_id,
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

/// The agent holding snapshot `snap` of one of `app`'s volumes.
async fn snapshot_agent(
    state: &ApiState,
    app: &str,
    snap: &str,
) -> Result<std::sync::Arc<dyn aloft_agent::AgentApi>, ApiError> {
    for a in state.agents() {
        for v in a.list_volumes(app).await? {
            let snaps = a.list_volume_snapshots(app, &v.id).await?;
            if snaps.iter().any(|s| s.id == snap) {
                return Ok(a.clone());
            }
        }
    }
    Err(ApiError::BadRequest(format!(
        "invalid field `snapshot_id`: no snapshot {snap:?} of app {app}'s volumes"
    )))
}

/// The volume's snapshots, oldest first (those past the retention are dropped).
#[utoipa::path(get, path = "/apps/{app_name}/volumes/{volume_id}/snapshots", tag = "Volumes", operation_id = "Volumes_list_snapshots",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    responses((status = 200, description = "OK", body = Vec<VolumeSnapshot>)))]
pub async fn snapshots(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Vec<VolumeSnapshot>>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    let list = a.list_volume_snapshots(&app, &id).await?;
    Ok(Json(list.into_iter().map(VolumeSnapshot::from).collect()))
}

/// Takes a snapshot now; a machine using the volume is paused for the copy.
#[utoipa::path(post, path = "/apps/{app_name}/volumes/{volume_id}/snapshots", tag = "Volumes", operation_id = "createVolumeSnapshot",
    params(("app_name" = String, Path, description = "Fly App Name"), ("volume_id" = String, Path, description = "Volume ID")),
    responses((status = 200, description = "OK", body = VolumeSnapshot)))]
pub async fn snapshot_create(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<VolumeSnapshot>, ApiError> {
    let a = volume_agent(&state, &app, &id).await?;
    Ok(Json(a.create_volume_snapshot(&app, &id).await?.into()))
}

/// Fly's `OrgVolume`: a volume with its app.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgVolume {
    pub id: String,
    pub name: String,
    pub app_name: String,
    pub state: String,
    pub size_gb: i64,
    pub region: String,
    pub zone: String,
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_machine_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_alloc_id: Option<String>,
    pub created_at: String,
    /// Aloft volumes change in place; this is their creation time.
    pub updated_at: String,
    /// ok, unknown or unreachable
    pub host_status: String,
    pub fstype: String,
    pub snapshot_retention: i64,
    pub auto_backup_enabled: bool,
    /// `local` (Aloft volumes live on their host's disk).
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
}

/// Fly's `OrgVolumesResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgVolumesResponse {
    pub volumes: Vec<OrgVolume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_volume_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_at: Option<String>,
}

/// Most volumes one org-wide page holds.
const MAX_ORG_VOLUMES_PAGE: usize = 1000;

/// The volumes of every app of `org` that `who` may see (an app token: its app's),
/// with their app's name, as the agents report them.
pub(crate) async fn org_volumes(
    state: &ApiState,
    who: &crate::auth::Principal,
    org: &str,
) -> Result<Vec<(String, Volume)>, ApiError> {
    let mut all: Vec<(String, Volume)> = Vec::new();
    for e in state.store().list("apps/").await?.entries {
        let rec: aloft_types::catalog::AppRecord = serde_json::from_slice(&e.value)
            .map_err(|err| ApiError::Internal(format!("catalog record {}: {err}", e.key)))?;
        if rec.org != org || who.app.as_deref().is_some_and(|a| a != rec.name) {
            continue;
        }
        for a in state.agents() {
            for v in a.list_volumes(&rec.name).await? {
                all.push((rec.name.clone(), v));
            }
        }
    }
    Ok(all)
}

/// Every volume of the organisation's apps (those the token may see).
#[utoipa::path(get, path = "/orgs/{org_slug}/volumes", tag = "Volumes", operation_id = "Volumes_org_list",
    params(("org_slug" = String, Path, description = "Fly Organization Slug"),
        ("include_deleted" = Option<bool>, Query, description = "Include deleted volumes"),
        ("region" = Option<String>, Query, description = "Region filter"),
        ("state" = Option<String>, Query, description = "Comma separated list of volume states to filter"),
        ("summary" = Option<bool>, Query, description = "Only return summary info about volumes"),
        ("updated_after" = Option<String>, Query, description = "Only volumes updated after this RFC 3339 time"),
        ("cursor" = Option<String>, Query, description = "Pagination cursor from a previous response"),
        ("limit" = Option<u64>, Query, description = "The number of volumes to fetch (max of 1000)")),
    responses((status = 200, description = "OK", body = OrgVolumesResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn org_list(
    State(state): State<ApiState>,
    axum::Extension(who): axum::Extension<std::sync::Arc<crate::auth::Principal>>,
    Path(org): Path<String>,
    q: crate::extract::QueryPairs,
) -> Result<Json<OrgVolumesResponse>, ApiError> {
    if org != who.org {
        return Err(ApiError::NotFound(format!(
            "organization {org:?} not found"
        )));
    }
    let include_deleted = q.bool("include_deleted")?;
    q.bool("summary")?; // Aloft volumes carry no bulky fields to leave out.
    let region = q.get("region").filter(|r| !r.is_empty());
    let states: Vec<String> = q
        .all("state")
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let updated_after = q.get("updated_after").filter(|s| !s.is_empty());
    let cursor = match q.get("cursor").filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(c.split_once('|').ok_or_else(|| {
            ApiError::BadRequest(format!("invalid query parameter `cursor`: {c:?}"))
        })?),
    };
    let limit = (q.u64("limit")?.unwrap_or(MAX_ORG_VOLUMES_PAGE as u64) as usize)
        .clamp(1, MAX_ORG_VOLUMES_PAGE);
    let mut all = org_volumes(&state, &who, &org).await?;
    all.retain(|(_, v)| {
        let deleted = v.state == "destroyed" || v.state == "destroying";
        (include_deleted || !deleted)
            && region.is_none_or(|r| v.region == r)
            && (states.is_empty() || states.contains(&v.state))
            && updated_after.is_none_or(|t| v.created_at.as_str() > t)
            && cursor.is_none_or(|(t, id)| (v.created_at.as_str(), v.id.as_str()) > (t, id))
    });
    all.sort_by(|(_, a), (_, b)| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let more = all.len() > limit;
    all.truncate(limit);
    let last = all
        .last()
        .map(|(_, v)| (v.id.clone(), v.created_at.clone()));
    Ok(Json(OrgVolumesResponse {
        next_cursor: last
            .as_ref()
            .filter(|_| more)
            .map(|(id, t)| format!("{t}|{id}")),
        last_volume_id: last.as_ref().map(|(id, _)| id.clone()),
        last_updated_at: last.map(|(_, t)| t),
        volumes: all
            .into_iter()
            .map(|(app_name, v)| OrgVolume {
                updated_at: v.created_at.clone(),
                id: v.id,
                name: v.name,
                app_name,
                state: v.state,
                size_gb: v.size_gb,
                region: v.region,
                zone: v.zone,
                encrypted: v.encrypted,
                attached_machine_id: v.attached_machine_id,
                attached_alloc_id: v.attached_alloc_id,
                created_at: v.created_at,
                host_status: v.host_status,
                fstype: v.fstype,
                snapshot_retention: v.snapshot_retention,
                auto_backup_enabled: v.auto_backup_enabled,
                kind: "local".into(),
            })
            .collect(),
    }))
}
