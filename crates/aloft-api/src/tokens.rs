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
    let ttl = match req.expiry.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(e) => Some(
            crate::util::parse_go_duration(e)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid field `expiry`: {e:?} is not a duration like \"720h\""
                    ))
                })?,
        ),
    };
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
