//! Token introspection (`/tokens/current`, `/tokens/authenticate`, `/tokens/authorize`).

use std::sync::Arc;

use aloft_types::catalog::{AppRecord, app_key};
use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::{Principal, Role, bearer, read_record, verify_token};
use crate::error::{ApiError, ErrorResponse};
use crate::extract::JsonBody;

/// Fly's `main.tokenInfo`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::tokenInfo)]
pub struct TokenInfo {
    pub token_id: String,
    pub org_slug: String,
    pub organization: String,
    /// The app the token is limited to (empty for an organisation token).
    pub apps: Vec<String>,
    /// `readonly`, `deploy` or `admin` (Aloft's addition).
    pub role: String,
}

/// Fly's `CurrentTokenResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CurrentTokenResponse {
    pub tokens: Vec<TokenInfo>,
}

/// Fly's `authenticateTokenRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = authenticateTokenRequest)]
pub struct AuthenticateTokenRequest {
    /// An `Authorization` header value (`Bearer …`) or a bare token.
    pub header: String,
}

/// Fly's `root.VerifiedToken`, reduced to what Aloft tokens carry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = root::VerifiedToken)]
pub struct VerifiedToken {
    pub header: String,
    pub token: TokenInfo,
}

/// Fly's `main.TokenAccess` (the fields Aloft checks).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = main::TokenAccess)]
pub struct TokenAccess {
    pub org_slug: Option<String>,
    pub app_name: Option<String>,
    /// Action letters: r(ead), w(rite), c(reate), d(elete), C(ontrol).
    pub action: Option<String>,
}

/// Fly's `authorizeTokenRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = authorizeTokenRequest)]
pub struct AuthorizeTokenRequest {
    pub header: String,
    pub access: TokenAccess,
}

/// Fly's `authorizeResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = authorizeResponse)]
pub struct AuthorizeResponse {
    pub access: TokenAccess,
    pub verified_token: VerifiedToken,
}

fn info(p: &Principal) -> TokenInfo {
    TokenInfo {
        token_id: p.token_id.clone(),
        org_slug: p.org.clone(),
        organization: p.org.clone(),
        apps: p.app.iter().cloned().collect(),
        role: format!("{:?}", p.role).to_lowercase(),
    }
}

#[utoipa::path(get, path = "/tokens/current", tag = "Tokens", operation_id = "CurrentToken_show",
    responses((status = 200, description = "OK", body = CurrentTokenResponse),
        (status = 401, description = "Unauthorized", body = ErrorResponse)))]
pub async fn current(Extension(who): Extension<Arc<Principal>>) -> Json<CurrentTokenResponse> {
    Json(CurrentTokenResponse {
        tokens: vec![info(&who)],
    })
}

async fn verify_header(state: &ApiState, header: &str) -> Result<(String, Principal), ApiError> {
    let token = bearer(header).unwrap_or(header.trim());
    if token.is_empty() {
        return Err(ApiError::BadRequest("field `header` is required".into()));
    }
    let p = verify_token(state.store(), token)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("the token in `header` is not valid".into()))?;
    Ok((header.to_string(), p))
}

#[utoipa::path(post, path = "/tokens/authenticate", tag = "Tokens", operation_id = "Tokens_authenticate",
    request_body(content = AuthenticateTokenRequest, description = "Authenticate token request"),
    responses((status = 200, description = "OK", body = Vec<VerifiedToken>),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn authenticate(
    State(state): State<ApiState>,
    JsonBody(req): JsonBody<AuthenticateTokenRequest>,
) -> Result<Json<Vec<VerifiedToken>>, ApiError> {
    let (header, p) = verify_header(&state, &req.header).await?;
    Ok(Json(vec![VerifiedToken {
        header,
        token: info(&p),
    }]))
}

#[utoipa::path(post, path = "/tokens/authorize", tag = "Tokens", operation_id = "Tokens_authorize",
    request_body(content = AuthorizeTokenRequest, description = "Authorize token request"),
    responses((status = 200, description = "OK", body = AuthorizeResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 403, description = "Forbidden", body = ErrorResponse)))]
pub async fn authorize(
    State(state): State<ApiState>,
    JsonBody(req): JsonBody<AuthorizeTokenRequest>,
) -> Result<Json<AuthorizeResponse>, ApiError> {
    let (header, p) = verify_header(&state, &req.header).await?;
    let action = req.access.action.clone().unwrap_or_else(|| "r".into());
    if let Some(bad) = action.chars().find(|c| !"rwcdC".contains(*c)) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `access.action`: unknown action letter {bad:?}"
        )));
    }
    let needed = if action.chars().all(|c| c == 'r') {
        Role::Readonly
    } else {
        Role::Deploy
    };
    let denied = |why: String| Err(ApiError::Forbidden(why));
    if p.role < needed {
        return denied(format!("token role {:?} does not allow {action:?}", p.role));
    }
    if let Some(org) = req.access.org_slug.as_deref()
        && org != p.org
    {
        return denied(format!(
            "token does not grant access to organization {org:?}"
        ));
    }
    if let Some(app) = req.access.app_name.as_deref() {
        let rec: Option<AppRecord> = read_record(state.store(), &app_key(app)).await?;
        if !rec.is_some_and(|r| p.allows_app(app, &r.org, needed)) {
            return denied(format!("token does not grant access to app {app:?}"));
        }
    }
    Ok(Json(AuthorizeResponse {
        access: req.access,
        verified_token: VerifiedToken {
            header,
            token: info(&p),
        },
    }))
}

/// Fly's `CreateAppDeployTokenRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateAppDeployTokenRequest {
    /// Lifetime as a Go duration ("720h"); none = no expiry.
    pub expiry: Option<String>,
}

/// A token's lifetime from the request's `expiry` (a Go duration like "720h"); none
/// or empty: no expiry.
fn expiry(field: Option<&str>) -> Result<Option<std::time::Duration>, ApiError> {
    match field.filter(|e| !e.is_empty()) {
        None => Ok(None),
        Some(e) => crate::util::parse_go_duration(e)
            .filter(|d| !d.is_zero())
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid field `expiry`: {e:?} is not a duration like \"720h\""
                ))
            }),
    }
}

/// Fly's `CreateAppResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateAppResponse {
    /// The token's only copy.
    pub token: String,
}

/// A deploy token limited to this app (needs an admin token).
#[utoipa::path(post, path = "/apps/{app_name}/deploy_token", tag = "Apps", operation_id = "App_create_deploy_token",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateAppDeployTokenRequest, description = "Request body"),
    responses((status = 200, description = "OK", body = CreateAppResponse)))]
pub async fn deploy_token(
    State(state): State<ApiState>,
    axum::extract::Path(app): axum::extract::Path<String>,
    Extension(who): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<CreateAppDeployTokenRequest>,
) -> Result<Json<CreateAppResponse>, ApiError> {
    let ttl = expiry(req.expiry.as_deref())?;
    let t = crate::auth::create_token_expiring(
        &state,
        &format!("deploy token for {app}"),
        &who.org,
        Some(&app),
        Role::Deploy,
        ttl,
    )
    .await?;
    Ok(Json(CreateAppResponse { token: t.token }))
}

/// Fly's `main.regionRow` (what Aloft knows of a region: its code).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::regionRow)]
pub struct RegionRow {
    pub code: String,
    pub name: String,
}

/// Fly's `main.regionResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::regionResponse)]
pub struct RegionResponse {
    pub regions: Vec<RegionRow>,
}

/// The regions served by this installation's hosts.
#[utoipa::path(get, path = "/platform/regions", tag = "Platform", operation_id = "Platform_regions_get",
    responses((status = 200, description = "OK", body = RegionResponse)))]
pub async fn regions(State(state): State<ApiState>) -> Json<RegionResponse> {
    let codes: std::collections::BTreeSet<&str> =
        state.agents().iter().map(|a| a.region()).collect();
    Json(RegionResponse {
        regions: codes
            .into_iter()
            .map(|c| RegionRow {
                code: c.to_string(),
                name: c.to_string(),
            })
            .collect(),
    })
}

/// How long a KMS token lives.
pub const KMS_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// A token limited to using the caller's app's secret keys (list, encrypt, decrypt,
/// sign, verify), valid for an hour. The caller must hold a deploy token of one app.
#[utoipa::path(post, path = "/tokens/kms", tag = "Tokens", operation_id = "Tokens_request_Kms",
    responses((status = 200, description = "KMS token", body = String, content_type = "text/plain"),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 403, description = "Forbidden", body = ErrorResponse)))]
pub async fn kms(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Some(app) = who.app.as_deref() else {
        return Err(ApiError::BadRequest(
            "a KMS token is for one app's secret keys: call with a token limited to an app \
             (aloft tokens create --app A --deploy)"
                .into(),
        ));
    };
    if who.role < Role::Deploy {
        return Err(ApiError::Forbidden(
            "a read-only token cannot request a KMS token".into(),
        ));
    }
    let t = crate::auth::create_token_scoped(
        &state,
        &format!("kms token for {app}"),
        &who.org,
        Some(app),
        Role::Deploy,
        Some(KMS_TOKEN_TTL),
        Some(crate::auth::SCOPE_KMS),
    )
    .await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        t.token,
    )
        .into_response())
}

/// One token as `GET /v1/tokens` shows it (never the secret or its hash).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenSummary {
    pub id: String,
    pub name: String,
    pub org_slug: String,
    /// The app the token is limited to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// `readonly`, `deploy` or `admin`.
    pub role: String,
    /// `kms` for a KMS token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub created_at: String,
    /// RFC 3339; absent when the token does not expire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListTokensResponse {
    pub tokens: Vec<TokenSummary>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateTokenRequest {
    /// A label (defaults to one naming the scope).
    pub name: Option<String>,
    /// Limit the token to this app of the organisation.
    pub app: Option<String>,
    /// `readonly`, `deploy` (default) or `admin` (organisation tokens only).
    pub role: Option<String>,
    /// Lifetime as a Go duration ("720h"); none = no expiry.
    pub expiry: Option<String>,
}

/// The created token: `token` is its only copy; the rest as in [`TokenSummary`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateTokenResponse {
    pub token: String,
    pub id: String,
    pub name: String,
    pub org_slug: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub role: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

fn summary(r: &crate::auth::TokenRecord) -> TokenSummary {
    TokenSummary {
        id: r.id.clone(),
        name: r.name.clone(),
        org_slug: r.org.clone(),
        app: r.app.clone(),
        role: format!("{:?}", r.role).to_lowercase(),
        scope: r.scope.clone(),
        created_at: r.created_at.clone(),
        expires_at: r.expires_at.map(crate::util::rfc3339),
    }
}

fn org_admin(who: &Principal) -> Result<(), ApiError> {
    if who.role == Role::Admin && who.app.is_none() && who.scope.is_none() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "managing tokens needs an organization admin token".into(),
        ))
    }
}

/// The organisation's tokens (Aloft's own; organisation admins only).
#[utoipa::path(get, path = "/tokens", tag = "Tokens", operation_id = "Tokens_list",
    responses((status = 200, description = "OK", body = ListTokensResponse),
        (status = 403, description = "Forbidden", body = ErrorResponse)))]
pub async fn list_tokens(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<Json<ListTokensResponse>, ApiError> {
    org_admin(&who)?;
    let mut tokens = Vec::new();
    for e in state.store().list("tokens/").await?.entries {
        let r: crate::auth::TokenRecord = serde_json::from_slice(&e.value)
            .map_err(|err| ApiError::Internal(format!("catalog record {}: {err}", e.key)))?;
        if r.org == who.org {
            tokens.push(summary(&r));
        }
    }
    tokens.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    Ok(Json(ListTokensResponse { tokens }))
}

/// Creates a token of the caller's organisation (Aloft's own; admins only).
#[utoipa::path(post, path = "/tokens", tag = "Tokens", operation_id = "Tokens_create",
    request_body(content = CreateTokenRequest, description = "Token scope, role and lifetime"),
    responses((status = 201, description = "Created (the token is shown only now)", body = CreateTokenResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 403, description = "Forbidden", body = ErrorResponse)))]
pub async fn create_token(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<CreateTokenRequest>,
) -> Result<(axum::http::StatusCode, Json<CreateTokenResponse>), ApiError> {
    org_admin(&who)?;
    let role = match req.role.as_deref().filter(|r| !r.is_empty()) {
        None => Role::Deploy,
        Some(r) => r.parse::<Role>().map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid field `role`: {r:?} is not readonly, deploy or admin"
            ))
        })?,
    };
    let app = req.app.as_deref().filter(|a| !a.is_empty());
    if app.is_some() && role == Role::Admin {
        return Err(ApiError::BadRequest(
            "invalid field `role`: an app token is readonly or deploy, not admin".into(),
        ));
    }
    let ttl = expiry(req.expiry.as_deref())?;
    let name = match req.name.filter(|n| !n.is_empty()) {
        Some(n) if n.len() > 200 || n.chars().any(char::is_control) => {
            return Err(ApiError::BadRequest(
                "invalid field `name`: at most 200 printable characters".into(),
            ));
        }
        Some(n) => n,
        None => format!(
            "{} token for {}",
            format!("{role:?}").to_lowercase(),
            app.unwrap_or(&who.org)
        ),
    };
    let t = crate::auth::create_token_expiring(&state, &name, &who.org, app, role, ttl)
        .await
        .map_err(|e| match e {
            crate::auth::AuthError::NoApp { app, .. } => {
                ApiError::BadRequest(format!("invalid field `app`: app {app:?} not found"))
            }
            other => other.into(),
        })?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json({
            let s = summary(&t.record);
            CreateTokenResponse {
                token: t.token,
                id: s.id,
                name: s.name,
                org_slug: s.org_slug,
                app: s.app,
                role: s.role,
                created_at: s.created_at,
                expires_at: s.expires_at,
            }
        }),
    ))
}

/// Revokes a token of the caller's organisation (Aloft's own; admins only).
#[utoipa::path(delete, path = "/tokens/{token_id}", tag = "Tokens", operation_id = "Tokens_revoke",
    params(("token_id" = String, Path, description = "Token id")),
    responses((status = 200, description = "Revoked", body = TokenSummary),
        (status = 403, description = "Forbidden", body = ErrorResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn revoke_token(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<TokenSummary>, ApiError> {
    org_admin(&who)?;
    let not_found = || ApiError::NotFound(format!("token {id:?} not found"));
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let key = crate::auth::token_key(&id);
    let Some(entry) = state.store().get(&key).await? else {
        return Err(not_found());
    };
    let r: crate::auth::TokenRecord = serde_json::from_slice(&entry.value)
        .map_err(|err| ApiError::Internal(format!("catalog record {key}: {err}")))?;
    if r.org != who.org {
        return Err(not_found());
    }
    match state
        .store()
        .delete(&key, aloft_store::Expect::Revision(entry.revision))
        .await
    {
        Ok(_) => Ok(Json(summary(&r))),
        Err(aloft_store::StoreError::Conflict { .. }) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

/// Fly's `main.getPlacementsRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = main::getPlacementsRequest)]
pub struct PlacementsRequest {
    /// The organisation (required; must be the token's).
    #[schema(required = true)]
    pub org_slug: String,
    /// The machine size to simulate (default performance-1x).
    #[schema(value_type = Option<crate::openapi::doc::MachineGuest>)]
    pub compute: Option<aloft_types::machine::MachineGuest>,
    /// Machines to place; 0 asks for each region's room.
    pub count: Option<i64>,
    /// Comma-separated regions in order of preference; `any` (or none) for all.
    pub region: Option<String>,
    /// Only regions holding an unattached volume of this name (in the organisation).
    pub volume_name: Option<String>,
    pub volume_size_bytes: Option<i64>,
    /// Accepted for compatibility; Aloft's preferences are fixed.
    #[schema(value_type = Option<Object>)]
    pub weights: Option<std::collections::BTreeMap<String, i64>>,
}

/// Fly's `placement.RegionPlacement`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = placement::RegionPlacement)]
pub struct RegionPlacement {
    pub region: String,
    /// Machines that would be placed in this region.
    pub count: i64,
    /// Hosts of the region with room for one such machine.
    pub concurrency: i64,
}

/// Fly's `main.getPlacementsResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = main::getPlacementsResponse)]
pub struct PlacementsResponse {
    pub regions: Vec<RegionPlacement>,
}

/// Room a host without a heartbeat yet is taken to have (placement counts such a
/// host as having room), in machines.
const UNKNOWN_HOST_ROOM: i64 = 1000;

/// Where machines of a given size would go: per region, how many fit on the hosts'
/// free memory (from their heartbeats), filled in the order of preference.
#[utoipa::path(post, path = "/platform/placements", tag = "Platform", operation_id = "Platform_placements_post",
    request_body(content = PlacementsRequest, description = "Get placements request"),
    responses((status = 200, description = "OK", body = PlacementsResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn placements(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<PlacementsRequest>,
) -> Result<Json<PlacementsResponse>, ApiError> {
    if req.org_slug.is_empty() {
        return Err(ApiError::BadRequest("field `org_slug` is required".into()));
    }
    if req.org_slug != who.org {
        return Err(ApiError::NotFound(format!(
            "organization {:?} not found",
            req.org_slug
        )));
    }
    let count = req.count.unwrap_or(0);
    if !(0..=1000).contains(&count) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `count`: {count} is not between 0 and 1000"
        )));
    }
    let needed_mb = match &req.compute {
        Some(g) if g.memory_mb < 0 => {
            return Err(ApiError::BadRequest(format!(
                "invalid field `compute.memory_mb`: {} is negative",
                g.memory_mb
            )));
        }
        Some(g) if g.memory_mb > 0 => g.memory_mb as u64,
        _ => aloft_types::machine::MachineGuest::from_size("performance-1x")
            .map_or(crate::placement::DEFAULT_MEMORY_MB, |g| g.memory_mb as u64),
    }
    .max(1);
    // Regions served, in the order agents were given.
    let mut served: Vec<&str> = Vec::new();
    for a in state.agents() {
        if !served.contains(&a.region()) {
            served.push(a.region());
        }
    }
    let mut wanted: Vec<&str> = Vec::new();
    for r in req
        .region
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        if r == "any" {
            for s in &served {
                if !wanted.contains(s) {
                    wanted.push(s);
                }
            }
        } else if let Some(s) = served.iter().find(|s| **s == r) {
            if !wanted.contains(s) {
                wanted.push(s);
            }
        } else {
            return Err(ApiError::BadRequest(format!(
                "invalid field `region`: no host serves region {r:?}"
            )));
        }
    }
    if wanted.is_empty() {
        wanted = served.clone();
    }
    if let Some(vol) = req.volume_name.as_deref().filter(|v| !v.is_empty()) {
        // The volumes `/orgs/{org}/volumes` shows this token (an app token: its app's).
        let with_volume: std::collections::BTreeSet<String> =
            crate::volumes::org_volumes(&state, &who, &who.org)
                .await?
                .into_iter()
                .map(|(_, v)| v)
                .filter(|v| {
                    v.name == vol
                        && v.attached_machine_id.is_none()
                        && v.state != "destroyed"
                        && v.state != "destroying"
                })
                .map(|v| v.region)
                .collect();
        wanted.retain(|r| with_volume.contains(*r));
    }
    let hosts: std::collections::HashMap<String, aloft_types::catalog::HostRecord> = state
        .store()
        .list("hosts/")
        .await?
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<aloft_types::catalog::HostRecord>(&e.value).ok())
        .map(|h| (h.id.clone(), h))
        .collect();
    let mut left = count;
    let mut regions = Vec::new();
    for r in wanted {
        let mut room = 0i64;
        let mut concurrency = 0i64;
        for a in state.agents().iter().filter(|a| a.region() == r) {
            let fits = match hosts.get(a.host_id()) {
                Some(h) => {
                    (h.memory_mb_total.saturating_sub(h.memory_mb_committed) / needed_mb) as i64
                }
                None => UNKNOWN_HOST_ROOM,
            };
            room += fits;
            concurrency += i64::from(fits > 0);
        }
        let n = if count == 0 { room } else { room.min(left) };
        if count > 0 {
            left -= n;
        }
        if n > 0 || count == 0 {
            regions.push(RegionPlacement {
                region: r.to_string(),
                count: n,
                concurrency,
            });
        }
        if count > 0 && left == 0 {
            break;
        }
    }
    Ok(Json(PlacementsResponse { regions }))
}
