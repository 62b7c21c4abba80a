//! Organisations, bearer tokens and the authorisation middleware.
//!
//! A token is scoped to an organisation or to one app of it, with a role
//! (`readonly` < `deploy` < `admin`). Only the SHA-256 of its secret part is stored
//! (catalog key `tokens/{id}`); the plaintext is returned once, by [`create_token`].
//! The middleware checks every `/v1` route before a handler runs.

use std::sync::Arc;

use aloft_store::{Expect, Store, StoreError};
use aloft_types::catalog::{AppRecord, SCHEMA_VERSION, app_key};
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ApiState;
use crate::error::ApiError;
use crate::util::{now_rfc3339, random_hex};

/// The organisation every new install has.
pub const DEFAULT_ORG: &str = "personal";
const TOKEN_PREFIX: &str = "aloft_";

/// `orgs/{slug}`
pub fn org_key(slug: &str) -> String {
    format!("orgs/{slug}")
}

/// `tokens/{id}`
pub fn token_key(id: &str) -> String {
    format!("tokens/{id}")
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything in scope.
    Readonly,
    /// Also change machines, volumes, secrets of apps in scope.
    Deploy,
    /// Also create and delete apps.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "readonly" => Ok(Role::Readonly),
            "deploy" => Ok(Role::Deploy),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::BadRole(other.to_string())),
        }
    }
}

/// An organisation (`orgs/{slug}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgRecord {
    pub schema: u32,
    pub slug: String,
    pub name: String,
    pub created_at: String,
}

/// A token as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub schema: u32,
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the secret part of the token.
    pub hash: String,
    pub org: String,
    /// Limited to this app of `org`, when set.
    #[serde(default)]
    pub app: Option<String>,
    pub role: Role,
    pub created_at: String,
    /// Unix seconds after which the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// A narrower use than the role allows: [`SCOPE_KMS`] limits the token to using
    /// its app's secret keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The scope of a KMS token (`POST /tokens/kms`): list and use the app's secret keys
/// (encrypt, decrypt, sign, verify), nothing else.
pub const SCOPE_KMS: &str = "kms";

/// Who is calling: the verified token's scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub token_id: String,
    pub org: String,
    pub app: Option<String>,
    pub role: Role,
    /// See [`TokenRecord::scope`].
    pub scope: Option<String>,
}

impl Principal {
    /// Can this principal see (and, for `write`, change) `app` of org `app_org`?
    pub fn allows_app(&self, app: &str, app_org: &str, needed: Role) -> bool {
        self.org == app_org && self.app.as_deref().is_none_or(|a| a == app) && self.role >= needed
    }
}

/// A token that was created; `token` is the only copy of the plaintext.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub token: String,
    pub record: TokenRecord,
}

/// Errors of organisation and token operations.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("organization {0:?} not found")]
    NoOrg(String),
    #[error("app {app:?} not found in organization {org:?}")]
    NoApp { org: String, app: String },
    #[error("unknown role {0:?} (readonly, deploy or admin)")]
    BadRole(String),
    #[error("catalog record {key}: {message}")]
    Record { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoOrg(_) | AuthError::NoApp { .. } => ApiError::NotFound(e.to_string()),
            AuthError::BadRole(_) => ApiError::BadRequest(e.to_string()),
            AuthError::Store(store) => store.into(),
            AuthError::Record { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

/// Reads and decodes a JSON record; `None` when absent.
pub(crate) async fn read_record<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<T>, AuthError> {
    match store.get(key).await? {
        None => Ok(None),
        Some(e) => serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|err| AuthError::Record {
                key: key.to_string(),
                message: err.to_string(),
            }),
    }
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, AuthError> {
    serde_json::to_vec(v).map_err(|e| AuthError::Record {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Creates the default organisation when the catalog has none by that name.
pub async fn ensure_default_org(store: &dyn Store) -> Result<(), AuthError> {
    let key = org_key(DEFAULT_ORG);
    let rec = OrgRecord {
        schema: SCHEMA_VERSION,
        slug: DEFAULT_ORG.into(),
        name: "Personal".into(),
        created_at: now_rfc3339(),
    };
    match store
        .put_if(&key, encode(&key, &rec)?, Expect::Absent)
        .await
    {
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two byte strings (their length is not secret): for
/// token hashes and MACs, so that the time a refusal takes says nothing of how much
/// of a guess matched.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Creates a token for `org` (or one `app` of it) with `role`, and returns its
/// plaintext — the only time it exists outside the caller.
pub async fn create_token(
    state: &ApiState,
    name: &str,
    org: &str,
    app: Option<&str>,
    role: Role,
) -> Result<NewToken, AuthError> {
    create_token_expiring(state, name, org, app, role, None).await
}

/// [`create_token`] with a lifetime.
pub async fn create_token_expiring(
    state: &ApiState,
    name: &str,
    org: &str,
    app: Option<&str>,
    role: Role,
    ttl: Option<std::time::Duration>,
) -> Result<NewToken, AuthError> {
    create_token_scoped(state, name, org, app, role, ttl, None).await
}

/// [`create_token_expiring`] with a [`TokenRecord::scope`].
pub async fn create_token_scoped(
    state: &ApiState,
    name: &str,
    org: &str,
    app: Option<&str>,
    role: Role,
    ttl: Option<std::time::Duration>,
    scope: Option<&str>,
) -> Result<NewToken, AuthError> {
    let store = state.store();
    if read_record::<OrgRecord>(store, &org_key(org))
        .await?
        .is_none()
    {
        return Err(AuthError::NoOrg(org.to_string()));
    }
    if let Some(app) = app {
        let rec: Option<AppRecord> = read_record(store, &app_key(app)).await?;
        if rec.is_none_or(|r| r.org != org) {
            return Err(AuthError::NoApp {
                org: org.to_string(),
                app: app.to_string(),
            });
        }
    }
    let id = random_hex(8);
    let secret = random_hex(32);
    let record = TokenRecord {
        schema: SCHEMA_VERSION,
        id: id.clone(),
        name: name.to_string(),
        hash: hash_secret(&secret),
        org: org.to_string(),
        app: app.map(str::to_string),
        role,
        created_at: now_rfc3339(),
        expires_at: ttl.map(|t| unix_now().saturating_add(t.as_secs())),
        scope: scope.map(str::to_string),
    };
    let key = token_key(&id);
    store
        .put_if(&key, encode(&key, &record)?, Expect::Absent)
        .await?;
    Ok(NewToken {
        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        id,
        record,
    })
}

/// Verifies a plaintext token; `None` when it is not one of ours.
pub async fn verify_token(store: &dyn Store, token: &str) -> Result<Option<Principal>, AuthError> {
    let Some((id, secret)) = token
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|t| t.split_once('_'))
    else {
        return Ok(None);
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let Some(rec) = read_record::<TokenRecord>(store, &token_key(id)).await? else {
        return Ok(None);
    };
    if !ct_eq(rec.hash.as_bytes(), hash_secret(secret).as_bytes())
        || rec.expires_at.is_some_and(|e| e <= unix_now())
    {
        return Ok(None);
    }
    Ok(Some(Principal {
        token_id: rec.id,
        org: rec.org,
        app: rec.app,
        role: rec.role,
        scope: rec.scope,
    }))
}

/// The token in an `Authorization: Bearer …` or `Authorization: FlyV1 …` header.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("flyv1"))
        .then_some(rest.trim())
}

/// The role a request needs: reads need `readonly`; changes `deploy`; deleting an
/// app `admin`. (Token introspection is a read even though it is a POST.)
fn needed_role(method: &Method, segs: &[&str]) -> Role {
    // Token management (`/tokens`, `DELETE /tokens/{id}`) is for admins.
    if segs.first() == Some(&"tokens") && (segs.len() == 1 || method == Method::DELETE) {
        return Role::Admin;
    }
    // Minting an OIDC identity (or a KMS token) for an app acts as that app: a
    // read-only token may not.
    if segs == ["tokens", "oidc"] || segs == ["tokens", "kms"] {
        return Role::Deploy;
    }
    if segs.first() == Some(&"tokens") || method == Method::GET || method == Method::HEAD {
        return Role::Readonly;
    }
    if method == Method::DELETE && segs.len() == 2 && segs[0] == "apps" {
        return Role::Admin;
    }
    if segs.len() == 3 && segs[0] == "apps" && segs[2] == "deploy_token" {
        return Role::Admin;
    }
    Role::Deploy
}

/// The middleware: verifies the bearer token, checks the caller may touch the app in
/// the path, and hands the [`Principal`] to the handler.
pub async fn authorize(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    match check(&state, &mut req).await {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn check(state: &ApiState, req: &mut Request) -> Result<(), ApiError> {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Ok(()); // the router answers 404 for anything else
    };
    if rest == "openapi.json" {
        return Ok(());
    }
    // OIDC discovery and signing keys are public, as relying parties fetch them.
    if rest.starts_with("oidc/") && req.method() == Method::GET {
        return Ok(());
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| {
            ApiError::Unauthorized("missing bearer token (Authorization header)".into())
        })?;
    let principal = verify_token(state.store(), token)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid or revoked token".into()))?;
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    if principal.scope.as_deref() == Some(SCOPE_KMS) && !kms_allows(req.method(), &segs) {
        return Err(ApiError::Forbidden(format!(
            "a KMS token may only use its app's secret keys, not {} {path}",
            req.method()
        )));
    }
    let needed = needed_role(req.method(), &segs);
    if principal.role < needed {
        return Err(ApiError::Forbidden(format!(
            "token role {:?} may not {} {path} (needs {:?})",
            principal.role,
            req.method(),
            needed
        )));
    }
    match segs.as_slice() {
        ["apps", app, ..] => {
            let app = percent_decode(app);
            if principal.app.as_deref().is_some_and(|a| a != app) {
                return Err(ApiError::Forbidden(format!(
                    "this token is limited to app {:?}, not {app:?}",
                    principal.app.as_deref().unwrap_or_default()
                )));
            }
            let rec: Option<AppRecord> = read_record(state.store(), &app_key(&app)).await?;
            match rec {
                Some(rec) if principal.allows_app(&app, &rec.org, needed) => {}
                // Another organisation's app is reported as absent.
                _ => return Err(ApiError::NotFound(format!("app {app:?} not found"))),
            }
        }
        ["apps"] if req.method() == Method::POST && principal.app.is_some() => {
            return Err(ApiError::Forbidden(
                "an app-scoped token cannot create apps".into(),
            ));
        }
        _ => {}
    }
    req.extensions_mut().insert(Arc::new(principal));
    Ok(())
}

/// What a KMS-scoped token may call: reading its app's secret keys and using them.
fn kms_allows(method: &Method, segs: &[&str]) -> bool {
    match segs {
        ["tokens", "current"] => true,
        ["apps", _, "secretkeys", ..] if *method == Method::GET => true,
        ["apps", _, "secretkeys", _, op] if *method == Method::POST => {
            matches!(*op, "encrypt" | "decrypt" | "sign" | "verify")
        }
        _ => false,
    }
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}
