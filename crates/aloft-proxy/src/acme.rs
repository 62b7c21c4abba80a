//! ACME certificates: the worker that turns `certs/{hostname}` requests (source
//! `acme`, status `pending`) into issued certificates, renews them before they expire,
//! and the HTTP-01 responder every proxy runs.
//!
//! Any number of proxies run the worker; one of them works on a hostname at a time. A
//! proxy claims a record by moving it `pending → issuing` with a compare-and-set on its
//! revision; a claim whose `updated_at` is older than [`AcmeConfig::stale_after`] (its
//! proxy died) may be taken over the same way. Challenges are written to
//! `acme/challenges/{token}`, so whichever proxy the CA reaches answers them (HTTP-01
//! here, TLS-ALPN-01 in the TLS acceptor), and are deleted when the order ends. The
//! account is created once and kept at `acme/account`.
//!
//! Safe to run again after a crash: a claim left `issuing` is taken over once stale,
//! and a new order is created (the CA reuses valid authorizations).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_store::{Expect, Store, StoreError};
use aloft_types::catalog::{
    ACME_ACCOUNT_KEY, ACME_CHALLENGES_PREFIX, AcmeChallengeKind, AcmeChallengeRecord, CERTS_PREFIX,
    CertRecord, CertSource, CertStatus, SCHEMA_VERSION, acme_challenge_key, app_key, cert_key,
};
use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Response, StatusCode, header};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::body::RespBody;

/// The path prefix of HTTP-01 challenge requests.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Which challenge the worker answers when the CA offers both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChallengePreference {
    /// `http-01`: needs the proxy on port 80 of the hostname.
    #[default]
    Http01,
    /// `tls-alpn-01`: needs the proxy's TLS listener on port 443 of the hostname.
    TlsAlpn01,
}

impl std::str::FromStr for ChallengePreference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http-01" | "http01" => Ok(Self::Http01),
            "tls-alpn-01" | "tlsalpn01" => Ok(Self::TlsAlpn01),
            other => Err(format!("{other:?}: use http-01 or tls-alpn-01")),
        }
    }
}

/// How the ACME worker talks to its CA.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The directory URL (e.g. Let's Encrypt's, or pebble's `https://127.0.0.1:14000/dir`).
    pub directory_url: String,
    /// `mailto:` contact of the account (optional).
    pub contact_email: Option<String>,
    /// A PEM root CA to trust for the directory instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub prefer: ChallengePreference,
    /// A claim not updated for this long belongs to a dead proxy and is taken over.
    pub stale_after: Duration,
    /// Longest wait for the CA to validate an order, and then to issue it.
    pub order_timeout: Duration,
    /// Longest delay between two polls of an order.
    pub max_poll_delay: Duration,
    /// How often every record is re-examined for renewal (besides on every change).
    pub rescan_every: Duration,
    /// How long a failed renewal of a still-valid certificate waits before the next try.
    pub renew_retry: Duration,
    /// Orders one proxy works on at once (more wait, unclaimed, for a turn).
    pub max_concurrent: usize,
}

impl AcmeConfig {
    pub fn new(directory_url: impl Into<String>) -> Self {
        AcmeConfig {
            directory_url: directory_url.into(),
            contact_email: None,
            ca_file: None,
            prefer: ChallengePreference::default(),
            stale_after: Duration::from_secs(600),
            order_timeout: Duration::from_secs(120),
            max_poll_delay: Duration::from_secs(5),
            // Renewals need no hurry; a catalog whose watch misses other processes'
            // writes (SQLite shared by separate daemons) is caught up within a minute.
            rescan_every: Duration::from_secs(60),
            renew_retry: Duration::from_secs(3600),
            max_concurrent: 4,
        }
    }
}

/// Why one issuance failed; the message is stored in the record's `error`.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("catalog {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: StoreError,
    },
    #[error("ACME account at {directory}: {source}")]
    Account {
        directory: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME account record {key} is not valid JSON: {source}")]
    AccountRecord {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("ACME {step} for {hostname}: {source}")]
    Acme {
        hostname: String,
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    #[error("{hostname}: wildcard certificates need dns-01, which Aloft does not answer")]
    Wildcard { hostname: String },
    #[error("{hostname}: the CA offers neither http-01 nor tls-alpn-01")]
    NoChallenge { hostname: String },
    #[error("validation of {hostname} failed: {reason}")]
    Invalid { hostname: String, reason: String },
    #[error("{hostname}: the CA did not finish the order within {secs}s (last status {status})")]
    Timeout {
        hostname: String,
        secs: u64,
        status: String,
    },
    #[error("{hostname}: building a key or CSR: {source}")]
    Crypto {
        hostname: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{hostname}: the CA returned a certificate that cannot be read: {reason}")]
    BadCertificate { hostname: String, reason: String },
}

fn store_err(key: &str) -> impl FnOnce(StoreError) -> IssueError + '_ {
    move |source| IssueError::Store {
        key: key.to_string(),
        source,
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// The challenges every proxy answers, kept equal to `acme/challenges/` by
/// [`Challenges::follow`]. Cheap to read on the request path.
pub struct Challenges {
    store: Arc<dyn Store>,
    map: ArcSwap<HashMap<String, AcmeChallengeRecord>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("pending", &self.map.load().len())
            .finish()
    }
}

/// Tokens are base64url (RFC 8555 §8.3: at least 128 bits of entropy).
fn plausible_token(t: &str) -> bool {
    (16..=128).contains(&t.len())
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

impl Challenges {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Challenges {
            store,
            map: ArcSwap::from_pointee(HashMap::new()),
        })
    }

    /// The challenge of `token`: from the followed set, else (the watch may lag a
    /// challenge written a moment ago) from the store itself.
    pub async fn get(&self, token: &str) -> Option<AcmeChallengeRecord> {
        if let Some(c) = self.map.load().get(token) {
            return Some(c.clone());
        }
        if !plausible_token(token) {
            return None;
        }
        let e = self.store.get(&acme_challenge_key(token)).await.ok()??;
        serde_json::from_slice(&e.value).ok()
    }

    /// The tls-alpn-01 challenge for SNI `hostname`, if one is pending.
    pub fn tls_alpn_for(&self, hostname: &str) -> Option<AcmeChallengeRecord> {
        self.map
            .load()
            .values()
            .find(|c| {
                c.kind == AcmeChallengeKind::TlsAlpn01 && c.hostname.eq_ignore_ascii_case(hostname)
            })
            .cloned()
    }

    /// Whether `token` is in the followed set (not asking the store).
    pub fn has(&self, token: &str) -> bool {
        self.map.load().contains_key(token)
    }

    async fn reload(&self) -> Result<u64, StoreError> {
        let l = self.store.list(ACME_CHALLENGES_PREFIX).await?;
        let map = l
            .entries
            .iter()
            .filter_map(|e| serde_json::from_slice::<AcmeChallengeRecord>(&e.value).ok())
            .map(|c| (c.token.clone(), c))
            .collect();
        self.map.store(Arc::new(map));
        Ok(l.revision)
    }

    /// Keeps the set equal to `acme/challenges/` until the task is dropped.
    pub async fn follow(self: Arc<Self>) {
        loop {
            let revision = match self.reload().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("acme: challenge read failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Ok(mut watch) = self.store.watch(ACME_CHALLENGES_PREFIX, revision).await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            while let Some(Ok(change)) = watch.next().await {
                let Some(token) = change.key.strip_prefix(ACME_CHALLENGES_PREFIX) else {
                    continue;
                };
                let mut map = HashMap::clone(&self.map.load());
                match change
                    .value
                    .and_then(|v| serde_json::from_slice::<AcmeChallengeRecord>(&v).ok())
                {
                    Some(c) => map.insert(token.to_string(), c),
                    None => map.remove(token),
                };
                self.map.store(Arc::new(map));
            }
        }
    }
}

/// The answer to `GET /.well-known/acme-challenge/{token}` (HTTP-01), or `None` when
/// `method`/`path` is not such a request (it is then routed as usual). An unknown
/// token gets 404.
pub async fn http01_answer(
    challenges: &Challenges,
    method: &Method,
    path: &str,
) -> Option<Response<RespBody>> {
    let token = path.strip_prefix(HTTP01_PREFIX)?;
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let found = challenges
        .get(token)
        .await
        .filter(|c| c.kind == AcmeChallengeKind::Http01);
    let (status, text) = match found {
        Some(c) => (StatusCode::OK, c.key_authorization),
        None => (
            StatusCode::NOT_FOUND,
            "no such ACME challenge\n".to_string(),
        ),
    };
    let mut resp = Response::new(RespBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Some(resp)
}

/// `acme/account`: the account's credentials for one directory.
#[derive(Serialize, Deserialize)]
struct AccountRecord {
    schema: u32,
    directory_url: String,
    credentials: AccountCredentials,
}

/// What the worker should do with a record.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    No,
    Issue,
    Renew,
    TakeOver,
}

/// Is the record due for (re)issuance at `now`?
fn due(rec: &CertRecord, now: OffsetDateTime, cfg: &AcmeConfig) -> Due {
    if rec.source != CertSource::Acme {
        return Due::No;
    }
    let updated = rec.updated_at.as_str();
    let age = parse_time(updated).map(|t| now - t);
    match rec.status {
        CertStatus::Pending => Due::Issue,
        CertStatus::Failed => Due::No,
        CertStatus::Issuing => {
            let stale = age.is_none_or(|a| a.unsigned_abs() >= cfg.stale_after);
            if stale { Due::TakeOver } else { Due::No }
        }
        CertStatus::Ready => {
            let Some(not_after) = rec.not_after.as_deref().and_then(parse_time) else {
                return Due::Renew;
            };
            if renewal_window_open(&rec.cert_pem, not_after, now) {
                // A failed renewal of a still-served certificate waits before retrying.
                let retry_ok =
                    rec.error.is_none() || age.is_none_or(|a| a.unsigned_abs() >= cfg.renew_retry);
                if retry_ok { Due::Renew } else { Due::No }
            } else {
                Due::No
            }
        }
    }
}

/// Renew within 30 days of expiry, or in the last third of the lifetime.
fn renewal_window_open(cert_pem: &str, not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
    let left = not_after - now;
    if left <= time::Duration::days(30) {
        // Short-lived certificates (e.g. pebble's or 6-day ones) use the 1/3 rule.
        match leaf_validity(cert_pem) {
            Some((nb, na))
                if na - nb <= time::Duration::days(90) && na - nb > time::Duration::ZERO =>
            {
                left <= (na - nb) / 3
            }
            _ => true,
        }
    } else {
        false
    }
}

/// (not_before, not_after) of the first certificate of a PEM chain.
pub fn leaf_validity(cert_pem: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// The ACME worker of one proxy.
pub struct AcmeWorker {
    store: Arc<dyn Store>,
    cfg: AcmeConfig,
    challenges: Option<Arc<Challenges>>,
    tls: Option<Arc<crate::tls::Certs>>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// Hostnames this worker is issuing (or waiting to) now.
    busy: Mutex<HashSet<String>>,
    /// Turns to issue, [`AcmeConfig::max_concurrent`] of them.
    turns: Arc<tokio::sync::Semaphore>,
}

impl AcmeWorker {
    /// A worker over the catalog. `challenges` (HTTP-01) and `tls` (TLS-ALPN-01) are
    /// this proxy's followed sets, if it runs them: a challenge is made ready only once
    /// this proxy can answer it.
    pub fn new(
        store: Arc<dyn Store>,
        cfg: AcmeConfig,
        challenges: Option<Arc<Challenges>>,
        tls: Option<Arc<crate::tls::Certs>>,
    ) -> Arc<Self> {
        let cfg_turns = cfg.max_concurrent.max(1);
        Arc::new(AcmeWorker {
            store,
            cfg,
            challenges,
            tls,
            account: tokio::sync::Mutex::new(None),
            busy: Mutex::new(HashSet::new()),
            turns: Arc::new(tokio::sync::Semaphore::new(cfg_turns)),
        })
    }

    /// Works until `shutdown` completes: examines every record, then again on each
    /// change under `certs/` and every [`AcmeConfig::rescan_every`].
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        // The HTTP client picks the process-wide rustls provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::pin!(shutdown);
        loop {
            let revision = match self.scan().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("acme: reading certs failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = &mut shutdown => return,
                    }
                }
            };
            let mut watch = match self.store.watch(CERTS_PREFIX, revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("acme: watching certs failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = &mut shutdown => return,
                    }
                }
            };
            let rescan = tokio::time::sleep(self.cfg.rescan_every);
            tokio::pin!(rescan);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = &mut rescan => break,
                    c = watch.next() => match c {
                        Some(Ok(c)) => {
                            if let Some(rec) = c
                                .value
                                .and_then(|v| serde_json::from_slice::<CertRecord>(&v).ok())
                            {
                                self.consider(rec, c.revision);
                            }
                        }
                        _ => break,
                    },
                }
            }
        }
    }

    /// Examines every record; returns the revision of the listing.
    async fn scan(self: &Arc<Self>) -> Result<u64, StoreError> {
        let l = self.store.list(CERTS_PREFIX).await?;
        for e in l.entries {
            if let Ok(rec) = serde_json::from_slice::<CertRecord>(&e.value) {
                self.consider(rec, e.revision);
            }
        }
        Ok(l.revision)
    }

    /// Starts issuing `rec` in its own task if it is due and not already ours.
    fn consider(self: &Arc<Self>, rec: CertRecord, revision: u64) {
        let d = due(&rec, OffsetDateTime::now_utc(), &self.cfg);
        if d == Due::No {
            return;
        }
        {
            let Ok(mut busy) = self.busy.lock() else {
                return;
            };
            if !busy.insert(rec.hostname.clone()) {
                return;
            }
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let host = rec.hostname.clone();
            // Claimed only once it is this record's turn: a claim is never left waiting.
            if let Ok(_turn) = Arc::clone(&me.turns).acquire_owned().await {
                me.claim_and_issue(rec, revision, d).await;
            }
            if let Ok(mut busy) = me.busy.lock() {
                busy.remove(&host);
            }
        });
    }

    async fn claim_and_issue(&self, mut rec: CertRecord, mut revision: u64, mut d: Due) {
        let key = cert_key(&rec.hostname);
        // A deleted app's leftover record is not issued or renewed.
        match self.store.get(&app_key(&rec.app)).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!(hostname = %rec.hostname, app = %rec.app, "acme: app is gone; skipped");
                return;
            }
            Err(e) => {
                tracing::warn!(hostname = %rec.hostname, "acme: reading app {}: {e}", rec.app);
                return;
            }
        }
        // The claim: only one proxy moves this revision on. A record changed since it
        // was seen is looked at again (another proxy's fresh claim is then not due).
        let claimed = loop {
            rec.status = CertStatus::Issuing;
            rec.updated_at = now_rfc3339();
            let Ok(value) = serde_json::to_vec(&rec) else {
                return;
            };
            match self
                .store
                .put_if(&key, value, Expect::Revision(revision))
                .await
            {
                Ok(r) => break r,
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(hostname = %rec.hostname, "acme: claim failed: {e}");
                    return;
                }
            }
            let Ok(Some(e)) = self.store.get(&key).await else {
                return;
            };
            let Ok(now) = serde_json::from_slice::<CertRecord>(&e.value) else {
                return;
            };
            d = due(&now, OffsetDateTime::now_utc(), &self.cfg);
            if d == Due::No {
                return;
            }
            (rec, revision) = (now, e.revision);
        };
        tracing::info!(hostname = %rec.hostname, reason = ?d, "acme: issuing");
        let budget = self.cfg.stale_after / 2;
        let mut tokens = Vec::new();
        let result =
            match tokio::time::timeout(budget, self.issue(&rec.hostname, &mut tokens)).await {
                Ok(r) => r,
                Err(_) => Err(IssueError::Timeout {
                    hostname: rec.hostname.clone(),
                    secs: budget.as_secs(),
                    status: "issuing".into(),
                }),
            };
        for t in &tokens {
            if let Err(e) = self.store.delete(&acme_challenge_key(t), Expect::Any).await {
                tracing::warn!(token = %t, "acme: challenge not removed: {e}");
            }
        }
        rec.updated_at = now_rfc3339();
        match result {
            Ok(issued) => {
                tracing::info!(hostname = %rec.hostname, not_after = %issued.not_after, "acme: issued");
                rec.status = CertStatus::Ready;
                rec.cert_pem = issued.chain_pem;
                rec.key_pem = issued.key_pem;
                rec.not_after = Some(issued.not_after);
                rec.error = None;
            }
            Err(e) => {
                tracing::warn!(hostname = %rec.hostname, "acme: {e}");
                // A renewal that failed keeps serving the certificate it has.
                rec.status = if rec.cert_pem.is_empty() {
                    CertStatus::Failed
                } else {
                    CertStatus::Ready
                };
                rec.error = Some(e.to_string());
            }
        }
        let Ok(value) = serde_json::to_vec(&rec) else {
            return;
        };
        // Removed or asked again meanwhile: the user's change wins.
        match self
            .store
            .put_if(&key, value, Expect::Revision(claimed))
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                tracing::info!(hostname = %rec.hostname, "acme: record changed while issuing; result dropped")
            }
            Err(e) => tracing::warn!(hostname = %rec.hostname, "acme: result not stored: {e}"),
        }
    }

    /// The account: cached, else from `acme/account`, else created and stored there.
    async fn account(&self) -> Result<Account, IssueError> {
        let mut cached = self.account.lock().await;
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let dir = self.cfg.directory_url.clone();
        let acct_err = |source| IssueError::Account {
            directory: dir.clone(),
            source,
        };
        let builder = || match &self.cfg.ca_file {
            Some(p) => Account::builder_with_root(p),
            None => Account::builder(),
        };
        let existing = self
            .store
            .get(ACME_ACCOUNT_KEY)
            .await
            .map_err(store_err(ACME_ACCOUNT_KEY))?;
        let expect = match &existing {
            Some(e) => {
                let rec: AccountRecord = serde_json::from_slice(&e.value).map_err(|source| {
                    IssueError::AccountRecord {
                        key: ACME_ACCOUNT_KEY.into(),
                        source,
                    }
                })?;
                if rec.directory_url == dir {
                    let a = builder()
                        .map_err(acct_err)?
                        .from_credentials(rec.credentials)
                        .await
                        .map_err(acct_err)?;
                    *cached = Some(a.clone());
                    return Ok(a);
                }
                Expect::Revision(e.revision)
            }
            None => Expect::Absent,
        };
        let contact = self
            .cfg
            .contact_email
            .as_ref()
            .map(|m| format!("mailto:{}", m.trim_start_matches("mailto:")));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .map_err(acct_err)?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                dir.clone(),
                None,
            )
            .await
            .map_err(acct_err)?;
        let rec = AccountRecord {
            schema: SCHEMA_VERSION,
            directory_url: dir.clone(),
            credentials,
        };
        let value = serde_json::to_vec(&rec).map_err(|source| IssueError::AccountRecord {
            key: ACME_ACCOUNT_KEY.into(),
            source,
        })?;
        match self.store.put_if(ACME_ACCOUNT_KEY, value, expect).await {
            Ok(_) => {
                *cached = Some(account.clone());
                Ok(account)
            }
            // Another proxy stored one first: use that one.
            Err(StoreError::Conflict { .. }) => {
                drop(cached);
                Box::pin(self.account()).await
            }
            Err(e) => Err(store_err(ACME_ACCOUNT_KEY)(e)),
        }
    }

    /// One order for `hostname`, from creation to the certificate. Tokens of the
    /// challenges written are pushed to `tokens` (the caller removes them).
    async fn issue(&self, hostname: &str, tokens: &mut Vec<String>) -> Result<Issued, IssueError> {
        if hostname.starts_with("*.") {
            return Err(IssueError::Wildcard {
                hostname: hostname.into(),
            });
        }
        let acme = |step: &'static str| {
            move |source| IssueError::Acme {
                hostname: hostname.to_string(),
                step,
                source,
            }
        };
        let account = self.account().await?;
        let ids = [Identifier::Dns(hostname.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(acme("new order"))?;

        let mut authorizations = order.authorizations();
        while let Some(a) = authorizations.next().await {
            let mut authz = a.map_err(acme("authorization"))?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let (first, second) = match self.cfg.prefer {
                ChallengePreference::Http01 => (ChallengeType::Http01, ChallengeType::TlsAlpn01),
                ChallengePreference::TlsAlpn01 => (ChallengeType::TlsAlpn01, ChallengeType::Http01),
            };
            let kind = if offered.contains(&first) {
                first
            } else if offered.contains(&second) {
                second
            } else {
                return Err(IssueError::NoChallenge {
                    hostname: hostname.into(),
                });
            };
            let mut ch = authz
                .challenge(kind.clone())
                .ok_or_else(|| IssueError::NoChallenge {
                    hostname: hostname.into(),
                })?;
            let key_auth = ch.key_authorization();
            let token = ch.token.clone();
            let mut rec = AcmeChallengeRecord {
                schema: SCHEMA_VERSION,
                hostname: hostname.to_string(),
                kind: AcmeChallengeKind::Http01,
                token: token.clone(),
                key_authorization: key_auth.as_str().to_string(),
                cert_pem: String::new(),
                key_pem: String::new(),
            };
            if kind == ChallengeType::TlsAlpn01 {
                let (cert_pem, key_pem) = tls_alpn01_cert(hostname, key_auth.digest().as_ref())?;
                rec.kind = AcmeChallengeKind::TlsAlpn01;
                rec.cert_pem = cert_pem;
                rec.key_pem = key_pem;
            }
            let key = acme_challenge_key(&token);
            let value = serde_json::to_vec(&rec).map_err(|source| IssueError::AccountRecord {
                key: key.clone(),
                source,
            })?;
            self.store.put(&key, value).await.map_err(store_err(&key))?;
            tokens.push(token.clone());
            self.wait_answerable(&rec).await;
            ch.set_ready().await.map_err(acme("challenge ready"))?;
        }

        // Validation: poll with a bounded backoff.
        let status = self
            .poll(&mut order, hostname, |s| {
                matches!(
                    s,
                    OrderStatus::Ready | OrderStatus::Invalid | OrderStatus::Valid
                )
            })
            .await?;
        if status == OrderStatus::Invalid {
            return Err(IssueError::Invalid {
                hostname: hostname.into(),
                reason: invalid_reason(&mut order).await,
            });
        }

        let key_pair = rcgen::KeyPair::generate().map_err(|source| IssueError::Crypto {
            hostname: hostname.into(),
            source,
        })?;
        if status == OrderStatus::Ready {
            let mut params =
                rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(|source| {
                    IssueError::Crypto {
                        hostname: hostname.into(),
                        source,
                    }
                })?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            let csr = params
                .serialize_request(&key_pair)
                .map_err(|source| IssueError::Crypto {
                    hostname: hostname.into(),
                    source,
                })?;
            order
                .finalize_csr(csr.der())
                .await
                .map_err(acme("finalize"))?;
        }
        let status = self
            .poll(&mut order, hostname, |s| {
                matches!(s, OrderStatus::Valid | OrderStatus::Invalid)
            })
            .await?;
        if status != OrderStatus::Valid {
            return Err(IssueError::Invalid {
                hostname: hostname.into(),
                reason: invalid_reason(&mut order).await,
            });
        }
        let chain_pem = order
            .certificate()
            .await
            .map_err(acme("certificate download"))?
            .ok_or_else(|| IssueError::BadCertificate {
                hostname: hostname.into(),
                reason: "the order is valid but has no certificate".into(),
            })?;
        let (_, not_after) =
            leaf_validity(&chain_pem).ok_or_else(|| IssueError::BadCertificate {
                hostname: hostname.into(),
                reason: "no parsable leaf certificate in the chain".into(),
            })?;
        Ok(Issued {
            chain_pem,
            key_pem: key_pair.serialize_pem(),
            not_after: not_after.format(&Rfc3339).unwrap_or_default(),
        })
    }

    /// Waits (briefly) until this proxy's followed set holds `token`, so that the CA's
    /// first request finds it.
    async fn wait_answerable(&self, c: &AcmeChallengeRecord) {
        let answerable = || match c.kind {
            AcmeChallengeKind::Http01 => self.challenges.as_ref().is_none_or(|ch| ch.has(&c.token)),
            AcmeChallengeKind::TlsAlpn01 => self
                .tls
                .as_ref()
                .is_none_or(|t| t.has_challenge(&c.hostname)),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut delay = Duration::from_millis(1);
        while !answerable() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Refreshes the order until `done(status)`, doubling the delay up to
    /// `max_poll_delay`, for at most `order_timeout`.
    async fn poll(
        &self,
        order: &mut instant_acme::Order,
        hostname: &str,
        done: impl Fn(OrderStatus) -> bool,
    ) -> Result<OrderStatus, IssueError> {
        let deadline = tokio::time::Instant::now() + self.cfg.order_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let state = order.refresh().await.map_err(|source| IssueError::Acme {
                hostname: hostname.into(),
                step: "order poll",
                source,
            })?;
            let status = state.status;
            if done(status) {
                return Ok(status);
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(IssueError::Timeout {
                    hostname: hostname.into(),
                    secs: self.cfg.order_timeout.as_secs(),
                    status: format!("{status:?}"),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.cfg.max_poll_delay);
        }
    }
}

/// Runs ACME for one proxy until the process ends: follows the challenges (returned,
/// for [`crate::ProxyConfig::acme_challenges`]) and runs the worker. `tls` is the
/// proxy's certificate set when it has a TLS listener (TLS-ALPN-01 answers come from it).
pub fn start(
    store: Arc<dyn Store>,
    cfg: AcmeConfig,
    tls: Option<Arc<crate::tls::Certs>>,
) -> Arc<Challenges> {
    let challenges = Challenges::new(Arc::clone(&store));
    tokio::spawn(Arc::clone(&challenges).follow());
    let worker = AcmeWorker::new(store, cfg, Some(Arc::clone(&challenges)), tls);
    tokio::spawn(worker.run(std::future::pending()));
    challenges
}

/// What one order produced.
struct Issued {
    chain_pem: String,
    key_pem: String,
    not_after: String,
}

/// The reason an order became invalid: the order's error, else its challenges' errors.
async fn invalid_reason(order: &mut instant_acme::Order) -> String {
    if let Some(e) = &order.state().error {
        return e.to_string();
    }
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut a)) = authorizations.next().await {
        let state = match a.refresh().await {
            Ok(s) => s,
            Err(e) => {
                reasons.push(e.to_string());
                continue;
            }
        };
        for c in &state.challenges {
            if let Some(e) = &c.error {
                reasons.push(format!("{:?}: {e}", c.r#type));
            }
        }
    }
    if reasons.is_empty() {
        "the CA marked the order invalid without saying why".into()
    } else {
        reasons.join("; ")
    }
}

/// The self-signed tls-alpn-01 certificate (RFC 8737): SAN `hostname` and the critical
/// id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31) extension holding SHA-256 of the key
/// authorization. Returns (cert PEM, key PEM).
pub fn tls_alpn01_cert(hostname: &str, digest: &[u8]) -> Result<(String, String), IssueError> {
    let crypto = |source| IssueError::Crypto {
        hostname: hostname.into(),
        source,
    };
    if digest.len() != 32 {
        return Err(IssueError::BadCertificate {
            hostname: hostname.into(),
            reason: format!("key authorization digest of {} bytes", digest.len()),
        });
    }
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(crypto)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(crypto)?;
    let cert = params.self_signed(&key).map_err(crypto)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: CertStatus, updated_at: &str) -> CertRecord {
        CertRecord {
            status,
            ..CertRecord::pending_acme("a.example.com", "a", updated_at)
        }
    }

    #[test]
    fn due_decisions() {
        let cfg = AcmeConfig::new("https://ca/dir");
        let now = OffsetDateTime::now_utc();
        let fresh = now.format(&Rfc3339).unwrap();
        let old = (now - time::Duration::hours(1)).format(&Rfc3339).unwrap();
        assert_eq!(
            due(&rec(CertStatus::Pending, &fresh), now, &cfg),
            Due::Issue
        );
        assert_eq!(due(&rec(CertStatus::Issuing, &fresh), now, &cfg), Due::No);
        assert_eq!(
            due(&rec(CertStatus::Issuing, &old), now, &cfg),
            Due::TakeOver
        );
        assert_eq!(due(&rec(CertStatus::Failed, &old), now, &cfg), Due::No);
        let mut custom = rec(CertStatus::Pending, &fresh);
        custom.source = CertSource::Custom;
        assert_eq!(due(&custom, now, &cfg), Due::No);

        // A 90-day certificate: renewed 30 days before expiry, not 31.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example.com".into()]).unwrap();
        p.not_before = now - time::Duration::days(59);
        p.not_after = now + time::Duration::days(31);
        let mut r = rec(CertStatus::Ready, &old);
        r.cert_pem = p.self_signed(&key).unwrap().pem();
        r.not_after = Some(p.not_after.format(&Rfc3339).unwrap());
        assert_eq!(due(&r, now, &cfg), Due::No);
        assert_eq!(
            due(&r, now + time::Duration::days(2), &cfg),
            Due::Renew,
            "inside 30 days of expiry"
        );
        // A failed renewal waits `renew_retry` before the next try.
        r.error = Some("boom".into());
        let later = now + time::Duration::days(2);
        r.updated_at = later.format(&Rfc3339).unwrap();
        assert_eq!(due(&r, later, &cfg), Due::No);
        assert_eq!(due(&r, later + time::Duration::hours(2), &cfg), Due::Renew);

        // A 6-day certificate: renewed in its last third only.
        let mut p = rcgen::CertificateParams::new(vec!["a.example.com".into()]).unwrap();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(5);
        let mut r = rec(CertStatus::Ready, &old);
        r.cert_pem = p.self_signed(&key).unwrap().pem();
        r.not_after = Some(p.not_after.format(&Rfc3339).unwrap());
        assert_eq!(due(&r, now, &cfg), Due::No);
        assert_eq!(due(&r, now + time::Duration::days(4), &cfg), Due::Renew);
    }

    #[test]
    fn tls_alpn_cert_carries_critical_acme_identifier() {
        let digest = [7u8; 32];
        let (pem, key) = tls_alpn01_cert("a.example.com", &digest).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid == oid)
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // DER OCTET STRING of 32 bytes.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
        // The TLS acceptor can serve it.
        crate::tls::challenge_key("a.example.com", &pem, &key).unwrap();
    }
}
