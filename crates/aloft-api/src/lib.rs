//! The Machines API (Fly's `/v1` REST surface): apps, machines, volumes, secrets, releases
//! and tokens, with bearer-token authorisation, placement of new machines and volumes on
//! hosts, and its OpenAPI document generated from the handlers (`/v1/openapi.json`).
//!
//! It owns authorisation, app records, tokens, organisations and encrypted secrets in
//! the catalog. It must not touch VMs or publish machine state: every machine or
//! volume action goes to the owning host's agent through the `AgentApi` trait, and
//! machine records in the catalog are the agents' to write.

pub mod apps;
pub mod auth;
pub mod certificates;
pub mod console;
pub mod error;
pub mod extract;
pub mod ips;
pub mod machines;
pub mod oidc;
pub mod openapi;
pub mod placement;
pub mod releases;
pub mod secretkeys;
pub mod secrets;
pub mod tokens;
pub mod util;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aloft_agent::AgentApi;
use aloft_store::Store;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post, put};

pub use auth::{NewToken, Principal, Role, create_token, create_token_expiring};
pub use error::ApiError;
pub use secrets::app_secrets;

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    agents: Vec<Arc<dyn AgentApi>>,
    data_dir: PathBuf,
    secrets_key: tokio::sync::OnceCell<[u8; 32]>,
    ip_pools: std::sync::OnceLock<ips::IpPools>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("two agents claim host id {0:?}")]
    DuplicateHost(String),
    #[error("creating the default organization: {0}")]
    DefaultOrg(#[from] auth::AuthError),
}

impl ApiState {
    /// The API over a catalog, the agents of the hosts, and a data directory (which
    /// holds `secrets.key`). Creates the `personal` organisation on a new install.
    pub async fn new(
        store: Arc<dyn Store>,
        agents: Vec<Arc<dyn AgentApi>>,
        data_dir: impl Into<PathBuf>,
    ) -> Result<Self, StateError> {
        let mut seen = std::collections::HashSet::new();
        for a in &agents {
            if !seen.insert(a.host_id().to_string()) {
                return Err(StateError::DuplicateHost(a.host_id().to_string()));
            }
        }
        auth::ensure_default_org(store.as_ref()).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                agents,
                data_dir: data_dir.into(),
                secrets_key: tokio::sync::OnceCell::new(),
                ip_pools: std::sync::OnceLock::new(),
            }),
        })
    }

    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    pub fn agents(&self) -> &[Arc<dyn AgentApi>] {
        &self.inner.agents
    }

    /// The agent of host `id`.
    pub fn agent(&self, id: &str) -> Option<Arc<dyn AgentApi>> {
        self.inner
            .agents
            .iter()
            .find(|a| a.host_id() == id)
            .cloned()
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Sets the pools IP assignments come from; refused (returning them) once an
    /// address was assigned or pools were set before.
    pub fn set_ip_pools(&self, pools: ips::IpPools) -> Result<(), ips::IpPools> {
        self.inner.ip_pools.set(pools)
    }

    /// The IP pools in force: those set with [`ApiState::set_ip_pools`], else
    /// `<data_dir>/ip-pools.json` when present, else [`ips::IpPools::default`].
    pub fn ip_pools(&self) -> Result<&ips::IpPools, ips::IpError> {
        if let Some(p) = self.inner.ip_pools.get() {
            return Ok(p);
        }
        let loaded = ips::IpPools::from_data_dir(&self.inner.data_dir)?;
        Ok(self.inner.ip_pools.get_or_init(|| loaded))
    }

    /// The secrets encryption key, loaded (or created) on first use.
    pub(crate) async fn secrets_key(&self) -> Result<[u8; 32], secrets::SecretsError> {
        let dir = self.inner.data_dir.clone();
        self.inner
            .secrets_key
            .get_or_try_init(|| async move {
                let path = dir.join("secrets.key");
                tokio::task::spawn_blocking(move || secrets::load_or_create_key(&dir))
                    .await
                    .map_err(|e| secrets::SecretsError::KeyFile {
                        path,
                        source: std::io::Error::other(e.to_string()),
                    })?
            })
            .await
            .copied()
    }
}

/// Serves the API on a bound listener until `shutdown` completes; in-flight requests
/// are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The `/v1` router: every route behind the token middleware, every error as JSON.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/apps", get(apps::list).post(apps::create))
        .route("/apps/{app_name}", get(apps::show).delete(apps::destroy))
        .route(
            "/apps/{app_name}/machines",
            get(machines::list).post(machines::create),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}",
            get(machines::show)
                .post(machines::update)
                .delete(machines::destroy),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/start",
            post(machines::start),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/stop",
            post(machines::stop),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/restart",
            post(machines::restart),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/suspend",
            post(machines::suspend),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/signal",
            post(machines::signal),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/cordon",
            post(machines::cordon),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/uncordon",
            post(machines::uncordon),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/wait",
            get(machines::wait),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/events",
            get(machines::events),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/lease",
            get(machines::lease_show)
                .post(machines::lease_create)
                .delete(machines::lease_release),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/exec",
            post(machines::exec),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/console",
            get(console::console),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/metadata",
            get(machines::metadata_show)
                .put(machines::metadata_replace)
                .patch(machines::metadata_merge),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
            get(machines::metadata_key)
                .post(machines::metadata_upsert)
                .delete(machines::metadata_delete),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/versions",
            get(machines::versions),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/memory",
            get(machines::memory).put(machines::memory_set),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/memory/reclaim",
            post(machines::memory_reclaim),
        )
        .route(
            "/apps/{app_name}/machines/{machine_id}/ps",
            get(machines::ps),
        )
        .route("/apps/{app_name}/logs", get(machines::logs))
        .route(
            "/apps/{app_name}/releases",
            get(releases::list).post(releases::create),
        )
        .route(
            "/apps/{app_name}/releases/{version}",
            get(releases::show).patch(releases::update),
        )
        .route(
            "/apps/{app_name}/releases/{version}/rollback",
            post(releases::rollback),
        )
        .route(
            "/apps/{app_name}/volumes",
            get(volumes::list).post(volumes::create),
        )
        .route(
            "/apps/{app_name}/volumes/{volume_id}",
            get(volumes::show).delete(volumes::destroy),
        )
        .route(
            "/apps/{app_name}/volumes/{volume_id}/extend",
            put(volumes::extend),
        )
        .route(
            "/apps/{app_name}/volumes/{volume_id}/snapshots",
            get(volumes::snapshots).post(volumes::snapshot_create),
        )
        .route(
            "/apps/{app_name}/secrets",
            get(apps::secrets_list).post(apps::secrets_update),
        )
        .route(
            "/apps/{app_name}/secrets/{secret_name}",
            get(apps::secret_show)
                .post(apps::secret_set)
                .delete(apps::secret_delete),
        )
        .route("/apps/{app_name}/deploy_token", post(tokens::deploy_token))
        .route("/apps/{app_name}/certificates", get(certificates::list))
        .route(
            "/apps/{app_name}/certificates/acme",
            post(certificates::acme_create),
        )
        .route(
            "/apps/{app_name}/certificates/custom",
            post(certificates::custom_create),
        )
        .route(
            "/apps/{app_name}/certificates/{hostname}",
            get(certificates::show).delete(certificates::delete),
        )
        .route(
            "/apps/{app_name}/certificates/{hostname}/acme",
            axum::routing::delete(certificates::acme_delete),
        )
        .route(
            "/apps/{app_name}/certificates/{hostname}/custom",
            axum::routing::delete(certificates::custom_delete),
        )
        .route(
            "/apps/{app_name}/certificates/{hostname}/check",
            post(certificates::check),
        )
        .route("/platform/regions", get(tokens::regions))
        .route("/orgs/{org_slug}/machines", get(apps::org_machines))
        .route("/tokens/current", get(tokens::current))
        .route("/tokens/authenticate", post(tokens::authenticate))
        .route("/tokens/authorize", post(tokens::authorize))
        .route("/tokens/kms", post(tokens::kms))
        .route("/tokens/oidc", post(oidc::token))
        .route(
            "/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/tokens/{token_id}",
            axum::routing::delete(tokens::revoke_token),
        )
        .route("/oidc/jwks.json", get(oidc::jwks))
        .route(
            "/oidc/{org_slug}/.well-known/openid-configuration",
            get(oidc::discovery),
        )
        .route("/orgs/{org_slug}/volumes", get(volumes::org_list))
        .route("/platform/placements", post(tokens::placements))
        .route(
            "/apps/{app_name}/ip_assignments",
            get(ips::list).post(ips::create),
        )
        .route(
            "/apps/{app_name}/ip_assignments/{ip}",
            axum::routing::delete(ips::delete),
        )
        .route("/apps/{app_name}/secretkeys", get(secretkeys::list))
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}",
            get(secretkeys::show)
                .post(secretkeys::set)
                .delete(secretkeys::delete),
        )
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}/encrypt",
            post(secretkeys::encrypt_handler),
        )
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}/decrypt",
            post(secretkeys::decrypt_handler),
        )
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}/generate",
            post(secretkeys::generate),
        )
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}/sign",
            post(secretkeys::sign_handler),
        )
        .route(
            "/apps/{app_name}/secretkeys/{secret_name}/verify",
            post(secretkeys::verify_handler),
        )
        .route("/openapi.json", get(openapi::document));
    Router::new()
        .nest("/v1", v1)
        .fallback(no_route)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Logs each request's method, path, status and time (errors at `info`).
async fn log_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 400 {
        tracing::info!(%method, %path, status, ms, "api request failed");
    } else {
        tracing::debug!(%method, %path, status, ms, "api request");
    }
    resp
}

async fn no_route() -> ApiError {
    ApiError::NotFound("no such API route".into())
}

/// Turns the framework's plain-text errors (405, 413, …) into `{"error": …}`.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    } else {
        text
    };
    let body = serde_json::json!({ "error": error }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
