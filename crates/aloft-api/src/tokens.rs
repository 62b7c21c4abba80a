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
