//! TLS termination by SNI: certificates from the catalog (`certs/{hostname}`, status
//! Ready), from files (static mode, `[[certs]]` in the routes file) and from the dev
//! CA ([`LocalCa`]); ACME TLS-ALPN-01 challenges answered from `acme/challenges/*`.
//!
//! A connection on a TLS port is read up to its ClientHello first
//! ([`tokio_rustls::LazyConfigAcceptor`]), which decides the rest:
//! - ALPN `acme-tls/1` → the challenge certificate for the SNI, `acme-tls/1`
//!   negotiated, closed after the handshake;
//! - the SNI's app has `http` among the port's handlers (or no app claims it) → ALPN
//!   `h2`/`http/1.1`, then the same request path as plain HTTP/1.1 and h2c;
//! - otherwise (`["tls"]`) → no ALPN, then raw bytes to a machine ([`crate::tcp`]).
//!
//! A port's fly.toml `tls_options` change that per port: `alpn` replaces the ALPN
//! protocols offered (e.g. `["http/1.1"]` never negotiates h2), `versions` limits the
//! TLS versions accepted (`["TLSv1.3"]` refuses a TLS 1.2-only client), and
//! `default_self_signed` serves a self-signed certificate when none matches the SNI.
//! Those ports get their own [`ServerConfig`], built when a route table is published
//! ([`Certs::port_config`], reused across tables while the options stay the same),
//! never per connection.
//!
//! Certificate choice ([`CertResolver`]): the exact host name first, then `*.` plus
//! the SNI without its first label (a wildcard matches one label). An SNI without a
//! certificate, or no SNI at all, fails the handshake (unless the port has
//! `default_self_signed`). This module never writes the catalog: ACME issuance belongs
//! to whoever creates the records.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aloft_store::Store;
use aloft_types::catalog::{
    ACME_CHALLENGES_PREFIX, AcmeChallengeKind, AcmeChallengeRecord, CERTS_PREFIX, CertRecord,
    CertStatus,
};
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::server::Shared;

/// The ALPN protocol of ACME TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A certificate that cannot be served; each variant names the host name it is for.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate for {hostname}: {hostname:?} is not a valid host name")]
    BadHostname { hostname: String },
    #[error("certificate for {hostname}: cannot read {path}")]
    Read {
        hostname: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate for {hostname}: the certificate PEM holds no certificate")]
    NoCertificate { hostname: String },
    #[error("certificate for {hostname}: bad certificate PEM: {message}")]
    BadCertificate { hostname: String, message: String },
    #[error("certificate for {hostname}: bad private key PEM: {message}")]
    BadKey { hostname: String, message: String },
    #[error("certificate for {hostname}: the key cannot be used with the certificate: {message}")]
    KeyMismatch { hostname: String, message: String },
}

/// The process's TLS provider (ring), shared by every config. Suites with a SHA-256
/// key schedule come first (the server's order is used): SHA-384's costs more per
/// handshake than the rest of the key schedule, for no gain in practice.
fn provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as C;
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(P.get_or_init(|| {
        let sha256 = [
            C::TLS13_AES_128_GCM_SHA256,
            C::TLS13_CHACHA20_POLY1305_SHA256,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .sort_by_key(|s| !sha256.contains(&s.suite()));
        Arc::new(p)
    }))
}

/// Is `h` a lower-case host name, possibly `*.` plus one (a wildcard)?
fn valid_cert_hostname(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// Parse a PEM chain (leaf first) and its private key into a servable key.
pub fn certified_key(
    hostname: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            hostname: hostname.to_string(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            hostname: hostname.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::BadKey {
        hostname: hostname.to_string(),
        message: e.to_string(),
    })?;
    let ck =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| CertError::KeyMismatch {
            hostname: hostname.to_string(),
            message: e.to_string(),
        })?;
    Ok(Arc::new(ck))
}

/// Parse a TLS-ALPN-01 challenge certificate and its key. Unlike [`certified_key`]
/// the key is not checked against the certificate through webpki, which refuses the
/// critical `acmeIdentifier` extension (RFC 8737) every such certificate carries; the
/// record comes from our own ACME client and is only ever shown to the CA.
pub fn challenge_key(
    hostname: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            hostname: hostname.to_string(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            hostname: hostname.to_string(),
        });
    }
    let bad_key = |message: String| CertError::BadKey {
        hostname: hostname.to_string(),
        message,
    };
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad_key(e.to_string()))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad_key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// `[[certs]]` of a routes file: a certificate served for `hostname` in static mode.
/// Relative paths are taken from the routes file's directory.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// Host name, or `*.domain` for one label under it.
    pub hostname: String,
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Load certificate files; all or nothing.
pub fn load_cert_files(
    specs: &[CertSpec],
    base: &Path,
) -> Result<HashMap<String, Arc<CertifiedKey>>, CertError> {
    let mut out = HashMap::new();
    for s in specs {
        let hostname = s.hostname.to_ascii_lowercase();
        if !valid_cert_hostname(&hostname) {
            return Err(CertError::BadHostname {
                hostname: s.hostname.clone(),
            });
        }
        let read = |p: &Path| {
            let path = base.join(p);
            std::fs::read_to_string(&path).map_err(|source| CertError::Read {
                hostname: hostname.clone(),
                path,
                source,
            })
        };
        let (cert, key) = (read(&s.cert)?, read(&s.key)?);
        out.insert(hostname.clone(), certified_key(&hostname, &cert, &key)?);
    }
    Ok(out)
}

/// What is served now: certificates by host name and TLS-ALPN-01 challenge
/// certificates by host name.
#[derive(Debug, Default)]
struct Served {
    names: HashMap<String, Arc<CertifiedKey>>,
    challenges: HashMap<String, Arc<CertifiedKey>>,
}

impl Served {
    fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.names.get(sni) {
            return Some(Arc::clone(k));
        }
        let (_, parent) = sni.split_once('.')?;
        self.names.get(&format!("*.{parent}")).cloned()
    }
}

/// The certificates of each source; merged into [`Served`] on every change.
#[derive(Debug, Default)]
struct Sources {
    /// Added one by one ([`Certs::insert_file`]: `--cert` flags, the dev CA); kept
    /// across routes file reloads.
    fixed: HashMap<String, Arc<CertifiedKey>>,
    /// The routes file's `[[certs]]`, replaced on every reload.
    files: HashMap<String, Arc<CertifiedKey>>,
    /// By host name: the PEM it was parsed from (to skip re-parsing) and the key.
    catalog: HashMap<String, (String, Arc<CertifiedKey>)>,
    challenges: HashMap<String, Arc<CertifiedKey>>,
}

/// Picks the certificate for a ClientHello's SNI (or its ACME challenge certificate).
#[derive(Debug)]
pub struct CertResolver {
    served: Arc<ArcSwap<Served>>,
    challenge: bool,
    /// Served when no certificate matches (`tls_options.default_self_signed`).
    fallback: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            return self.fallback.clone();
        };
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            lower.as_str()
        } else {
            sni
        };
        let served = self.served.load();
        if self.challenge {
            served.challenges.get(sni).cloned()
        } else {
            served.lookup(sni).or_else(|| self.fallback.clone())
        }
    }
}

/// The process's self-signed certificate for `default_self_signed` ports (made once);
/// `None` if it cannot be made.
fn self_signed() -> Option<Arc<CertifiedKey>> {
    static K: OnceLock<Option<Arc<CertifiedKey>>> = OnceLock::new();
    K.get_or_init(|| {
        let name = "aloft-default.invalid";
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .map_err(|e| e.to_string())
            .and_then(|c| {
                certified_key(name, &c.cert.pem(), &c.signing_key.serialize_pem())
                    .map_err(|e| e.to_string())
            });
        match made {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make the default self-signed certificate");
                None
            }
        }
    })
    .clone()
}

/// What a port's TLS server config is made of, after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PortConfigKey {
    alpn: Vec<Vec<u8>>,
    /// Sorted; never empty.
    versions: Vec<crate::routes::TlsVersion>,
    self_signed: bool,
}

/// The ALPN protocols HTTP ports offer by default.
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Every certificate a proxy serves, and the TLS configs that serve them.
pub struct Certs {
    sources: std::sync::Mutex<Sources>,
    served: Arc<ArcSwap<Served>>,
    http: Arc<ServerConfig>,
    raw: Arc<ServerConfig>,
    acme: Arc<ServerConfig>,
    /// Configs of ports with `tls_options`, by what they are made of (kept while a
    /// published table uses them).
    port_configs: std::sync::Mutex<HashMap<PortConfigKey, Arc<ServerConfig>>>,
    /// Bumped on every change (tests and callers wait on it).
    generation: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let served = self.served.load();
        f.debug_struct("Certs")
            .field("names", &served.names.keys().collect::<Vec<_>>())
            .field("challenges", &served.challenges.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn server_config(resolver: CertResolver, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    server_config_versions(resolver, alpn, rustls::DEFAULT_VERSIONS)
}

fn server_config_versions(
    resolver: CertResolver,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let mut c = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c.ignore_client_order = true;
    Arc::new(c)
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

impl Certs {
    /// No certificates yet: every handshake fails until some are added.
    pub fn new() -> Self {
        let served = Arc::new(ArcSwap::from_pointee(Served::default()));
        let resolver = |challenge| CertResolver {
            served: Arc::clone(&served),
            challenge,
            fallback: None,
        };
        Certs {
            http: server_config(resolver(false), HTTP_ALPN),
            raw: server_config(resolver(false), &[]),
            acme: server_config(resolver(true), &[ACME_TLS_ALPN]),
            port_configs: std::sync::Mutex::new(HashMap::new()),
            served,
            sources: std::sync::Mutex::new(Sources::default()),
            generation: tokio::sync::watch::channel(0).0,
        }
    }

    /// The config for HTTP over TLS (ALPN `h2`, `http/1.1`).
    pub fn http_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.http)
    }

    /// The config for raw TCP over TLS (`["tls"]`: no ALPN).
    pub fn raw_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.raw)
    }

    /// The config of a port with `tls_options` (`raw`: the port relays bytes, so
    /// offers no ALPN unless told); `None` when the options ask for nothing the
    /// default [`Certs::http_config`] / [`Certs::raw_config`] lacks. Configs are
    /// shared by every port with the same options and kept across calls, so a new
    /// route table keeps their TLS session caches.
    pub fn port_config(
        &self,
        opts: &crate::routes::PortTls,
        raw: bool,
    ) -> Option<Arc<ServerConfig>> {
        use crate::routes::TlsVersion;
        let alpn = match &opts.alpn {
            Some(a) => a.clone(),
            None if raw => Vec::new(),
            None => HTTP_ALPN.iter().map(|p| p.to_vec()).collect(),
        };
        let versions = if opts.versions.is_empty() {
            vec![TlsVersion::Tls12, TlsVersion::Tls13]
        } else {
            opts.versions.clone()
        };
        let key = PortConfigKey {
            alpn,
            versions,
            self_signed: opts.default_self_signed,
        };
        let default_alpn = if raw { &[][..] } else { HTTP_ALPN };
        if !key.self_signed
            && key.versions.len() == 2
            && key
                .alpn
                .iter()
                .map(Vec::as_slice)
                .eq(default_alpn.iter().copied())
        {
            return None;
        }
        let mut configs = match self.port_configs.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = configs.get(&key) {
            return Some(Arc::clone(c));
        }
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = key
            .versions
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect();
        let resolver = CertResolver {
            served: Arc::clone(&self.served),
            challenge: false,
            fallback: if key.self_signed { self_signed() } else { None },
        };
        let alpn: Vec<&[u8]> = key.alpn.iter().map(Vec::as_slice).collect();
        let config = server_config_versions(resolver, &alpn, &versions);
        // Bounded: one config per distinct option set ever published.
        if configs.len() >= 256 {
            configs.clear();
        }
        configs.insert(key, Arc::clone(&config));
        Some(config)
    }

    /// The config answering TLS-ALPN-01 challenges (ALPN `acme-tls/1` only).
    pub fn acme_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.acme)
    }

    /// The certificate served for `sni` now (lower-case).
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.served.load().lookup(sni)
    }

    /// Has a TLS-ALPN-01 challenge certificate for `hostname`?
    pub fn has_challenge(&self, hostname: &str) -> bool {
        self.served.load().challenges.contains_key(hostname)
    }

    /// A receiver whose value changes on every change of the served certificates.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut Sources)) {
        let mut s = match self.sources.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        f(&mut s);
        // Fixed ones first, the routes file over them, the catalog over both (an
        // operator's record wins).
        let mut names = s.fixed.clone();
        for (h, k) in &s.files {
            names.insert(h.clone(), Arc::clone(k));
        }
        for (h, (_, k)) in &s.catalog {
            names.insert(h.clone(), Arc::clone(k));
        }
        self.served.store(Arc::new(Served {
            names,
            challenges: s.challenges.clone(),
        }));
        drop(s);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replace the certificates of the routes file's `[[certs]]`.
    pub fn set_files(&self, certs: HashMap<String, Arc<CertifiedKey>>) {
        self.update(|s| s.files = certs);
    }

    /// Add (or replace) one certificate that stays until the process ends (a
    /// `--cert` flag, the dev CA's).
    pub fn insert_file(&self, hostname: &str, key: Arc<CertifiedKey>) {
        self.update(|s| {
            s.fixed.insert(hostname.to_ascii_lowercase(), key);
        });
    }

    /// Replace the catalog's certificates and challenges with those of `certs` and
    /// `challenges`; unusable records are skipped with a warning.
    pub fn set_catalog(&self, certs: &[CertRecord], challenges: &[AcmeChallengeRecord]) {
        let mut fresh_challenges = HashMap::new();
        for c in challenges {
            if c.kind != AcmeChallengeKind::TlsAlpn01 {
                continue;
            }
            let host = c.hostname.to_ascii_lowercase();
            match challenge_key(&host, &c.cert_pem, &c.key_pem) {
                Ok(k) => {
                    fresh_challenges.insert(host, k);
                }
                Err(e) => {
                    tracing::warn!(error = %e, token = %c.token, "tls-alpn-01 challenge not served")
                }
            }
        }
        self.update(|s| {
            let mut fresh = HashMap::new();
            for r in certs {
                if r.status != CertStatus::Ready || r.cert_pem.is_empty() {
                    continue;
                }
                let host = r.hostname.to_ascii_lowercase();
                if let Some((pem, k)) = s.catalog.get(&host)
                    && *pem == r.cert_pem
                {
                    fresh.insert(host, (pem.clone(), Arc::clone(k)));
                    continue;
                }
                match certified_key(&host, &r.cert_pem, &r.key_pem) {
                    Ok(k) => {
                        fresh.insert(host, (r.cert_pem.clone(), k));
                    }
                    Err(e) => tracing::warn!(error = %e, "catalog certificate not served"),
                }
            }
            s.catalog = fresh;
            s.challenges = fresh_challenges;
        });
    }
}

async fn load_catalog(
    store: &dyn Store,
    certs: &Certs,
) -> Result<(u64, u64), aloft_store::StoreError> {
    let c = store.list(CERTS_PREFIX).await?;
    let a = store.list(ACME_CHALLENGES_PREFIX).await?;
    let records: Vec<CertRecord> = c
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    let challenges: Vec<AcmeChallengeRecord> = a
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    certs.set_catalog(&records, &challenges);
    Ok((c.revision, a.revision))
}

/// Keeps `certs` equal to the catalog's `certs/` and `acme/challenges/` records until
/// the task is dropped: a full load, then a reload after every change under either.
pub async fn follow_certs(store: Arc<dyn Store>, certs: Arc<Certs>) {
    loop {
        let (rc, ra) = match load_catalog(store.as_ref(), &certs).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("proxy: reading certificates from the catalog failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (Ok(mut wc), Ok(mut wa)) = (
            store.watch(CERTS_PREFIX, rc).await,
            store.watch(ACME_CHALLENGES_PREFIX, ra).await,
        ) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        // Any change (or a broken watch) means a fresh listing.
        tokio::select! {
            _ = wc.next() => {},
            _ = wa.next() => {},
        }
    }
}

/// Serve one connection accepted on a TLS port: read the ClientHello, answer an ACME
/// challenge or terminate TLS and go on with HTTP or raw TCP (see the module doc).
pub(crate) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    public_port: u16,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let certs = Arc::clone(shared.routes.certs());
    // The header read timeout bounds the handshake too (slowloris).
    let timeout = shared.cfg.header_read_timeout;
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), stream);
    let start = match tokio::time::timeout(timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "no TLS ClientHello");
            return;
        }
        Err(_) => return,
    };
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_ascii_lowercase);
    let acme = hello
        .alpn()
        .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
    if acme {
        // TLS-ALPN-01: the handshake itself is the answer.
        let done = tokio::time::timeout(timeout, start.into_stream(certs.acme_config())).await;
        crate::metrics::tls_handshake(matches!(done, Ok(Ok(_))));
        match done {
            Ok(Ok(mut s)) => {
                tracing::info!(sni = ?sni, "answered a tls-alpn-01 challenge");
                let _ = s.shutdown().await;
            }
            Ok(Err(e)) => tracing::info!(sni = ?sni, error = %e, "tls-alpn-01 handshake failed"),
            Err(_) => {}
        }
        return;
    }
    let table = shared.routes.load_full();
    let routed = table
        .app_for_host(sni.as_deref().unwrap_or(""))
        .and_then(|a| a.service_for_port(public_port).map(|s| (a, s)));
    let port = routed.and_then(|(_, svc)| svc.ports.iter().find(|p| p.port == public_port));
    let raw = port.is_some_and(|p| !p.has_handler("http"));
    let config = match port.and_then(|p| p.tls_config.as_ref()) {
        Some(c) => Arc::clone(c),
        None if raw => certs.raw_config(),
        None => certs.http_config(),
    };
    let done = tokio::time::timeout(timeout, start.into_stream(config)).await;
    crate::metrics::tls_handshake(matches!(done, Ok(Ok(_))));
    let tls = match done {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, sni = ?sni, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    match routed {
        Some((app, svc)) if raw => {
            crate::tcp::relay(tls, peer, local, app, svc, public_port, &shared).await;
        }
        _ => {
            drop(table);
            let client = ClientStream::Tls(Box::new(tls));
            crate::server::serve_http_on(client, peer, public_port, shared, stop).await;
        }
    }
}

/// A client connection as the HTTP layer reads it: plain TCP, or TLS terminated here.
pub(crate) enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// For TLS, whether ALPN chose `h2`; `None` for plain TCP (the bytes tell).
    pub(crate) fn alpn_h2(&self) -> Option<bool> {
        match self {
            ClientStream::Tcp(_) => None,
            ClientStream::Tls(t) => Some(t.get_ref().1.alpn_protocol() == Some(b"h2")),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ClientStream::Tcp($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            ClientStream::Tls($s) => {
                let $s = std::pin::Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Tcp(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A local certificate authority kept in a directory (`ca.pem`, `ca.key`), created
/// on first use, that signs leaf certificates for dev host names
/// (`*.aloft.localhost`). Clients trust it by adding `ca.pem`.
pub struct LocalCa {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    cert_pem: String,
}

/// The dev CA could not be created, read or used; names the file or host.
#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("local CA: cannot read or write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local CA: {path} is not a usable key: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("local CA: cannot sign a certificate for {names:?}: {message}")]
    Sign { names: Vec<String>, message: String },
}

impl LocalCa {
    /// The CA's distinguished name and constraints (the same every time, so a stored
    /// key re-creates the same issuer).
    fn ca_params() -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Aloft local development CA");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Aloft");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2049, 1, 1);
        p
    }

    /// Open the CA in `dir`, creating it (mode 0600 key) when absent.
    pub fn open(dir: &Path) -> Result<LocalCa, LocalCaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LocalCaError::Io { path, source }
        };
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let params = Self::ca_params();
        if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| LocalCaError::BadKey {
                path: key_path.clone(),
                message: e.to_string(),
            })?;
            return Ok(LocalCa {
                key,
                params,
                cert_pem,
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = Self::generate()?;
        let tmp = key_path.with_extension("key.tmp");
        write_private(&tmp, ca.key.serialize_pem().as_bytes()).map_err(io(&tmp))?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        std::fs::rename(&tmp, &key_path).map_err(io(&key_path))?;
        Ok(ca)
    }

    /// A fresh CA in memory (tests).
    pub fn generate() -> Result<LocalCa, LocalCaError> {
        let sign_err = |e: rcgen::Error| LocalCaError::Sign {
            names: vec!["(CA)".into()],
            message: e.to_string(),
        };
        let key = rcgen::KeyPair::generate().map_err(sign_err)?;
        let params = Self::ca_params();
        let cert_pem = params.self_signed(&key).map_err(sign_err)?.pem();
        Ok(LocalCa {
            key,
            params,
            cert_pem,
        })
    }

    /// The CA certificate (PEM), for clients to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new leaf certificate and key (PEM) for `names`, valid for a year.
    pub fn issue(&self, names: &[&str]) -> Result<(String, String), LocalCaError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let sign_err = |e: rcgen::Error| LocalCaError::Sign {
            names: names.clone(),
            message: e.to_string(),
        };
        let mut p = rcgen::CertificateParams::new(names.clone()).map_err(sign_err)?;
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let now = std::time::SystemTime::now();
        p.not_before = (now - Duration::from_secs(3600)).into();
        p.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = rcgen::KeyPair::generate().map_err(sign_err)?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&leaf_key, &issuer).map_err(sign_err)?;
        Ok((cert.pem(), leaf_key.serialize_pem()))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// The dev certificate: `*.{suffix}` and `{suffix}` signed by the local CA in
/// `ca_dir` (created when absent), installed in `certs` as a file certificate.
/// Returns the CA certificate's path for clients to trust.
pub fn install_dev_certificate(
    certs: &Certs,
    ca_dir: &Path,
    suffix: &str,
) -> Result<PathBuf, LocalCaError> {
    let ca = LocalCa::open(ca_dir)?;
    let domain = suffix.trim_start_matches('.').to_ascii_lowercase();
    let wildcard = format!("*.{domain}");
    let (cert, key) = ca.issue(&[&wildcard, &domain])?;
    for name in [&wildcard, &domain] {
        let k = certified_key(name, &cert, &key).map_err(|e| LocalCaError::Sign {
            names: vec![name.clone()],
            message: e.to_string(),
        })?;
        certs.insert_file(name, k);
    }
    Ok(ca_dir.join("ca.pem"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(valid_cert_hostname("example.com"));
        assert!(valid_cert_hostname("*.example.com"));
        assert!(!valid_cert_hostname("*.*.example.com"));
        assert!(!valid_cert_hostname("a..b"));
        assert!(!valid_cert_hostname("Example.com"));
        assert!(!valid_cert_hostname(""));
    }

    #[test]
    fn exact_beats_wildcard_and_wildcard_is_one_label() {
        let ca = LocalCa::generate().unwrap();
        let (c1, k1) = ca.issue(&["*.example.com"]).unwrap();
        let (c2, k2) = ca.issue(&["a.example.com"]).unwrap();
        let wild = certified_key("*.example.com", &c1, &k1).unwrap();
        let exact = certified_key("a.example.com", &c2, &k2).unwrap();
        let certs = Certs::new();
        certs.insert_file("*.example.com", Arc::clone(&wild));
        certs.insert_file("a.example.com", Arc::clone(&exact));
        assert!(Arc::ptr_eq(&certs.lookup("a.example.com").unwrap(), &exact));
        assert!(Arc::ptr_eq(&certs.lookup("b.example.com").unwrap(), &wild));
        assert!(certs.lookup("x.b.example.com").is_none());
        assert!(certs.lookup("example.com").is_none());
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = LocalCa::generate().unwrap();
        let (c1, _) = ca.issue(&["a.test"]).unwrap();
        let (_, k2) = ca.issue(&["b.test"]).unwrap();
        let e = certified_key("a.test", &c1, &k2).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch { .. }), "{e}");
        let e = certified_key("a.test", "junk", &k2).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate { .. }), "{e}");
    }

    #[test]
    fn local_ca_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalCa::open(dir.path()).unwrap();
        let b = LocalCa::open(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        let certs = Certs::new();
        install_dev_certificate(&certs, dir.path(), ".aloft.localhost").unwrap();
        assert!(certs.lookup("web.aloft.localhost").is_some());
        assert!(certs.lookup("aloft.localhost").is_some());
    }
}
