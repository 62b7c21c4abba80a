//! OIDC tokens (`POST /tokens/oidc`): short-lived JWTs that say "this is app A of
//! organisation O (machine M)", for a cloud provider or any relying party that trusts
//! this install. They are signed with Ed25519 (`EdDSA`) by a key derived with HKDF
//! from the install's `secrets.key`; the public key is published, with no token
//! needed, at `GET /v1/oidc/jwks.json`, and each organisation's issuer has a discovery
//! document at `GET /v1/oidc/{org}/.well-known/openid-configuration`.
//!
//! The issuer is `{scheme}://{host}/v1/oidc/{org}`, the host being the one the request
//! was sent to. Claims follow Fly's: `sub` is `{org}:{app}:{machine}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::OptJsonBody;

/// How long an OIDC token is valid, in seconds.
pub const OIDC_TTL_SECS: u64 = 600;

/// Errors of OIDC token minting; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error(
        "an OIDC token names one app: use a token limited to an app (aloft tokens create --app A)"
    )]
    NoApp,
    #[error("invalid field `aud`: {0}")]
    BadAudience(String),
    #[error("invalid header fly-machine-id: app {app:?} has no machine {machine:?}")]
    NoMachine { app: String, machine: String },
    #[error("deriving the OIDC signing key: {0}")]
    Key(#[from] crate::secrets::SecretsError),
}

impl From<OidcError> for ApiError {
    fn from(e: OidcError) -> Self {
        match e {
            OidcError::NoApp | OidcError::BadAudience(_) | OidcError::NoMachine { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            OidcError::Key(k) => k.into(),
        }
    }
}

/// Fly's `CreateOIDCTokenRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = CreateOIDCTokenRequest)]
pub struct CreateOidcTokenRequest {
    /// The audience; defaults to the issuer.
    pub aud: Option<String>,
    /// Adds AWS session principal tags (`https://aws.amazon.com/tags`).
    pub aws_principal_tags: Option<bool>,
}

/// The install's OIDC signing key: HKDF-SHA-256 of `secrets.key`.
pub fn signing_key(install: &[u8; 32]) -> SigningKey {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"aloft"), install);
    let mut seed = [0u8; 32];
    // 32 bytes is far below HKDF-SHA-256's 8160-byte limit.
    if hk.expand(b"aloft-oidc-signing-key-v1", &mut seed).is_err() {
        unreachable!("HKDF output length is fixed and valid");
    }
    SigningKey::from_bytes(&seed)
}

/// The key id: the first 16 hex digits of the SHA-256 of the public key.
pub fn key_id(key: &SigningKey) -> String {
    hex::encode(&Sha256::digest(key.verifying_key().as_bytes())[..8])
}

/// The JWKS document for `key`.
pub fn jwks_for(key: &SigningKey) -> serde_json::Value {
    json!({ "keys": [{
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": key_id(key),
        "x": B64URL.encode(key.verifying_key().as_bytes()),
    }]})
}

/// Signs `claims` as a compact JWS (`EdDSA`).
pub fn sign_jwt(key: &SigningKey, claims: &serde_json::Value) -> String {
    let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": key_id(key)});
    let input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", B64URL.encode(sig.to_bytes()))
}

/// `{scheme}://{host}` of the request (for the issuer).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c))
        })
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

/// The issuer URL of `org` as seen through `headers`.
pub fn issuer(headers: &HeaderMap, org: &str) -> String {
    format!("{}/v1/oidc/{org}", base_url(headers))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mints an OIDC token for an app-scoped caller.
#[utoipa::path(post, path = "/tokens/oidc", tag = "Tokens", operation_id = "Tokens_request_OIDC",
    request_body(content = Option<CreateOidcTokenRequest>, description = "Optional request body"),
    responses((status = 200, description = "OIDC token", body = String, content_type = "text/plain"),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn token(
    State(state): State<ApiState>,
    Extension(who): Extension<Arc<Principal>>,
    headers: HeaderMap,
    OptJsonBody(req): OptJsonBody<CreateOidcTokenRequest>,
) -> Result<Response, ApiError> {
    let app = who.app.clone().ok_or(OidcError::NoApp)?;
    let iss = issuer(&headers, &who.org);
    let aud = req
        .aud
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| iss.clone());
    if aud.len() > 512 || aud.chars().any(char::is_control) {
        return Err(
            OidcError::BadAudience("must be at most 512 printable characters".into()).into(),
        );
    }
    let machine = match headers.get("fly-machine-id").and_then(|h| h.to_str().ok()) {
        None | Some("") => None,
        Some(id) => {
            let ms = crate::machines::app_machines(&state, &app).await?;
            let m = ms
                .into_iter()
                .find(|m| m.id == id)
                .ok_or_else(|| OidcError::NoMachine {
                    app: app.clone(),
                    machine: id.to_string(),
                })?;
            Some(m)
        }
    };
    let now = unix_now();
    let machine_id = machine.as_ref().map(|m| m.id.clone()).unwrap_or_default();
    let mut claims = json!({
        "iss": iss,
        "sub": format!("{}:{}:{}", who.org, app, machine_id),
        "aud": aud,
        "iat": now,
        "nbf": now,
        "exp": now + OIDC_TTL_SECS,
        "jti": crate::util::random_hex(16),
        "org_name": who.org,
        "app_name": app,
    });
    if let Some(m) = &machine {
        claims["machine_id"] = json!(m.id);
        claims["machine_name"] = json!(m.name);
        claims["region"] = json!(m.region);
    }
    if req.aws_principal_tags == Some(true) {
        claims["https://aws.amazon.com/tags"] = json!({
            "principal_tags": {
                "app_name": [app],
                "org_name": [who.org],
                "machine_id": [machine_id],
            }
        });
    }
    let key = signing_key(&state.secrets_key().await.map_err(OidcError::Key)?);
    let jwt = sign_jwt(&key, &claims);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], jwt).into_response())
}

/// The public signing keys (JWKS).
#[utoipa::path(get, path = "/oidc/jwks.json", tag = "Tokens", operation_id = "Oidc_jwks",
    security(()),
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub async fn jwks(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let key = signing_key(&state.secrets_key().await.map_err(OidcError::Key)?);
    Ok(Json(jwks_for(&key)))
}

/// The OpenID discovery document of an organisation's issuer.
#[utoipa::path(get, path = "/oidc/{org_slug}/.well-known/openid-configuration", tag = "Tokens",
    operation_id = "Oidc_discovery", security(()),
    params(("org_slug" = String, Path, description = "Organization slug")),
    responses((status = 200, description = "OpenID provider metadata", body = Object),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn discovery(
    State(state): State<ApiState>,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let exists: Option<crate::auth::OrgRecord> =
        crate::auth::read_record(state.store(), &crate::auth::org_key(&org)).await?;
    if exists.is_none() {
        return Err(ApiError::NotFound(format!(
            "organization {org:?} not found"
        )));
    }
    let iss = issuer(&headers, &org);
    Ok(Json(json!({
        "issuer": iss,
        "jwks_uri": format!("{}/v1/oidc/jwks.json", base_url(&headers)),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti",
            "org_name", "app_name", "machine_id", "machine_name", "region"],
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn jwt_verifies_with_the_published_key() {
        let key = signing_key(&[5u8; 32]);
        assert_eq!(key.to_bytes(), signing_key(&[5u8; 32]).to_bytes());
        assert_ne!(key.to_bytes(), signing_key(&[6u8; 32]).to_bytes());
        let jwt = sign_jwt(&key, &json!({"sub": "personal:a:"}));
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwks = jwks_for(&key);
        let x = B64URL
            .decode(jwks["keys"][0]["x"].as_str().unwrap())
            .unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&B64URL.decode(parts[2]).unwrap()).unwrap();
        vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
        assert_eq!(header["alg"], "EdDSA");
    }
}
