//! The OpenAPI document, generated from the handlers' annotations and served at
//! `GET /v1/openapi.json`. Paths are relative to the server URL `/v1`, as in Fly's.

use axum::Json;
use utoipa::OpenApi;

use crate::{
    apps, certificates, console, error, ips, machines, oidc, releases, secretkeys, secrets, tokens,
    volumes,
};

/// Schemas of the `aloft-types` shapes the API returns, in Fly's JSON form. They
/// describe the serialised types (checked by the test suite against real responses);
/// they are never constructed.
#[allow(dead_code)]
pub mod doc {
    use std::collections::BTreeMap;

    use serde_json::Value;
    use utoipa::ToSchema;

    /// Fly's `Machine`.
    #[derive(ToSchema)]
    pub struct Machine {
        pub id: String,
        pub name: String,
        /// created, starting, started, stopping, stopped, suspending, suspended,
        /// replacing, destroying, destroyed, failed
        pub state: String,
        pub region: String,
        /// Unique for each version of the machine.
        pub instance_id: String,
        pub private_ip: String,
        pub config: MachineConfig,
        pub image_ref: Option<ImageRef>,
        pub created_at: String,
        pub updated_at: String,
        pub events: Option<Vec<MachineEvent>>,
        pub checks: Option<Vec<CheckStatus>>,
        /// ok, unknown or unreachable
        pub host_status: String,
        /// Returned only on creation with `lease_ttl`.
        pub nonce: Option<String>,
    }

    /// `fly.MachineConfig`.
    #[derive(ToSchema)]
    #[schema(as = fly::MachineConfig)]
    pub struct MachineConfig {
        pub image: Option<String>,
        pub env: Option<BTreeMap<String, String>>,
        pub init: Option<MachineInit>,
        pub guest: Option<MachineGuest>,
        pub metadata: Option<BTreeMap<String, String>>,
        pub mounts: Option<Vec<MachineMount>>,
        pub services: Option<Vec<Value>>,
        pub metrics: Option<Value>,
        pub checks: Option<BTreeMap<String, Value>>,
        pub restart: Option<MachineRestart>,
        pub auto_destroy: Option<bool>,
        pub dns: Option<Value>,
        pub processes: Option<Vec<Value>>,
        pub schedule: Option<String>,
        pub standbys: Option<Vec<String>>,
        pub files: Option<Vec<Value>>,
        pub statics: Option<Vec<Value>>,
        pub stop_config: Option<StopConfig>,
        pub disable_machine_autostart: Option<bool>,
        pub size: Option<String>,
        pub rootfs: Option<Value>,
        pub cache_drive: Option<Value>,
        pub containers: Option<Value>,
    }

    /// `fly.MachineInit`.
    #[derive(ToSchema)]
    #[schema(as = fly::MachineInit)]
    pub struct MachineInit {
        pub exec: Option<Vec<String>>,
        pub entrypoint: Option<Vec<String>>,
        pub cmd: Option<Vec<String>>,
        pub tty: Option<bool>,
        pub swap_size_mb: Option<i64>,
        pub kernel_args: Option<Vec<String>>,
    }

    /// `fly.MachineGuest`.
    #[derive(ToSchema)]
    #[schema(as = fly::MachineGuest)]
    pub struct MachineGuest {
        pub cpu_kind: Option<String>,
        pub cpus: Option<i64>,
        pub memory_mb: Option<i64>,
        pub gpus: Option<i64>,
        pub gpu_kind: Option<String>,
        pub host_dedication_id: Option<String>,
        pub kernel_args: Option<Vec<String>>,
        pub max_memory_mb: Option<i64>,
        pub persist_rootfs: Option<String>,
    }

    /// `fly.MachineMount`.
    #[derive(ToSchema)]
    #[schema(as = fly::MachineMount)]
    pub struct MachineMount {
        pub volume: Option<String>,
        pub path: Option<String>,
        pub name: Option<String>,
        pub size_gb: Option<i64>,
        pub encrypted: Option<bool>,
        pub extend_threshold_percent: Option<i64>,
        pub add_size_gb: Option<i64>,
        pub size_gb_limit: Option<i64>,
    }

    /// `fly.MachineRestart`.
    #[derive(ToSchema)]
    #[schema(as = fly::MachineRestart)]
    pub struct MachineRestart {
        pub policy: Option<String>,
        pub max_retries: Option<i64>,
        pub gpu_bid_price: Option<f64>,
    }

    /// `fly.StopConfig`.
    #[derive(ToSchema)]
    #[schema(as = fly::StopConfig)]
    pub struct StopConfig {
        pub timeout: Option<String>,
        pub signal: Option<String>,
    }

    /// Fly's `ImageRef`.
    #[derive(ToSchema)]
    pub struct ImageRef {
        pub registry: String,
        pub repository: String,
        pub tag: String,
        pub digest: String,
        pub labels: Option<BTreeMap<String, String>>,
    }

    /// Fly's `MachineEvent`.
    #[derive(ToSchema)]
    pub struct MachineEvent {
        pub id: String,
        #[schema(rename = "type")]
        pub kind: String,
        pub status: String,
        pub source: String,
        /// Unix milliseconds.
        pub timestamp: i64,
        pub request: Option<Value>,
    }

    /// Fly's `CheckStatus`.
    #[derive(ToSchema)]
    pub struct CheckStatus {
        pub name: String,
        pub status: String,
        pub output: String,
        pub updated_at: String,
    }

    /// Fly's `Lease`.
    #[derive(ToSchema)]
    pub struct Lease {
        pub nonce: String,
        /// Unix seconds.
        pub expires_at: i64,
        pub owner: String,
        pub description: String,
        /// Machine version.
        pub version: String,
    }

    /// Fly's `Volume`.
    #[derive(ToSchema)]
    pub struct Volume {
        pub id: String,
        pub name: String,
        pub state: String,
        pub size_gb: i64,
        pub region: String,
        pub zone: String,
        pub encrypted: bool,
        pub attached_machine_id: Option<String>,
        pub attached_alloc_id: Option<String>,
        pub created_at: String,
        pub host_status: String,
        pub fstype: String,
        pub snapshot_retention: i64,
        pub auto_backup_enabled: bool,
    }
}

/// The Machines API document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Machines API", description = "Aloft's Fly.io-compatible Machines API"),
    servers((url = "/v1")),
    paths(
        apps::list, apps::create, apps::show, apps::destroy,
        apps::secrets_list, apps::secrets_update, apps::secret_show, apps::secret_set,
        apps::secret_delete, apps::org_machines,
        machines::list, machines::create, machines::show, machines::update, machines::destroy,
        machines::start, machines::stop, machines::restart, machines::suspend, machines::signal,
        machines::cordon, machines::uncordon, machines::wait, machines::events,
        machines::lease_show, machines::lease_create, machines::lease_release, machines::exec,
        machines::metadata_show, machines::metadata_replace, machines::metadata_merge,
        machines::metadata_key, machines::metadata_upsert, machines::metadata_delete,
        machines::versions, machines::memory, machines::logs,
        releases::list, releases::create, releases::show, releases::update, releases::rollback,
        volumes::list, volumes::create, volumes::show, volumes::destroy, volumes::extend,
        volumes::snapshots, volumes::snapshot_create,
        machines::memory_set, machines::memory_reclaim, machines::ps,
        tokens::current, tokens::authenticate, tokens::authorize, tokens::deploy_token,
        tokens::regions,
        certificates::list, certificates::acme_create, certificates::custom_create,
        certificates::show, certificates::delete, certificates::acme_delete,
        certificates::custom_delete, certificates::check,
        secretkeys::list, secretkeys::show, secretkeys::set, secretkeys::delete,
        secretkeys::encrypt_handler, secretkeys::decrypt_handler, secretkeys::generate,
        secretkeys::sign_handler, secretkeys::verify_handler,
        ips::list, ips::create, ips::delete,
        volumes::org_list, tokens::placements, tokens::kms, oidc::token, oidc::jwks,
        oidc::discovery, tokens::list_tokens, tokens::create_token, tokens::revoke_token,
        console::console,
    ),
    components(schemas(error::ErrorResponse, secrets::AppSecret)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON.
pub fn document_json() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}

/// `GET /v1/openapi.json` (no token needed).
pub async fn document() -> Json<serde_json::Value> {
    Json(document_json())
}
