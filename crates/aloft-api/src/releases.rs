//! Releases (Aloft's addition; Fly keeps them outside the Machines API): a numbered
//! record per deploy under `releases/{app}/{n}` (n zero-padded so the catalog lists
//! them in order), and a rollback that re-applies a release's configs to the app's
//! machines through their agents and records the result as a new release.

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_agent::UpdateMachine;
use aloft_store::{Expect, StoreError};
use aloft_types::catalog::SCHEMA_VERSION;
use aloft_types::machine::{METADATA_PROCESS_GROUP, MachineConfig, MachineState};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::JsonBody;
use crate::machines::{app_machines, machine_agent};
use crate::openapi::doc;
use crate::secrets;
use crate::util::now_rfc3339;

/// `releases/{app}/`
pub fn releases_prefix(app: &str) -> String {
    format!("releases/{app}/")
}

/// `releases/{app}/{n}` with `n` zero-padded to 10 digits.
pub fn release_key(app: &str, n: u64) -> String {
    format!("releases/{app}/{n:010}")
}

const STATUSES: &[&str] = &["pending", "running", "complete", "failed", "rolled_back"];

/// One release of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub schema: u32,
    pub app: String,
    pub version: u64,
    /// pending, running, complete, failed or rolled_back
    pub status: String,
    pub image: String,
    /// The machine config of each process group, as deployed.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, doc::MachineConfig>)]
    pub configs: BTreeMap<String, MachineConfig>,
    #[serde(default)]
    pub strategy: String,
    #[serde(default)]
    pub description: String,
    /// The token that recorded it.
    pub user: String,
    pub created_at: String,
    pub updated_at: String,
}

/// The list of releases, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListReleasesResponse {
    pub releases: Vec<Release>,
}

/// `POST /apps/{app}/releases`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateReleaseRequest {
    pub image: String,
    #[schema(value_type = BTreeMap<String, doc::MachineConfig>)]
    pub configs: BTreeMap<String, MachineConfig>,
    pub strategy: String,
    pub description: String,
    /// Default `pending`.
    pub status: Option<String>,
}

/// `PATCH /apps/{app}/releases/{version}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UpdateReleaseRequest {
    pub status: String,
}

fn check_status(s: &str) -> Result<(), ApiError> {
    if STATUSES.contains(&s) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid field `status`: {s:?} is not one of {}",
            STATUSES.join(", ")
        )))
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Release, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Internal(format!("catalog record {key}: {e}")))
}

fn encode(r: &Release) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(r).map_err(|e| ApiError::Internal(format!("encoding release: {e}")))
}

async fn all(state: &ApiState, app: &str) -> Result<Vec<Release>, ApiError> {
    let listing = state.store().list(&releases_prefix(app)).await?;
    let mut out = listing
        .entries
        .iter()
        .map(|e| decode(&e.key, &e.value))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| std::cmp::Reverse(r.version));
    Ok(out)
}

/// Records a new release with the next version number (compare-and-swap on the key).
pub async fn record(state: &ApiState, mut rel: Release) -> Result<Release, ApiError> {
    for _ in 0..16 {
        let next = all(state, &rel.app)
            .await?
            .first()
            .map_or(1, |r| r.version + 1);
        rel.version = next;
        let key = release_key(&rel.app, next);
        match state
            .store()
            .put_if(&key, encode(&rel)?, Expect::Absent)
            .await
        {
            Ok(_) => return Ok(rel),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "releases of app {:?} changed concurrently too many times; retry",
        rel.app
    )))
}

async fn load(state: &ApiState, app: &str, version: u64) -> Result<(Release, u64), ApiError> {
    let key = release_key(app, version);
    let e = state.store().get(&key).await?.ok_or_else(|| {
        ApiError::NotFound(format!("release v{version} of app {app:?} not found"))
    })?;
    Ok((decode(&key, &e.value)?, e.revision))
}

#[utoipa::path(get, path = "/apps/{app_name}/releases", tag = "Releases", operation_id = "Releases_list",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 200, description = "OK", body = ListReleasesResponse)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<ListReleasesResponse>, ApiError> {
    Ok(Json(ListReleasesResponse {
        releases: all(&state, &app).await?,
    }))
}

#[utoipa::path(post, path = "/apps/{app_name}/releases", tag = "Releases", operation_id = "Releases_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateReleaseRequest, description = "The deploy to record"),
    responses((status = 201, description = "Created", body = Release),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Extension(who): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<CreateReleaseRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if req.image.trim().is_empty() {
        return Err(ApiError::BadRequest("field `image` is required".into()));
    }
    let status = req.status.unwrap_or_else(|| "pending".into());
    check_status(&status)?;
    let now = now_rfc3339();
    let rel = record(
        &state,
        Release {
            schema: SCHEMA_VERSION,
            app,
            version: 0,
            status,
            image: req.image,
            configs: req.configs,
            strategy: req.strategy,
            description: req.description,
            user: who.token_id.clone(),
            created_at: now.clone(),
            updated_at: now,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(rel)))
}

#[utoipa::path(get, path = "/apps/{app_name}/releases/{version}", tag = "Releases", operation_id = "Releases_show",
    params(("app_name" = String, Path, description = "Fly App Name"), ("version" = u64, Path, description = "Release number")),
    responses((status = 200, description = "OK", body = Release)))]
pub async fn show(
    State(state): State<ApiState>,
    Path((app, version)): Path<(String, String)>,
) -> Result<Json<Release>, ApiError> {
    Ok(Json(load(&state, &app, parse_version(&version)?).await?.0))
}

fn parse_version(v: &str) -> Result<u64, ApiError> {
    v.trim_start_matches('v')
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid release version {v:?}")))
}

#[utoipa::path(patch, path = "/apps/{app_name}/releases/{version}", tag = "Releases", operation_id = "Releases_update",
    params(("app_name" = String, Path, description = "Fly App Name"), ("version" = u64, Path, description = "Release number")),
    request_body(content = UpdateReleaseRequest, description = "The new status"),
    responses((status = 200, description = "OK", body = Release),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn update(
    State(state): State<ApiState>,
    Path((app, version)): Path<(String, String)>,
    JsonBody(req): JsonBody<UpdateReleaseRequest>,
) -> Result<Json<Release>, ApiError> {
    check_status(&req.status)?;
    let n = parse_version(&version)?;
    let (mut rel, rev) = load(&state, &app, n).await?;
    rel.status = req.status;
    rel.updated_at = now_rfc3339();
    match state
        .store()
        .put_if(&release_key(&app, n), encode(&rel)?, Expect::Revision(rev))
        .await
    {
        Ok(_) => Ok(Json(rel)),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "release v{n} changed meanwhile; read it again"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Re-applies release `version` to every live machine of the app: a machine of a
/// process group the release has a config for gets that config; any other machine
/// gets the release's image in its current config. Records a new release.
#[utoipa::path(post, path = "/apps/{app_name}/releases/{version}/rollback", tag = "Releases", operation_id = "Releases_rollback",
    params(("app_name" = String, Path, description = "Fly App Name"), ("version" = u64, Path, description = "Release to go back to")),
    responses((status = 201, description = "The new release (complete or failed)", body = Release)))]
pub async fn rollback(
    State(state): State<ApiState>,
    Path((app, version)): Path<(String, String)>,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<impl IntoResponse, ApiError> {
    let (target, _) = load(&state, &app, parse_version(&version)?).await?;
    let secrets = secrets::app_secrets(&state, &app).await?;
    let mut failure = None;
    for m in app_machines(&state, &app).await? {
        if m.state == MachineState::Destroyed {
            continue;
        }
        let group = m
            .config
            .metadata
            .get(METADATA_PROCESS_GROUP)
            .cloned()
            .unwrap_or_default();
        let config = match target.configs.get(&group) {
            Some(c) => c.clone(),
            None => MachineConfig {
                image: target.image.clone(),
                ..m.config.clone()
            },
        };
        if config == m.config {
            continue;
        }
        let result = async {
            let a = machine_agent(&state, &app, &m.id).await?;
            a.update_machine(
                &app,
                &m.id,
                UpdateMachine {
                    config,
                    name: None,
                    current_version: Some(m.instance_id.clone()),
                    skip_launch: m.state != MachineState::Started,
                    secrets: secrets.clone(),
                },
                None,
            )
            .await
            .map_err(ApiError::from)
        }
        .await;
        if let Err(e) = result {
            failure = Some(format!("machine {}: {e}", m.id));
            break;
        }
    }
    let now = now_rfc3339();
    let rel = record(
        &state,
        Release {
            schema: SCHEMA_VERSION,
            app: app.clone(),
            version: 0,
            status: if failure.is_some() {
                "failed"
            } else {
                "complete"
            }
            .into(),
            image: target.image.clone(),
            configs: target.configs.clone(),
            strategy: "rollback".into(),
            description: match &failure {
                None => format!("rollback to v{}", target.version),
                Some(f) => format!("rollback to v{} failed: {f}", target.version),
            },
            user: who.token_id.clone(),
            created_at: now.clone(),
            updated_at: now,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(rel)))
}
