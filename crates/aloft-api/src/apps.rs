//! Apps (`/apps`, `/apps/{app}`) and their secrets (`/apps/{app}/secrets…`).

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_store::{Expect, Op, StoreError};
use aloft_types::catalog::{AppRecord, SCHEMA_VERSION, app_key};
use aloft_types::machine::MachineState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::{OrgRecord, Principal, TokenRecord, org_key, read_record};
use crate::error::{ApiError, ErrorResponse};
use crate::extract::{JsonBody, QueryPairs};
use crate::secrets::{self, AppSecret};
use crate::util::{now_rfc3339, random_hex};

/// Fly's `AppOrganizationInfo`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppOrganizationInfo {
    pub name: String,
    pub slug: String,
}

/// Fly's `App`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct App {
    pub id: String,
    pub name: String,
    pub network: String,
    pub organization: AppOrganizationInfo,
    /// `deployed` when a machine runs, `suspended` when none does, `pending` without machines.
    pub status: String,
    pub machine_count: i64,
    pub volume_count: i64,
}

/// Fly's `ListAppsResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListAppsResponse {
    pub apps: Vec<App>,
    pub total_apps: i64,
}

/// Fly's `CreateAppRequest` (`app_name` is accepted for older clients).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateAppRequest {
    #[serde(alias = "app_name")]
    pub name: String,
    pub org_slug: String,
    pub network: String,
    pub enable_subdomains: bool,
}

/// Fly's `AppSecrets`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppSecrets {
    pub secrets: Vec<AppSecret>,
}

/// Fly's `AppSecretsUpdateRequest`: a value to set, or `null` to remove.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct AppSecretsUpdateRequest {
    pub values: BTreeMap<String, Option<String>>,
}

/// Fly's `AppSecretsUpdateResp`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppSecretsUpdateResp {
    pub secrets: Vec<AppSecret>,
    pub version: i64,
}

/// Fly's `SetAppSecretRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SetAppSecretRequest {
    pub value: Option<String>,
}

/// Fly's `SetAppSecretResponse` (without the value).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetAppSecretResponse {
    pub name: String,
    pub digest: String,
    pub created_at: String,
    pub updated_at: String,
    pub version: i64,
}

/// Fly's `DeleteAppSecretResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeleteAppSecretResponse {
    pub version: i64,
}

/// Fly app names: lowercase letters, digits and dashes, 2–63 characters, starting
/// with a letter, not ending with a dash.
pub fn valid_app_name(name: &str) -> bool {
    let b = name.as_bytes();
    (2..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

async fn app_view(state: &ApiState, rec: &AppRecord) -> Result<App, ApiError> {
    let mut machines = 0;
    let mut running = 0;
    let mut volumes = 0;
    for m in crate::machines::app_machines(state, &rec.name).await? {
        if m.state != MachineState::Destroyed {
            machines += 1;
            running += i64::from(m.state == MachineState::Started);
        }
    }
    for a in state.agents() {
        match a.list_volumes(&rec.name).await {
            Ok(vs) => volumes += vs.len() as i64,
            Err(e) => tracing::warn!(host = a.host_id(), error = %e, "counting volumes"),
        }
    }
    let status = match (machines, running) {
        (0, _) => "pending",
        (_, 0) => "suspended",
        _ => "deployed",
    };
    Ok(App {
        id: rec.id.clone(),
        name: rec.name.clone(),
        network: rec.network.clone(),
        organization: AppOrganizationInfo {
            name: rec.org.clone(),
            slug: rec.org.clone(),
        },
        status: status.into(),
        machine_count: machines,
        volume_count: volumes,
    })
}

async fn load_app(state: &ApiState, app: &str) -> Result<AppRecord, ApiError> {
    read_record(state.store(), &app_key(app))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("app {app:?} not found")))
}

#[utoipa::path(get, path = "/apps", tag = "Apps", operation_id = "Apps_list",
    params(("org_slug" = String, Query, description = "The org slug, or 'personal', to filter apps")),
    responses((status = 200, description = "OK", body = ListAppsResponse)))]
pub async fn list(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    q: QueryPairs,
) -> Result<Json<ListAppsResponse>, ApiError> {
    let org = q
        .get("org_slug")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::BadRequest("query parameter `org_slug` is required".into()))?;
    if org != who.org {
        return Err(ApiError::NotFound(format!(
            "organization {org:?} not found"
        )));
    }
    let listing = state.store().list("apps/").await?;
    let mut apps = Vec::new();
    for e in &listing.entries {
        let rec: AppRecord = serde_json::from_slice(&e.value)
            .map_err(|err| ApiError::Internal(format!("catalog record {}: {err}", e.key)))?;
        if rec.org == org && who.app.as_deref().is_none_or(|a| a == rec.name) {
            apps.push(app_view(&state, &rec).await?);
        }
    }
    Ok(Json(ListAppsResponse {
        total_apps: apps.len() as i64,
        apps,
    }))
}

#[utoipa::path(post, path = "/apps", tag = "Apps", operation_id = "Apps_create",
    request_body(content = CreateAppRequest, description = "App body"),
    responses((status = 201, description = "Created", body = App),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn create(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<CreateAppRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if !valid_app_name(&req.name) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `name`: {:?} is not a valid app name (lowercase letters, digits and dashes, 2-63 characters, starting with a letter)",
            req.name
        )));
    }
    let org = if req.org_slug.is_empty() {
        who.org.clone()
    } else {
        req.org_slug.clone()
    };
    if org != who.org
        || read_record::<OrgRecord>(state.store(), &org_key(&org))
            .await?
            .is_none()
    {
        return Err(ApiError::NotFound(format!(
            "organization {org:?} not found"
        )));
    }
    let rec = AppRecord {
        schema: SCHEMA_VERSION,
        id: random_hex(8),
        name: req.name.clone(),
        org,
        network: if req.network.is_empty() {
            "default".into()
        } else {
            req.network.clone()
        },
        created_at: now_rfc3339(),
    };
    let key = app_key(&rec.name);
    let bytes =
        serde_json::to_vec(&rec).map_err(|e| ApiError::Internal(format!("encoding {key}: {e}")))?;
    match state.store().put_if(&key, bytes, Expect::Absent).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::NameTaken(format!(
                "app name {:?} is already taken",
                rec.name
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok((StatusCode::CREATED, Json(app_view(&state, &rec).await?)))
}

#[utoipa::path(get, path = "/apps/{app_name}", tag = "Apps", operation_id = "Apps_show",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 200, description = "OK", body = App)))]
pub async fn show(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<App>, ApiError> {
    let rec = load_app(&state, &app).await?;
    Ok(Json(app_view(&state, &rec).await?))
}

/// Destroys the app with its machines, volumes and secrets, as Fly does.
#[utoipa::path(delete, path = "/apps/{app_name}", tag = "Apps", operation_id = "Apps_delete",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 202, description = "Accepted")))]
pub async fn destroy(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    load_app(&state, &app).await?;
    for a in state.agents() {
        for m in a.list_machines(&app).await? {
            if m.state != MachineState::Destroyed {
                a.destroy_machine(&app, &m.id, true, None).await?;
            }
        }
        for v in a.list_volumes(&app).await? {
            a.destroy_volume(&app, &v.id).await?;
        }
    }
    // In one batch: the app, its secrets, its releases and the tokens limited to it
    // (so that a new app of the same name is not open to the old app's tokens).
    let mut keys = vec![app_key(&app)];
    if state
        .store()
        .get(&secrets::secrets_key(&app))
        .await?
        .is_some()
    {
        keys.push(secrets::secrets_key(&app));
    }
    let releases = state
        .store()
        .list(&crate::releases::releases_prefix(&app))
        .await?;
    keys.extend(releases.entries.into_iter().map(|e| e.key));
    // Its secret keys and IP assignments (releasing the addresses).
    keys.extend(crate::secretkeys::app_keys(&state, &app).await?);
    keys.extend(crate::ips::app_keys(&state, &app).await?);
    // Its hostnames: the proxy stops routing and serving them, ACME stops renewing.
    keys.extend(crate::certificates::app_keys(&state, &app).await?);
    for e in state.store().list("tokens/").await?.entries {
        if serde_json::from_slice::<TokenRecord>(&e.value)
            .is_ok_and(|t| t.app.as_deref() == Some(app.as_str()))
        {
            keys.push(e.key);
        }
    }
    let ops = keys
        .into_iter()
        .map(|key| Op::Delete {
            key,
            expect: Expect::Any,
        })
        .collect();
    state.store().apply(ops).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_list",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 200, description = "OK (values are never returned)", body = AppSecrets)))]
pub async fn secrets_list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<AppSecrets>, ApiError> {
    let (secrets, _) = secrets::list(&state, &app).await?;
    Ok(Json(AppSecrets { secrets }))
}

#[utoipa::path(post, path = "/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_update",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = AppSecretsUpdateRequest, description = "Values to set, or null to unset"),
    responses((status = 200, description = "OK", body = AppSecretsUpdateResp),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn secrets_update(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<AppSecretsUpdateRequest>,
) -> Result<Json<AppSecretsUpdateResp>, ApiError> {
    let (secrets, version) = secrets::update(&state, &app, &req.values).await?;
    Ok(Json(AppSecretsUpdateResp {
        secrets,
        version: version as i64,
    }))
}

#[utoipa::path(get, path = "/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secret_get",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "App secret name")),
    responses((status = 200, description = "OK (without the value)", body = AppSecret)))]
pub async fn secret_show(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<AppSecret>, ApiError> {
    Ok(Json(secrets::get(&state, &app, &name).await?))
}

#[utoipa::path(post, path = "/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secret_create",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "App secret name")),
    request_body(content = SetAppSecretRequest, description = "Create app secret request"),
    responses((status = 201, description = "Created", body = SetAppSecretResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn secret_set(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetAppSecretRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let value = req
        .value
        .ok_or_else(|| ApiError::BadRequest("field `value` is required".into()))?;
    let changes = BTreeMap::from([(name.clone(), Some(value))]);
    let (list, version) = secrets::update(&state, &app, &changes).await?;
    let s = list
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::Internal(format!("secret {name:?} vanished after set")))?;
    Ok((
        StatusCode::CREATED,
        Json(SetAppSecretResponse {
            name: s.name,
            digest: s.digest,
            created_at: s.created_at,
            updated_at: s.updated_at,
            version: version as i64,
        }),
    ))
}

#[utoipa::path(delete, path = "/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secret_delete",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "App secret name")),
    responses((status = 200, description = "OK", body = DeleteAppSecretResponse)))]
pub async fn secret_delete(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<DeleteAppSecretResponse>, ApiError> {
    secrets::get(&state, &app, &name).await?;
    let changes = BTreeMap::from([(name, None)]);
    let (_, version) = secrets::update(&state, &app, &changes).await?;
    Ok(Json(DeleteAppSecretResponse {
        version: version as i64,
    }))
}

/// Fly's `OrgMachine`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgMachine {
    pub id: String,
    pub name: String,
    pub app_name: String,
    pub state: String,
    pub region: String,
    pub private_ip: String,
    /// The machine version.
    pub version: String,
    /// Deprecated: use `version`.
    pub instance_id: String,
    pub created_at: String,
    pub updated_at: String,
    /// Omitted with `summary=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::openapi::doc::MachineConfig>)]
    pub config: Option<aloft_types::machine::MachineConfig>,
}

/// Fly's `OrgMachinesResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrgMachinesResponse {
    pub machines: Vec<OrgMachine>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_machine_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_at: Option<String>,
}

/// Largest page of the organisation listing.
pub const MAX_ORG_PAGE: usize = 1000;

/// Every machine of the organisation's apps (those the token may see), by
/// `updated_at`, in pages.
#[utoipa::path(get, path = "/orgs/{org_slug}/machines", tag = "Organizations", operation_id = "Machines_org_list",
    params(("org_slug" = String, Path, description = "Fly Organization Slug"),
        ("include_deleted" = Option<bool>, Query, description = "Include deleted machines"),
        ("region" = Option<String>, Query, description = "Region filter"),
        ("state" = Option<String>, Query, description = "Comma separated list of states to filter (created, started, stopped, suspended)"),
        ("summary" = Option<bool>, Query, description = "Omit config from responses"),
        ("updated_after" = Option<String>, Query, description = "Only machines updated after this RFC 3339 time"),
        ("cursor" = Option<String>, Query, description = "Pagination cursor from a previous response"),
        ("limit" = Option<u64>, Query, description = "The number of machines to fetch (max of 1000)")),
    responses((status = 200, description = "OK", body = OrgMachinesResponse)))]
pub async fn org_machines(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    Path(org): Path<String>,
    q: QueryPairs,
) -> Result<Json<OrgMachinesResponse>, ApiError> {
    if org != who.org {
        return Err(ApiError::NotFound(format!(
            "organization {org:?} not found"
        )));
    }
    let include_deleted = q.bool("include_deleted")?;
    let summary = q.bool("summary")?;
    let region = q.get("region").filter(|r| !r.is_empty());
    let states = q
        .all("state")
        .iter()
        .map(|s| {
            MachineState::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid query parameter `state`: unknown state {s:?}"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let updated_after = q.get("updated_after").filter(|s| !s.is_empty());
    let cursor = q.get("cursor").filter(|s| !s.is_empty());
    let cursor = match cursor {
        None => None,
        Some(c) => Some(c.split_once('|').ok_or_else(|| {
            ApiError::BadRequest(format!("invalid query parameter `cursor`: {c:?}"))
        })?),
    };
    let limit = (q.u64("limit")?.unwrap_or(MAX_ORG_PAGE as u64) as usize).clamp(1, MAX_ORG_PAGE);

    let mut all = Vec::new();
    for e in state.store().list("apps/").await?.entries {
        let rec: AppRecord = serde_json::from_slice(&e.value)
            .map_err(|err| ApiError::Internal(format!("catalog record {}: {err}", e.key)))?;
        if rec.org != org || who.app.as_deref().is_some_and(|a| a != rec.name) {
            continue;
        }
        for m in crate::machines::app_machines(&state, &rec.name).await? {
            all.push((rec.name.clone(), m));
        }
    }
    all.retain(|(_, m)| {
        (include_deleted || m.state != MachineState::Destroyed)
            && region.is_none_or(|r| m.region == r)
            && (states.is_empty() || states.contains(&m.state))
            && updated_after.is_none_or(|t| m.updated_at.as_str() > t)
            && cursor.is_none_or(|(t, id)| (m.updated_at.as_str(), m.id.as_str()) > (t, id))
    });
    all.sort_by(|(_, a), (_, b)| (&a.updated_at, &a.id).cmp(&(&b.updated_at, &b.id)));
    let more = all.len() > limit;
    all.truncate(limit);
    let last = all
        .last()
        .map(|(_, m)| (m.id.clone(), m.updated_at.clone()));
    Ok(Json(OrgMachinesResponse {
        next_cursor: last
            .as_ref()
            .filter(|_| more)
            .map(|(id, t)| format!("{t}|{id}")),
        last_machine_id: last.as_ref().map(|(id, _)| id.clone()),
        last_updated_at: last.map(|(_, t)| t),
        machines: all
            .into_iter()
            .map(|(app_name, m)| OrgMachine {
                id: m.id,
                name: m.name,
                app_name,
                state: m.state.to_string(),
                region: m.region,
                private_ip: m.private_ip,
                version: m.instance_id.clone(),
                instance_id: m.instance_id,
                created_at: m.created_at,
                updated_at: m.updated_at,
                config: (!summary).then_some(m.config),
            })
            .collect(),
    }))
}
