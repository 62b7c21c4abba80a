//! Machines (`/apps/{app}/machines…`): thin handlers that find the owning agent (the
//! catalog's `machines/{app}/{id}` record, else every agent) and call it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{AgentApi, AgentError, CreateMachine, StopOptions, UpdateMachine, WaitFor};
use aloft_types::catalog::{MachineRecord, machine_key};
use aloft_types::machine::{Lease, Machine, MachineConfig, MachineEvent, MachineState};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::auth::read_record;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::{JsonBody, OptJsonBody, QueryPairs};
use crate::openapi::doc;
use crate::placement;
use crate::secrets;
use crate::util::parse_go_duration;

/// The header carrying a lease nonce.
pub const LEASE_NONCE: &str = "fly-machine-lease-nonce";

/// Fly's `CreateMachineRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateMachineRequest {
    #[schema(value_type = doc::MachineConfig)]
    pub config: MachineConfig,
    pub name: Option<String>,
    pub region: Option<String>,
    pub skip_launch: bool,
    pub skip_secrets: bool,
    pub lease_ttl: Option<u64>,
}

/// Fly's `UpdateMachineRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UpdateMachineRequest {
    #[schema(value_type = doc::MachineConfig)]
    pub config: MachineConfig,
    pub name: Option<String>,
    pub region: Option<String>,
    pub skip_launch: bool,
    pub skip_secrets: bool,
    pub current_version: Option<String>,
}

/// Fly's `StopRequest`; `timeout` is a Go duration string ("10s").
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct StopRequest {
    pub signal: Option<String>,
    pub timeout: Option<String>,
}

/// Fly's `SignalRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SignalRequest {
    pub signal: String,
}

/// Fly's `CreateLeaseRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateLeaseRequest {
    pub description: String,
    /// Seconds the lease is valid.
    pub ttl: Option<u64>,
}

/// Fly's `WaitMachineResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitMachineResponse {
    pub ok: bool,
    pub state: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// Fly's `MachineExecRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineExecRequest {
    /// Deprecated: a shell-quoted command line.
    pub cmd: Option<String>,
    pub command: Vec<String>,
    /// Seconds.
    pub timeout: Option<u64>,
    pub stdin: Option<String>,
    pub container: Option<String>,
}

/// Fly's `flydv1.ExecResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = flydv1::ExecResponse)]
pub struct ExecResponse {
    pub exit_code: i64,
    pub exit_signal: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Fly's `metadataValueResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = metadataValueResponse)]
pub struct MetadataValueResponse {
    pub value: String,
}

/// Fly's `upsertMetadataKeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = upsertMetadataKeyRequest)]
pub struct UpsertMetadataKeyRequest {
    pub value: Option<String>,
    pub updated_at: Option<String>,
}

/// Fly's `updateMetadataRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = updateMetadataRequest)]
pub struct UpdateMetadataRequest {
    pub metadata: BTreeMap<String, String>,
    pub machine_version: Option<String>,
    pub updated_at: Option<String>,
}

/// Fly's `MachineVersion`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineVersion {
    pub version: String,
    #[schema(value_type = doc::MachineConfig)]
    pub user_config: MachineConfig,
}

/// Fly's `main.memoryResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::memoryResponse)]
pub struct MemoryResponse {
    pub limit_mb: i64,
    /// What the guest reports available to its apps (0 when not running).
    pub available_mb: i64,
}

/// Fly's `main.setMemoryLimitRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[schema(as = main::setMemoryLimitRequest)]
#[serde(default)]
pub struct SetMemoryLimitRequest {
    pub limit_mb: i64,
}

/// Fly's `main.reclaimMemoryRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[schema(as = main::reclaimMemoryRequest)]
#[serde(default)]
pub struct ReclaimMemoryRequest {
    pub amount_mb: i64,
}

/// Fly's `main.reclaimMemoryResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::reclaimMemoryResponse)]
pub struct ReclaimMemoryResponse {
    pub actual_mb: i64,
}

/// Fly's `ListenSocket`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListenSocket {
    pub proto: String,
    pub address: String,
}

/// Fly's `ProcessStat`: CPU times and `rtime` (since start) in ms, `rss` in bytes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessStat {
    pub pid: i64,
    pub command: String,
    pub cpu: i64,
    pub rss: i64,
    pub rtime: i64,
    pub stime: i64,
    pub directory: String,
    pub listen_sockets: Vec<ListenSocket>,
}

/// A lease in Fly's `Lease` shape, and also inside the envelope flyctl (fly-go's
/// `MachineLease`) reads: `{"status": "success", "data": {…}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub owner: String,
    pub description: String,
    /// Machine version.
    pub version: String,
    /// Always `success` (fly-go envelope).
    pub status: String,
    /// The same lease (fly-go envelope).
    #[schema(value_type = doc::Lease)]
    pub data: Lease,
}

impl LeaseResponse {
    fn new(l: Lease) -> Self {
        Self {
            nonce: l.nonce.clone(),
            expires_at: l.expires_at,
            owner: l.owner.clone(),
            description: l.description.clone(),
            version: l.version.clone(),
            status: "success".into(),
            data: l,
        }
    }
}

/// The reply of start: the state the machine was in.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartResponse {
    pub previous_state: String,
}

/// The reply of other lifecycle calls.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OkResponse {
    pub ok: bool,
}

fn ok() -> Json<OkResponse> {
    Json(OkResponse { ok: true })
}

/// The lease nonce header, if any.
fn nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get(LEASE_NONCE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Every machine of `app` on every host. A host whose agent fails to answer is shown
/// from the catalog (what its agent last published) with `host_status: unreachable`,
/// so one broken host does not hide an app's other machines.
pub async fn app_machines(state: &ApiState, app: &str) -> Result<Vec<Machine>, ApiError> {
    let mut out = Vec::new();
    let mut unreachable = Vec::new();
    for a in state.agents() {
        match a.list_machines(app).await {
            Ok(ms) => out.extend(ms),
            Err(AgentError::Internal(e)) => {
                tracing::warn!(host = a.host_id(), error = %e, "listing machines: host unreachable");
                unreachable.push(a.host_id().to_string());
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !unreachable.is_empty() {
        let listing = state
            .store()
            .list(&aloft_types::catalog::machines_prefix(app))
            .await?;
        for e in &listing.entries {
            if let Ok(rec) = serde_json::from_slice::<MachineRecord>(&e.value)
                && unreachable.contains(&rec.host)
            {
                let mut m = rec.machine;
                m.host_status = "unreachable".into();
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// The agent owning machine `id` of `app`.
pub async fn machine_agent(
    state: &ApiState,
    app: &str,
    id: &str,
) -> Result<Arc<dyn AgentApi>, ApiError> {
    let rec: Option<MachineRecord> = read_record(state.store(), &machine_key(app, id)).await?;
    if let Some(a) = rec.and_then(|r| state.agent(&r.host)) {
        return Ok(a);
    }
    for a in state.agents() {
        match a.get_machine(app, id).await {
            Ok(_) => return Ok(a.clone()),
            Err(AgentError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::NotFound(format!(
        "machine {id:?} of app {app:?} not found"
    )))
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the query; handlers read it through `QueryPairs`
struct ListQuery {
    /// Include deleted machines
    include_deleted: Option<bool>,
    /// Region filter
    region: Option<String>,
    /// comma separated list of states to filter (created, started, stopped, suspended)
    state: Option<String>,
    /// Only return summary info about machines (omit config, checks, events)
    summary: Option<bool>,
}

#[utoipa::path(get, path = "/apps/{app_name}/machines", tag = "Machines", operation_id = "Machines_list",
    params(("app_name" = String, Path, description = "Fly App Name"), ListQuery),
    responses((status = 200, description = "OK", body = Vec<doc::Machine>)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> Result<Json<Vec<Machine>>, ApiError> {
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
    let meta: Vec<(&str, &str)> =
        q.0.iter()
            .filter_map(|(k, v)| k.strip_prefix("metadata.").map(|k| (k, v.as_str())))
            .collect();
    let mut out = app_machines(&state, &app).await?;
    out.retain(|m| {
        (include_deleted || m.state != MachineState::Destroyed)
            && region.is_none_or(|r| m.region == r)
            && (states.is_empty() || states.contains(&m.state))
            && meta
                .iter()
                .all(|(k, v)| m.config.metadata.get(*k).map(String::as_str) == Some(*v))
    });
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    if summary {
        for m in &mut out {
            m.config = MachineConfig::default();
            m.events.clear();
            m.checks.clear();
            m.nonce = None;
        }
    }
    Ok(Json(out))
}

/// Longest lease (seconds) and exec (seconds) a client may ask for.
pub const MAX_LEASE_SECS: u64 = 7 * 24 * 3600;
pub const MAX_EXEC_SECS: u64 = 3600;

/// A seconds field: absent or 0 means `default`; above `max` is refused.
fn bounded(field: &str, v: Option<u64>, default: u64, max: u64) -> Result<u64, ApiError> {
    match v {
        None | Some(0) => Ok(default),
        Some(s) if s <= max => Ok(s),
        Some(s) => Err(ApiError::BadRequest(format!(
            "invalid field `{field}`: {s} seconds is more than the maximum of {max}"
        ))),
    }
}

/// The organisation an app belongs to (for private network isolation).
async fn app_org(state: &ApiState, app: &str) -> String {
    match state.store().get(&aloft_types::catalog::app_key(app)).await {
        Ok(Some(e)) => serde_json::from_slice::<aloft_types::catalog::AppRecord>(&e.value)
            .map(|r| r.org)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn check_config(config: &MachineConfig) -> Result<(), ApiError> {
    if config.image.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "field `config.image` is required".into(),
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines", tag = "Machines", operation_id = "Machines_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateMachineRequest, description = "Create machine request"),
    responses((status = 200, description = "OK", body = doc::Machine)))]
pub async fn create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<CreateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    check_config(&req.config)?;
    if req.lease_ttl.is_some() {
        bounded("lease_ttl", req.lease_ttl, 0, MAX_LEASE_SECS)?;
    }
    let agent = placement::place_machine(&state, &app, req.region.as_deref(), &req.config).await?;
    let secrets = if req.skip_secrets {
        BTreeMap::new()
    } else {
        secrets::app_secrets(&state, &app).await?
    };
    let m = agent
        .create_machine(CreateMachine {
            app: app.clone(),
            name: req.name,
            region: Some(agent.region().to_string()),
            config: req.config,
            skip_launch: req.skip_launch,
            secrets,
            lease_ttl: req.lease_ttl,
            org: app_org(&state, &app).await,
        })
        .await?;
    Ok(Json(m))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_show",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = doc::Machine)))]
pub async fn show(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Machine>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    Ok(Json(a.get_machine(&app, &id).await?))
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_update",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = UpdateMachineRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = doc::Machine),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn update(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<UpdateMachineRequest>,
) -> Result<Json<Machine>, ApiError> {
    check_config(&req.config)?;
    let a = machine_agent(&state, &app, &id).await?;
    if let Some(r) = req.region.as_deref().filter(|r| !r.is_empty())
        && r != a.region()
    {
        return Err(ApiError::BadRequest(format!(
            "invalid field `region`: machine {id} is in {}, it cannot move to {r}",
            a.region()
        )));
    }
    let secrets = if req.skip_secrets {
        BTreeMap::new()
    } else {
        secrets::app_secrets(&state, &app).await?
    };
    let m = a
        .update_machine(
            &app,
            &id,
            UpdateMachine {
                config: req.config,
                name: req.name,
                current_version: req.current_version,
                skip_launch: req.skip_launch,
                secrets,
            },
            nonce(&headers).as_deref(),
        )
        .await?;
    Ok(Json(m))
}

#[utoipa::path(delete, path = "/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_delete",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("force" = Option<bool>, Query, description = "Force kill the machine if it's running")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn destroy(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    q: QueryPairs,
) -> Result<Json<OkResponse>, ApiError> {
    let force = q.bool("force")?;
    let a = machine_agent(&state, &app, &id).await?;
    a.destroy_machine(&app, &id, force, nonce(&headers).as_deref())
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/start", tag = "Machines", operation_id = "Machines_start",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = StartResponse)))]
pub async fn start(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<StartResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    let before = a.get_machine(&app, &id).await?.state;
    a.start_machine(&app, &id, nonce(&headers).as_deref())
        .await?;
    Ok(Json(StartResponse {
        previous_state: before.to_string(),
    }))
}

fn stop_options(signal: Option<String>, timeout: Option<&str>) -> Result<StopOptions, ApiError> {
    let timeout = match timeout.filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(
            parse_go_duration(t)
                .or_else(|| t.parse::<u64>().ok().map(Duration::from_secs))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid field `timeout`: {t:?} is not a duration like \"10s\""
                    ))
                })?,
        ),
    };
    Ok(StopOptions {
        signal: signal.filter(|s| !s.is_empty()),
        timeout,
    })
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/stop", tag = "Machines", operation_id = "Machines_stop",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = Option<StopRequest>, description = "Optional request body"),
    responses((status = 200, description = "OK", body = OkResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn stop(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    OptJsonBody(req): OptJsonBody<StopRequest>,
) -> Result<Json<OkResponse>, ApiError> {
    let opts = stop_options(req.signal, req.timeout.as_deref())?;
    let a = machine_agent(&state, &app, &id).await?;
    a.stop_machine(&app, &id, opts, nonce(&headers).as_deref())
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/restart", tag = "Machines", operation_id = "Machines_restart",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("timeout" = Option<String>, Query, description = "Restart timeout as a Go duration string or number of seconds"),
        ("signal" = Option<String>, Query, description = "Signal to stop the machine with")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn restart(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    q: QueryPairs,
) -> Result<Json<OkResponse>, ApiError> {
    let opts = stop_options(q.get("signal").map(str::to_string), q.get("timeout"))?;
    let a = machine_agent(&state, &app, &id).await?;
    a.restart_machine(&app, &id, opts, nonce(&headers).as_deref())
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/suspend", tag = "Machines", operation_id = "Machines_suspend",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn suspend(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    a.suspend_machine(&app, &id, nonce(&headers).as_deref())
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/signal", tag = "Machines", operation_id = "Machines_signal",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = SignalRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = OkResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn signal(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> Result<Json<OkResponse>, ApiError> {
    const SIGNALS: &[&str] = &[
        "SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE",
        "SIGQUIT", "SIGSEGV", "SIGTERM", "SIGTRAP", "SIGUSR1", "SIGUSR2",
    ];
    if !SIGNALS.contains(&req.signal.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `signal`: {:?} is not one of {}",
            req.signal,
            SIGNALS.join(", ")
        )));
    }
    let a = machine_agent(&state, &app, &id).await?;
    a.signal_machine(&app, &id, &req.signal).await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/cordon", tag = "Machines", operation_id = "Machines_cordon",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn cordon(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<OkResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    a.cordon_machine(&app, &id, true).await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/uncordon", tag = "Machines", operation_id = "Machines_uncordon",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn uncordon(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<OkResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    a.cordon_machine(&app, &id, false).await?;
    Ok(ok())
}

/// Longest wait a client may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 300;

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/wait", tag = "Machines", operation_id = "Machines_wait",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("version" = Option<String>, Query, description = "Machine version (instance_id) to wait for"),
        ("instance_id" = Option<String>, Query, description = "Machine version ID (deprecated; use version)"),
        ("timeout" = Option<u64>, Query, description = "wait timeout in seconds. default 60"),
        ("state" = Option<String>, Query, description = "desired state(s), repeated or comma-separated (started, stopped, suspended, destroyed, failed, settled)")),
    responses((status = 200, description = "OK", body = WaitMachineResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 408, description = "Timed out", body = ErrorResponse)))]
pub async fn wait(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    q: QueryPairs,
) -> Result<Json<WaitMachineResponse>, ApiError> {
    let mut states = q.all("state");
    if states.is_empty() {
        states.push("started".into());
    }
    if let Some(bad) = states
        .iter()
        .find(|s| s.as_str() != "settled" && MachineState::parse(s).is_none())
    {
        return Err(ApiError::BadRequest(format!(
            "invalid query parameter `state`: unknown state {bad:?}"
        )));
    }
    let timeout = q.u64("timeout")?.unwrap_or(60);
    if timeout > MAX_WAIT_SECS {
        return Err(ApiError::BadRequest(format!(
            "invalid query parameter `timeout`: at most {MAX_WAIT_SECS} seconds"
        )));
    }
    let version = q
        .get("version")
        .or_else(|| q.get("instance_id"))
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let a = match machine_agent(&state, &app, &id).await {
        Ok(a) => a,
        // Agents forget destroyed machines; one that is gone is destroyed (as agents answer).
        Err(ApiError::NotFound(_)) if states.iter().any(|s| s == "destroyed") => {
            return Ok(Json(WaitMachineResponse {
                ok: true,
                state: MachineState::Destroyed.to_string(),
                version: version.unwrap_or_default(),
                event_id: None,
            }));
        }
        Err(e) => return Err(e),
    };
    let reached = a
        .wait_machine(
            &app,
            &id,
            WaitFor {
                states,
                instance_id: version.clone(),
                timeout: Duration::from_secs(timeout),
            },
        )
        .await?;
    let version = match version {
        Some(v) => v,
        None => match a.get_machine(&app, &id).await {
            Ok(m) => m.instance_id,
            // A machine that was waited on until destroyed may be gone now.
            Err(AgentError::NotFound { .. }) => String::new(),
            Err(e) => return Err(e.into()),
        },
    };
    let event_id = match a.machine_events(&app, &id).await {
        Ok(evs) => evs.iter().max_by_key(|e| e.timestamp).map(|e| e.id.clone()),
        Err(_) => None,
    };
    Ok(Json(WaitMachineResponse {
        ok: true,
        state: reached.to_string(),
        version,
        event_id,
    }))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/events", tag = "Machines", operation_id = "Machines_list_events",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("limit" = Option<u64>, Query, description = "The number of events to fetch (max of 50). If omitted, this is set to 20 by default.")),
    responses((status = 200, description = "OK", body = Vec<doc::MachineEvent>)))]
pub async fn events(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    q: QueryPairs,
) -> Result<Json<Vec<MachineEvent>>, ApiError> {
    let limit = q.u64("limit")?.unwrap_or(20).min(50) as usize;
    let a = machine_agent(&state, &app, &id).await?;
    let mut evs = a.machine_events(&app, &id).await?;
    evs.sort_by_key(|e| std::cmp::Reverse(e.timestamp));
    evs.truncate(limit);
    Ok(Json(evs))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_show_lease",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = LeaseResponse)))]
pub async fn lease_show(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    Ok(Json(LeaseResponse::new(a.get_lease(&app, &id).await?)))
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_create_lease",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("fly-machine-lease-nonce" = Option<String>, Header, description = "Existing lease nonce to refresh by ttl, empty or non-existent to create a new lease")),
    request_body(content = CreateLeaseRequest, description = "Request body"),
    responses((status = 201, description = "Created", body = LeaseResponse),
        (status = 409, description = "Held by someone else", body = ErrorResponse)))]
pub async fn lease_create(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    OptJsonBody(req): OptJsonBody<CreateLeaseRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let ttl = bounded("ttl", req.ttl, 30, MAX_LEASE_SECS)?;
    let a = machine_agent(&state, &app, &id).await?;
    let lease = a
        .acquire_lease(
            &app,
            &id,
            Duration::from_secs(ttl),
            &req.description,
            nonce(&headers).as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(LeaseResponse::new(lease))))
}

#[utoipa::path(delete, path = "/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_release_lease",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("fly-machine-lease-nonce" = String, Header, description = "Existing lease nonce")),
    responses((status = 200, description = "OK", body = OkResponse)))]
pub async fn lease_release(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, ApiError> {
    let n = nonce(&headers)
        .ok_or_else(|| ApiError::BadRequest(format!("header `{LEASE_NONCE}` is required")))?;
    let a = machine_agent(&state, &app, &id).await?;
    a.release_lease(&app, &id, &n).await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/exec", tag = "Machines", operation_id = "Machines_exec",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = MachineExecRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = ExecResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn exec(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<MachineExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    if req.stdin.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::BadRequest(
            "invalid field `stdin`: stdin is not supported by exec; use `aloft ssh console`".into(),
        ));
    }
    let command = if !req.command.is_empty() {
        req.command
    } else {
        let line = req.cmd.unwrap_or_default();
        shlex::split(&line)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| ApiError::BadRequest("field `command` is required".into()))?
    };
    let timeout = Duration::from_secs(bounded("timeout", req.timeout, 30, MAX_EXEC_SECS)?);
    let a = machine_agent(&state, &app, &id).await?;
    let out = a.exec(&app, &id, command, timeout).await?;
    Ok(Json(ExecResponse {
        exit_code: i64::from(out.exit_code),
        exit_signal: i64::from(out.exit_signal),
        stdout: out.stdout,
        stderr: out.stderr,
    }))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/metadata", tag = "Machines", operation_id = "Machines_show_metadata",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = BTreeMap<String, String>)))]
pub async fn metadata_show(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<BTreeMap<String, String>>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    Ok(Json(a.metadata_get(&app, &id).await?))
}

async fn metadata_apply(
    state: &ApiState,
    app: &str,
    id: &str,
    wanted: BTreeMap<String, String>,
    replace: bool,
) -> Result<StatusCode, ApiError> {
    let a = machine_agent(state, app, id).await?;
    let current = a.metadata_get(app, id).await?;
    if replace {
        for k in current.keys().filter(|k| !wanted.contains_key(*k)) {
            a.metadata_delete(app, id, k).await?;
        }
    }
    for (k, v) in &wanted {
        if current.get(k) != Some(v) {
            a.metadata_set(app, id, k, v).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/apps/{app_name}/machines/{machine_id}/metadata", tag = "Machines", operation_id = "Machines_update_metadata",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = UpdateMetadataRequest, description = "Update metadata request"),
    responses((status = 204, description = "No Content"),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn metadata_replace(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<UpdateMetadataRequest>,
) -> Result<StatusCode, ApiError> {
    metadata_apply(&state, &app, &id, req.metadata, true).await
}

#[utoipa::path(patch, path = "/apps/{app_name}/machines/{machine_id}/metadata", tag = "Machines", operation_id = "Machines_update_metadata",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = UpdateMetadataRequest, description = "Update metadata request"),
    responses((status = 204, description = "No Content"),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn metadata_merge(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<UpdateMetadataRequest>,
) -> Result<StatusCode, ApiError> {
    metadata_apply(&state, &app, &id, req.metadata, false).await
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/metadata/{key}", tag = "Machines", operation_id = "Machines_get_metadata_key",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("key" = String, Path, description = "Metadata Key")),
    responses((status = 200, description = "OK", body = MetadataValueResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn metadata_key(
    State(state): State<ApiState>,
    Path((app, id, key)): Path<(String, String, String)>,
) -> Result<Json<MetadataValueResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    let md = a.metadata_get(&app, &id).await?;
    let value = md
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("metadata key {key:?} not found")))?;
    Ok(Json(MetadataValueResponse { value }))
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/metadata/{key}", tag = "Machines", operation_id = "Machines_upsert_metadata",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("key" = String, Path, description = "Metadata Key")),
    request_body(content = UpsertMetadataKeyRequest, description = "Upsert metadata key request"),
    responses((status = 204, description = "No Content"),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn metadata_upsert(
    State(state): State<ApiState>,
    Path((app, id, key)): Path<(String, String, String)>,
    JsonBody(req): JsonBody<UpsertMetadataKeyRequest>,
) -> Result<StatusCode, ApiError> {
    let value = req
        .value
        .ok_or_else(|| ApiError::BadRequest("field `value` is required".into()))?;
    let a = machine_agent(&state, &app, &id).await?;
    a.metadata_set(&app, &id, &key, &value).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/apps/{app_name}/machines/{machine_id}/metadata/{key}", tag = "Machines", operation_id = "Machines_delete_metadata",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("key" = String, Path, description = "Metadata Key")),
    responses((status = 204, description = "No Content")))]
pub async fn metadata_delete(
    State(state): State<ApiState>,
    Path((app, id, key)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    a.metadata_delete(&app, &id, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Only the current version is kept by agents, so this lists one entry.
#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/versions", tag = "Machines", operation_id = "Machines_list_versions",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK (the current version)", body = Vec<MachineVersion>)))]
pub async fn versions(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Vec<MachineVersion>>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    let m = a.get_machine(&app, &id).await?;
    Ok(Json(vec![MachineVersion {
        version: m.instance_id,
        user_config: m.config,
    }]))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/memory", tag = "Machines", operation_id = "Machines_get_memory",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    responses((status = 200, description = "OK", body = MemoryResponse)))]
pub async fn memory(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<MemoryResponse>, ApiError> {
    let a = machine_agent(&state, &app, &id).await?;
    let m = a.get_memory(&app, &id).await?;
    Ok(Json(MemoryResponse {
        limit_mb: m.limit_mb,
        available_mb: m.available_mb,
    }))
}

#[utoipa::path(put, path = "/apps/{app_name}/machines/{machine_id}/memory", tag = "Machines", operation_id = "Machines_set_memory_limit",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = SetMemoryLimitRequest, description = "Set memory limit request"),
    responses((status = 200, description = "OK", body = MemoryResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn memory_set(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetMemoryLimitRequest>,
) -> Result<Json<MemoryResponse>, ApiError> {
    if req.limit_mb <= 0 {
        return Err(ApiError::BadRequest(format!(
            "invalid field `limit_mb`: {} must be a positive number of MB",
            req.limit_mb
        )));
    }
    let a = machine_agent(&state, &app, &id).await?;
    let m = a.set_memory_limit(&app, &id, req.limit_mb).await?;
    Ok(Json(MemoryResponse {
        limit_mb: m.limit_mb,
        available_mb: m.available_mb,
    }))
}

#[utoipa::path(post, path = "/apps/{app_name}/machines/{machine_id}/memory/reclaim", tag = "Machines", operation_id = "Machines_reclaim_memory",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID")),
    request_body(content = ReclaimMemoryRequest, description = "Reclaim memory request"),
    responses((status = 200, description = "OK", body = ReclaimMemoryResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn memory_reclaim(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    JsonBody(req): JsonBody<ReclaimMemoryRequest>,
) -> Result<Json<ReclaimMemoryResponse>, ApiError> {
    if req.amount_mb <= 0 {
        return Err(ApiError::BadRequest(format!(
            "invalid field `amount_mb`: {} must be a positive number of MB",
            req.amount_mb
        )));
    }
    let a = machine_agent(&state, &app, &id).await?;
    let actual_mb = a.reclaim_memory(&app, &id, req.amount_mb).await?;
    Ok(Json(ReclaimMemoryResponse { actual_mb }))
}

#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/ps", tag = "Machines", operation_id = "Machines_list_processes",
    params(("app_name" = String, Path, description = "Fly App Name"), ("machine_id" = String, Path, description = "Machine ID"),
        ("sort_by" = Option<String>, Query, description = "Sort by: pid (default), cpu, rss, rtime, stime, command or directory"),
        ("order" = Option<String>, Query, description = "Order: asc (default) or desc")),
    responses((status = 200, description = "OK", body = Vec<ProcessStat>),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn ps(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    q: QueryPairs,
) -> Result<Json<Vec<ProcessStat>>, ApiError> {
    const SORTS: [&str; 7] = [
        "pid",
        "cpu",
        "rss",
        "rtime",
        "stime",
        "command",
        "directory",
    ];
    let sort_by = q.get("sort_by").filter(|s| !s.is_empty()).unwrap_or("pid");
    if !SORTS.contains(&sort_by) {
        return Err(ApiError::BadRequest(format!(
            "invalid query parameter `sort_by`: {sort_by:?} is not one of pid, cpu, rss, rtime, stime, command, directory"
        )));
    }
    let desc = match q.get("order").filter(|s| !s.is_empty()) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "invalid query parameter `order`: {o:?} is not asc or desc"
            )));
        }
    };
    let a = machine_agent(&state, &app, &id).await?;
    let mut list: Vec<ProcessStat> = a
        .machine_ps(&app, &id)
        .await?
        .into_iter()
        .map(|p| ProcessStat {
            pid: i64::from(p.pid),
            command: p.command,
            cpu: p.cpu as i64,
            rss: p.rss as i64,
            rtime: p.rtime as i64,
            stime: p.stime as i64,
            directory: p.directory,
            listen_sockets: p
                .listen_sockets
                .into_iter()
                .map(|l| ListenSocket {
                    proto: l.proto,
                    address: l.address,
                })
                .collect(),
        })
        .collect();
    list.sort_by(|x, y| {
        let o = match sort_by {
            "cpu" => x.cpu.cmp(&y.cpu),
            "rss" => x.rss.cmp(&y.rss),
            "rtime" => x.rtime.cmp(&y.rtime),
            "stime" => x.stime.cmp(&y.stime),
            "command" => x.command.cmp(&y.command),
            "directory" => x.directory.cmp(&y.directory),
            _ => std::cmp::Ordering::Equal,
        }
        .then(x.pid.cmp(&y.pid));
        if desc { o.reverse() } else { o }
    });
    Ok(Json(list))
}

/// One log line of a machine (the agent's `LogLine`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub machine_id: String,
    pub region: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// `stdout`, `stderr` or `system`.
    pub stream: String,
    pub message: String,
}

/// Aloft's addition (Fly serves logs from another API): the app's machine logs, oldest first.
#[utoipa::path(get, path = "/apps/{app_name}/logs", tag = "Logs", operation_id = "Logs_list",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("machine_id" = Option<String>, Query, description = "Only this machine"),
        ("region" = Option<String>, Query, description = "Only machines of this region"),
        ("since" = Option<i64>, Query, description = "Only lines after this time (Unix milliseconds)")),
    responses((status = 200, description = "OK", body = Vec<LogLine>)))]
pub async fn logs(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> Result<Json<Vec<LogLine>>, ApiError> {
    let since = match q.get("since").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid query parameter `since`: {s:?} is not Unix milliseconds"
            ))
        })?),
    };
    let region = q.get("region").filter(|r| !r.is_empty());
    let mut targets: Vec<(Arc<dyn AgentApi>, String)> = Vec::new();
    if let Some(id) = q.get("machine_id").filter(|m| !m.is_empty()) {
        targets.push((machine_agent(&state, &app, id).await?, id.to_string()));
    } else {
        for a in state.agents() {
            match a.list_machines(&app).await {
                Ok(ms) => targets.extend(
                    ms.into_iter()
                        .filter(|m| region.is_none_or(|r| m.region == r))
                        .map(|m| (a.clone(), m.id)),
                ),
                Err(AgentError::Internal(e)) => {
                    tracing::warn!(host = a.host_id(), error = %e, "logs: host unreachable");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut out = Vec::new();
    for (a, id) in targets {
        match a.logs(&app, &id, since).await {
            Ok(lines) => out.extend(lines.into_iter().map(|l| LogLine {
                machine_id: l.machine_id,
                region: l.region,
                timestamp: l.timestamp,
                stream: l.stream,
                message: l.message,
            })),
            // Destroyed between listing and reading.
            Err(AgentError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort_by_key(|l| l.timestamp);
    Ok(Json(out))
}
