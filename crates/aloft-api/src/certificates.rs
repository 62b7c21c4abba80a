//! TLS certificates of an app (`/apps/{app}/certificates…`, Fly's operations and JSON
//! shapes): a hostname is asked for (ACME) or uploaded (custom) here, as a
//! `certs/{hostname}` record; the proxies issue, renew and serve it. One hostname
//! belongs to one app.

use aloft_store::{Expect, StoreError};
use aloft_types::catalog::{
    AppRecord, CERTS_PREFIX, CertRecord, CertSource, CertStatus, SCHEMA_VERSION, app_key, cert_key,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::auth::read_record;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::{JsonBody, QueryPairs};
use crate::util::{now_rfc3339, rfc3339};

/// Fly's `createAcmeCertificateRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateAcmeCertificateRequest {
    pub hostname: String,
}

/// Fly's `createCustomCertificateRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateCustomCertificateRequest {
    pub hostname: String,
    /// PEM chain, leaf first.
    pub fullchain: String,
    /// PEM private key of the leaf.
    pub private_key: String,
}

/// Fly's `CertificateSummary`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateSummary {
    pub hostname: String,
    /// `Ready`, `Awaiting certificates` or `Validation failed`.
    pub status: String,
    pub configured: bool,
    pub acme_requested: bool,
    pub has_custom_certificate: bool,
    pub has_fly_certificate: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// Fly's `listCertificatesResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListCertificatesResponse {
    pub certificates: Vec<CertificateSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    pub total_count: i64,
}

/// Fly's `IssuedCertificate`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedCertificate {
    pub certificate_authority: String,
    pub expires_at: String,
    /// `rsa` or `ecdsa`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Fly's `CertificateEntry`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateEntry {
    /// `fly` (issued by the platform) or `custom`.
    pub source: String,
    /// `active`, `pending_validation` or `pending_ownership`.
    pub status: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub issued: Vec<IssuedCertificate>,
}

/// Fly's `CertificateValidationError`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateValidationError {
    pub code: String,
    pub message: String,
    pub remediation: String,
    pub timestamp: String,
}

/// Fly's `CertificateDetail`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateDetail {
    pub hostname: String,
    pub status: String,
    pub configured: bool,
    pub acme_requested: bool,
    pub certificates: Vec<CertificateEntry>,
    pub validation_errors: Vec<CertificateValidationError>,
}

/// Fly's `DNSRecords` (what the API resolved the hostname to).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DnsRecords {
    pub a: Vec<String>,
    pub aaaa: Vec<String>,
    pub resolved_addresses: Vec<String>,
}

/// Fly's `CertificateCheckResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateCheckResponse {
    pub hostname: String,
    pub status: String,
    pub configured: bool,
    pub acme_requested: bool,
    pub certificates: Vec<CertificateEntry>,
    pub validation_errors: Vec<CertificateValidationError>,
    pub dns_records: DnsRecords,
}

/// Fly's `destroyCustomCertificateResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DestroyCustomCertificateResponse {
    pub hostname: String,
    pub status: String,
    pub configured: bool,
    pub acme_requested: bool,
    pub certificates: Vec<CertificateEntry>,
    pub validation_errors: Vec<CertificateValidationError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the query; the handler reads it through `QueryPairs`
struct ListQuery {
    /// Hostname filter (substring match)
    filter: Option<String>,
    /// Pagination cursor from previous response
    cursor: Option<String>,
    /// Number of results per page (default 25, max 500)
    limit: Option<i64>,
}

/// The `certs/` keys of an app's hostnames, for deleting them with the app.
pub async fn app_keys(state: &ApiState, app: &str) -> Result<Vec<String>, ApiError> {
    let listing = state.store().list(CERTS_PREFIX).await?;
    Ok(listing
        .entries
        .into_iter()
        .filter(|e| serde_json::from_slice::<CertRecord>(&e.value).is_ok_and(|r| r.app == app))
        .map(|e| e.key)
        .collect())
}

/// A DNS name a certificate can be for: lower-case labels of letters, digits and `-`
/// (not at either end), at least two labels, at most 253 bytes; `*.` may lead.
pub fn valid_hostname(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if h.len() > 253 || rest.is_empty() {
        return false;
    }
    let labels: Vec<&str> = rest.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|c| c.is_ascii_digit()))
}

fn normalise_hostname(raw: &str) -> Result<String, ApiError> {
    let h = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    if h.is_empty() {
        return Err(ApiError::Unprocessable(
            "invalid field `hostname`: required".into(),
        ));
    }
    if !valid_hostname(&h) {
        return Err(ApiError::Unprocessable(format!(
            "invalid field `hostname`: {raw:?} is not a DNS name (letters, digits and - in \
             at least two dot-separated labels, optionally starting with *.)"
        )));
    }
    Ok(h)
}

/// The record of `hostname` with its revision, if any.
async fn load(state: &ApiState, hostname: &str) -> Result<Option<(CertRecord, u64)>, ApiError> {
    let key = cert_key(hostname);
    match state.store().get(&key).await? {
        None => Ok(None),
        Some(e) => serde_json::from_slice(&e.value)
            .map(|r| Some((r, e.revision)))
            .map_err(|err| ApiError::Internal(format!("certificate record {key}: {err}"))),
    }
}

/// The record of `hostname` if it belongs to `app`; another app's is reported absent.
async fn load_own(
    state: &ApiState,
    app: &str,
    hostname: &str,
) -> Result<(CertRecord, u64), ApiError> {
    let h = hostname.trim_end_matches('.').to_ascii_lowercase();
    match load(state, &h).await? {
        Some((r, rev)) if r.app == app => Ok((r, rev)),
        _ => Err(ApiError::NotFound(format!(
            "no certificate for hostname {hostname:?} in app {app:?}"
        ))),
    }
}

/// Refuses a hostname held by another (existing) app.
async fn ensure_not_taken(
    state: &ApiState,
    app: &str,
    existing: Option<&CertRecord>,
) -> Result<(), ApiError> {
    if let Some(r) = existing
        && r.app != app
    {
        let other: Option<AppRecord> = read_record(state.store(), &app_key(&r.app))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if other.is_some() {
            return Err(ApiError::Conflict(format!(
                "hostname {:?} already has a certificate in another app",
                r.hostname
            )));
        }
    }
    Ok(())
}

/// Facts read from a PEM leaf.
struct LeafFacts {
    not_after: i64,
    issuer: String,
    kind: String,
    dns_names: Vec<String>,
}

fn leaf_facts(pem: &str) -> Option<LeafFacts> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| cert.issuer().to_string());
    let kind = match cert
        .public_key()
        .algorithm
        .algorithm
        .to_id_string()
        .as_str()
    {
        "1.2.840.113549.1.1.1" => "rsa",
        _ => "ecdsa",
    }
    .to_string();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                dns_names.push(d.to_ascii_lowercase());
            }
        }
    }
    Some(LeafFacts {
        not_after: cert.validity().not_after.timestamp(),
        issuer,
        kind,
        dns_names,
    })
}

/// Does a certificate name (`a.b`, `*.b`) cover `hostname`?
fn name_covers(name: &str, hostname: &str) -> bool {
    if name == hostname {
        return true;
    }
    match (name.strip_prefix("*."), hostname.split_once('.')) {
        (Some(base), Some((_, rest))) => !hostname.starts_with("*.") && base == rest,
        _ => false,
    }
}

fn status_text(r: &CertRecord) -> &'static str {
    match r.status {
        CertStatus::Ready => "Ready",
        CertStatus::Pending | CertStatus::Issuing => "Awaiting certificates",
        CertStatus::Failed => "Validation failed",
    }
}

fn detail(r: &CertRecord) -> CertificateDetail {
    let facts = (!r.cert_pem.is_empty())
        .then(|| leaf_facts(&r.cert_pem))
        .flatten();
    let expires_at = facts
        .as_ref()
        .map(|f| rfc3339(u64::try_from(f.not_after).unwrap_or(0)))
        .or_else(|| r.not_after.clone());
    let entry = CertificateEntry {
        source: if r.source == CertSource::Custom {
            "custom"
        } else {
            "fly"
        }
        .into(),
        status: if r.cert_pem.is_empty() {
            "pending_validation"
        } else {
            "active"
        }
        .into(),
        created_at: r.created_at.clone(),
        expires_at: expires_at.clone(),
        issuer: facts.as_ref().map(|f| f.issuer.clone()),
        issued: facts
            .iter()
            .map(|f| IssuedCertificate {
                certificate_authority: f.issuer.clone(),
                expires_at: expires_at.clone().unwrap_or_default(),
                kind: f.kind.clone(),
            })
            .collect(),
    };
    let validation_errors = r
        .error
        .iter()
        .map(|e| CertificateValidationError {
            code: "acme_failed".into(),
            message: e.clone(),
            remediation: format!(
                "point {}'s A/AAAA records at the proxy (port 80 and 443), then run \
                 `aloft certs check {}`",
                r.hostname, r.hostname
            ),
            timestamp: r.updated_at.clone(),
        })
        .collect();
    CertificateDetail {
        hostname: r.hostname.clone(),
        status: status_text(r).into(),
        configured: !r.cert_pem.is_empty(),
        acme_requested: r.source == CertSource::Acme,
        certificates: vec![entry],
        validation_errors,
    }
}

fn summary(r: &CertRecord) -> CertificateSummary {
    CertificateSummary {
        hostname: r.hostname.clone(),
        status: status_text(r).into(),
        configured: !r.cert_pem.is_empty(),
        acme_requested: r.source == CertSource::Acme,
        has_custom_certificate: r.source == CertSource::Custom,
        has_fly_certificate: r.source != CertSource::Custom && !r.cert_pem.is_empty(),
        created_at: r.created_at.clone(),
        updated_at: r.updated_at.clone(),
    }
}

/// What is left once a hostname's only certificate is removed.
fn removed(hostname: &str) -> CertificateDetail {
    CertificateDetail {
        hostname: hostname.to_string(),
        status: "Not configured".into(),
        configured: false,
        acme_requested: false,
        certificates: Vec::new(),
        validation_errors: Vec::new(),
    }
}

async fn write(state: &ApiState, rec: &CertRecord, expect: Expect) -> Result<(), ApiError> {
    let value = serde_json::to_vec(rec).map_err(|e| ApiError::Internal(e.to_string()))?;
    match state
        .store()
        .put_if(&cert_key(&rec.hostname), value, expect)
        .await
    {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "certificate for {:?} changed meanwhile; try again",
            rec.hostname
        ))),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/apps/{app_name}/certificates", tag = "TLS Certificates", operation_id = "App_Certificates_list",
    params(("app_name" = String, Path, description = "Fly App Name"), ListQuery),
    responses((status = 200, description = "OK", body = ListCertificatesResponse)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> Result<Json<ListCertificatesResponse>, ApiError> {
    let limit = q.u64("limit")?.unwrap_or(25);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "invalid query parameter `limit`: {limit} is not between 1 and 500"
        )));
    }
    let filter = q.get("filter").unwrap_or_default().to_ascii_lowercase();
    let cursor = q.get("cursor").unwrap_or_default().to_string();
    let mut all: Vec<CertRecord> = state
        .store()
        .list(CERTS_PREFIX)
        .await?
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<CertRecord>(&e.value).ok())
        .filter(|r| r.app == app && r.hostname.contains(&filter))
        .collect();
    all.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let total_count = all.len() as i64;
    let page: Vec<&CertRecord> = all
        .iter()
        .filter(|r| cursor.is_empty() || r.hostname.as_str() > cursor.as_str())
        .take(limit as usize + 1)
        .collect();
    let more = page.len() > limit as usize;
    let page = &page[..page.len().min(limit as usize)];
    Ok(Json(ListCertificatesResponse {
        next_cursor: more
            .then(|| page.last().map(|r| r.hostname.clone()))
            .flatten(),
        certificates: page.iter().map(|r| summary(r)).collect(),
        total_count,
    }))
}

#[utoipa::path(post, path = "/apps/{app_name}/certificates/acme", tag = "TLS Certificates", operation_id = "App_Certificates_acme_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateAcmeCertificateRequest, description = "ACME certificate request", content_type = "application/json"),
    responses((status = 201, description = "Created", body = CertificateDetail),
        (status = 409, description = "The hostname belongs to another app", body = ErrorResponse),
        (status = 422, description = "Unprocessable Entity", body = ErrorResponse)))]
pub async fn acme_create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<CreateAcmeCertificateRequest>,
) -> Result<(StatusCode, Json<CertificateDetail>), ApiError> {
    let hostname = normalise_hostname(&req.hostname)?;
    if hostname.starts_with("*.") {
        return Err(ApiError::Unprocessable(format!(
            "{hostname}: wildcard certificates need the dns-01 challenge, which Aloft does \
             not answer; upload a custom certificate instead"
        )));
    }
    let existing = load(&state, &hostname).await?;
    ensure_not_taken(&state, &app, existing.as_ref().map(|(r, _)| r)).await?;
    let expect = match &existing {
        // Asked again: the same request (a failed one is retried by `check`).
        Some((r, _)) if r.app == app && r.source == CertSource::Acme => {
            return Ok((StatusCode::CREATED, Json(detail(r))));
        }
        Some((r, _)) if r.app == app => {
            return Err(ApiError::Conflict(format!(
                "{hostname} has a {} certificate; remove it first",
                if r.source == CertSource::Custom {
                    "custom"
                } else {
                    "local"
                }
            )));
        }
        // A deleted app's leftover.
        Some((_, rev)) => Expect::Revision(*rev),
        None => Expect::Absent,
    };
    let rec = CertRecord::pending_acme(hostname, app, &now_rfc3339());
    write(&state, &rec, expect).await?;
    Ok((StatusCode::CREATED, Json(detail(&rec))))
}

/// Checks an uploaded chain and key: PEM that parses, a key that is the leaf's, a leaf
/// that names `hostname` and has not expired. Returns the leaf's expiry (Unix secs).
fn check_custom(hostname: &str, chain_pem: &str, key_pem: &str) -> Result<i64, ApiError> {
    let bad = |m: String| ApiError::Unprocessable(m);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(format!(
                "invalid field `fullchain`: not PEM certificates ({e})"
            ))
        })?;
    if chain.is_empty() {
        return Err(bad(
            "invalid field `fullchain`: no PEM CERTIFICATE block".into()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        bad(format!(
            "invalid field `private_key`: not a PEM private key ({e})"
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        bad(format!(
            "invalid field `private_key`: it does not match the certificate or is not \
             usable ({e})"
        ))
    })?;
    let facts = leaf_facts(chain_pem).ok_or_else(|| {
        bad("invalid field `fullchain`: the first certificate cannot be parsed".into())
    })?;
    if !facts.dns_names.iter().any(|n| name_covers(n, hostname)) {
        return Err(bad(format!(
            "invalid field `fullchain`: the certificate is for {:?}, not {hostname:?}",
            facts.dns_names
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if facts.not_after <= now {
        return Err(bad(format!(
            "invalid field `fullchain`: the certificate expired at {}",
            rfc3339(u64::try_from(facts.not_after).unwrap_or(0))
        )));
    }
    Ok(facts.not_after)
}

#[utoipa::path(post, path = "/apps/{app_name}/certificates/custom", tag = "TLS Certificates", operation_id = "App_Certificates_custom_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = CreateCustomCertificateRequest, description = "Custom certificate request", content_type = "application/json"),
    responses((status = 201, description = "Created", body = CertificateDetail),
        (status = 409, description = "The hostname belongs to another app", body = ErrorResponse),
        (status = 422, description = "Unprocessable Entity", body = ErrorResponse)))]
pub async fn custom_create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<CreateCustomCertificateRequest>,
) -> Result<(StatusCode, Json<CertificateDetail>), ApiError> {
    let hostname = normalise_hostname(&req.hostname)?;
    let not_after = check_custom(&hostname, &req.fullchain, &req.private_key)?;
    let existing = load(&state, &hostname).await?;
    ensure_not_taken(&state, &app, existing.as_ref().map(|(r, _)| r)).await?;
    let now = now_rfc3339();
    let created_at = existing
        .as_ref()
        .filter(|(r, _)| r.app == app)
        .map_or_else(|| now.clone(), |(r, _)| r.created_at.clone());
    let rec = CertRecord {
        schema: SCHEMA_VERSION,
        hostname,
        app,
        source: CertSource::Custom,
        status: CertStatus::Ready,
        cert_pem: req.fullchain,
        key_pem: req.private_key,
        not_after: Some(rfc3339(u64::try_from(not_after).unwrap_or(0))),
        error: None,
        created_at,
        updated_at: now,
    };
    let expect = existing.map_or(Expect::Absent, |(_, rev)| Expect::Revision(rev));
    write(&state, &rec, expect).await?;
    Ok((StatusCode::CREATED, Json(detail(&rec))))
}

#[utoipa::path(get, path = "/apps/{app_name}/certificates/{hostname}", tag = "TLS Certificates", operation_id = "App_Certificates_show",
    params(("app_name" = String, Path, description = "Fly App Name"), ("hostname" = String, Path, description = "Certificate Hostname")),
    responses((status = 200, description = "OK", body = CertificateDetail),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn show(
    State(state): State<ApiState>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<CertificateDetail>, ApiError> {
    let (r, _) = load_own(&state, &app, &hostname).await?;
    Ok(Json(detail(&r)))
}

async fn remove(state: &ApiState, r: &CertRecord, rev: u64) -> Result<(), ApiError> {
    match state
        .store()
        .delete(&cert_key(&r.hostname), Expect::Revision(rev))
        .await
    {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "certificate for {:?} changed meanwhile; try again",
            r.hostname
        ))),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/apps/{app_name}/certificates/{hostname}", tag = "TLS Certificates", operation_id = "App_Certificates_delete",
    params(("app_name" = String, Path, description = "Fly App Name"), ("hostname" = String, Path, description = "Certificate Hostname")),
    responses((status = 204, description = "No Content"),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn delete(
    State(state): State<ApiState>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (r, rev) = load_own(&state, &app, &hostname).await?;
    remove(&state, &r, rev).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/apps/{app_name}/certificates/{hostname}/acme", tag = "TLS Certificates", operation_id = "App_Certificates_acme_delete",
    params(("app_name" = String, Path, description = "Fly App Name"), ("hostname" = String, Path, description = "Certificate Hostname")),
    responses((status = 200, description = "OK", body = CertificateDetail),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn acme_delete(
    State(state): State<ApiState>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<CertificateDetail>, ApiError> {
    let (r, rev) = load_own(&state, &app, &hostname).await?;
    if r.source != CertSource::Acme {
        return Err(ApiError::NotFound(format!(
            "{} has no ACME certificate (it has a custom one)",
            r.hostname
        )));
    }
    remove(&state, &r, rev).await?;
    Ok(Json(removed(&r.hostname)))
}

#[utoipa::path(delete, path = "/apps/{app_name}/certificates/{hostname}/custom", tag = "TLS Certificates", operation_id = "App_Certificates_custom_delete",
    params(("app_name" = String, Path, description = "Fly App Name"), ("hostname" = String, Path, description = "Certificate Hostname")),
    responses((status = 200, description = "OK", body = DestroyCustomCertificateResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn custom_delete(
    State(state): State<ApiState>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<DestroyCustomCertificateResponse>, ApiError> {
    let (r, rev) = load_own(&state, &app, &hostname).await?;
    if r.source != CertSource::Custom {
        return Err(ApiError::NotFound(format!(
            "{} has no custom certificate",
            r.hostname
        )));
    }
    remove(&state, &r, rev).await?;
    let d = removed(&r.hostname);
    Ok(Json(DestroyCustomCertificateResponse {
        hostname: d.hostname,
        status: d.status,
        configured: d.configured,
        acme_requested: d.acme_requested,
        certificates: d.certificates,
        validation_errors: d.validation_errors,
        warning: Some(format!(
            "{} has no certificate now; request one with `aloft certs add {}`",
            r.hostname, r.hostname
        )),
    }))
}

/// Resolves `hostname` (bounded in time); failures are an empty answer.
async fn resolve(hostname: &str) -> DnsRecords {
    let lookup = tokio::net::lookup_host((hostname, 443));
    let addrs = match tokio::time::timeout(std::time::Duration::from_secs(3), lookup).await {
        Ok(Ok(it)) => it.map(|a| a.ip()).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let mut out = DnsRecords::default();
    for ip in addrs {
        let s = ip.to_string();
        if ip.is_ipv4() {
            out.a.push(s.clone());
        } else {
            out.aaaa.push(s.clone());
        }
        if !out.resolved_addresses.contains(&s) {
            out.resolved_addresses.push(s);
        }
    }
    out
}

/// Resolves the hostname and, when the last ACME issuance failed, asks for a new one.
#[utoipa::path(post, path = "/apps/{app_name}/certificates/{hostname}/check", tag = "TLS Certificates", operation_id = "App_Certificates_check",
    params(("app_name" = String, Path, description = "Fly App Name"), ("hostname" = String, Path, description = "Certificate Hostname")),
    responses((status = 200, description = "OK", body = CertificateCheckResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn check(
    State(state): State<ApiState>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<CertificateCheckResponse>, ApiError> {
    let (mut r, rev) = load_own(&state, &app, &hostname).await?;
    if r.source == CertSource::Acme && r.status == CertStatus::Failed {
        r.status = CertStatus::Pending;
        r.error = None;
        r.updated_at = now_rfc3339();
        write(&state, &r, Expect::Revision(rev)).await?;
    }
    let dns_records = resolve(&r.hostname).await;
    let d = detail(&r);
    Ok(Json(CertificateCheckResponse {
        hostname: d.hostname,
        status: d.status,
        configured: d.configured,
        acme_requested: d.acme_requested,
        certificates: d.certificates,
        validation_errors: d.validation_errors,
        dns_records,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in [
            "a.example.com",
            "*.example.com",
            "x-1.b2.io",
            "app.aloft.localhost",
        ] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in [
            "", "com", "a..b", "-a.com", "a-.com", "A.com", "a b.com", "*.com", "a.*.com",
            "1.2.3.4", "a_b.com", "*.", "a.com/x",
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(name_covers("a.example.com", "a.example.com"));
    }
}
