//! The Machines API client used by every CLI command that talks to a running Aloft:
//! where the API is (env, `aloft dev`'s `dev.json`, `aloft auth login`'s saved config),
//! bearer-token requests, and Fly-style `{"error": "..."}` bodies turned into errors
//! that name the method, path and status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_types::datadir::DataDir;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Environment variable holding the API base URL.
pub const API_URL_ENV: &str = "ALOFT_API_URL";
/// Environment variable holding the bearer token.
pub const API_TOKEN_ENV: &str = "ALOFT_API_TOKEN";

/// Where the CLI found the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub api_url: String,
    #[serde(default)]
    pub token: String,
    /// Where this came from (`ALOFT_API_URL`, a file path), for messages.
    #[serde(skip)]
    pub source: String,
}

/// `dev.json` as written by `aloft dev`, and `config.json` as written by
/// `aloft auth login` (the same fields; `proxy` is only in `dev.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedEndpoint {
    pub api_url: String,
    #[serde(default)]
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no API: start `aloft dev` or set ALOFT_API_URL (and ALOFT_API_TOKEN) \
         (no {dev_json}, no {user_config})"
    )]
    NotConfigured {
        dev_json: PathBuf,
        user_config: PathBuf,
    },
    #[error("cannot read {path}: {reason}")]
    BadEndpointFile { path: PathBuf, reason: String },
    #[error("invalid API URL {url:?} (from {source_name}): want http://HOST:PORT")]
    BadUrl { url: String, source_name: String },
    #[error("cannot reach the API at {url} (from {source_name}): {reason}")]
    Unreachable {
        url: String,
        source_name: String,
        reason: String,
    },
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path}: unexpected response: {reason}")]
    Decode {
        method: String,
        path: String,
        reason: String,
    },
}

/// `~/.config/aloft/config.json` (or `$XDG_CONFIG_HOME/aloft/config.json`).
pub fn user_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"));
    base.join("aloft").join("config.json")
}

fn read_saved(path: &Path) -> Result<Option<SavedEndpoint>, ApiError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ApiError::BadEndpointFile {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::BadEndpointFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Finds the API: `ALOFT_API_URL`/`ALOFT_API_TOKEN`, then `<data-dir>/dev.json`, then
/// the saved `aloft auth login` config.
pub fn discover(data_dir: &DataDir) -> Result<Endpoint, ApiError> {
    if let Some(url) = std::env::var(API_URL_ENV).ok().filter(|u| !u.is_empty()) {
        return Ok(Endpoint {
            api_url: url,
            token: std::env::var(API_TOKEN_ENV).unwrap_or_default(),
            source: API_URL_ENV.into(),
        });
    }
    let dev_json = data_dir.dev_json();
    let user_config = user_config_path();
    for path in [&dev_json, &user_config] {
        if let Some(saved) = read_saved(path)? {
            let token = std::env::var(API_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or(saved.token);
            return Ok(Endpoint {
                api_url: saved.api_url,
                token,
                source: path.display().to_string(),
            });
        }
    }
    Err(ApiError::NotConfigured {
        dev_json,
        user_config,
    })
}

/// Saves an endpoint for later commands (`aloft auth login`).
pub fn save_user_config(ep: &SavedEndpoint) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let path = user_config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let body = serde_json::to_vec_pretty(ep)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&body)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs a command's async body on a small runtime of its own.
pub fn block_on<F: std::future::Future>(fut: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(fut))
}

/// A Machines API client.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `http://host:port/v1`
    base: String,
    token: String,
    source: String,
    /// Sent as `fly-machine-lease-nonce` on every request when set.
    lease: Option<String>,
}

/// The header carrying a machine lease's nonce.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// Percent-encodes one path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    pub fn new(ep: &Endpoint) -> Result<Self, ApiError> {
        let url = ep.api_url.trim().trim_end_matches('/');
        let bad = || ApiError::BadUrl {
            url: ep.api_url.clone(),
            source_name: ep.source.clone(),
        };
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(bad)?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad());
        }
        // reqwest needs a rustls provider even for plain HTTP; another part of this
        // process may have installed it first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = if url.ends_with("/v1") {
            url.to_string()
        } else {
            format!("{url}/v1")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ApiError::Unreachable {
                url: base.clone(),
                source_name: ep.source.clone(),
                reason: e.to_string(),
            })?;
        Ok(Api {
            http,
            base,
            token: ep.token.clone(),
            source: ep.source.clone(),
            lease: None,
        })
    }

    /// Discovers the endpoint and builds a client.
    pub fn connect(data_dir: &DataDir) -> Result<Self, ApiError> {
        Api::new(&discover(data_dir)?)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token (empty when none is configured).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Where the endpoint came from, for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The same client, sending a machine lease's nonce with every request.
    pub fn with_lease(&self, nonce: &str) -> Api {
        Api {
            lease: Some(nonce.to_string()),
            ..self.clone()
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if !self.token.is_empty() {
            rb = rb.bearer_auth(&self.token);
        }
        if let Some(n) = &self.lease {
            rb = rb.header(LEASE_NONCE_HEADER, n);
        }
        rb
    }

    /// Sends a request and returns the raw successful response.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ApiError> {
        let mut rb = self.request(method.clone(), path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        let resp = rb.send().await.map_err(|e| ApiError::Unreachable {
            url: format!("{}{}", self.base, path),
            source_name: self.source.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| {
                if text.trim().is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    text.trim().to_string()
                }
            });
        Err(ApiError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    /// A JSON request with a typed JSON answer (an empty body reads as `null`).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<T, ApiError> {
        let resp = self.send(method.clone(), path, body, timeout).await?;
        let decode = |reason: String| ApiError::Decode {
            method: method.to_string(),
            path: path.to_string(),
            reason,
        };
        let bytes = resp.bytes().await.map_err(|e| decode(error_chain(&e)))?;
        let slice: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            b"null"
        } else {
            &bytes
        };
        serde_json::from_slice(slice).map_err(|e| decode(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(
            reqwest::Method::GET,
            path,
            None,
            Some(Duration::from_secs(60)),
        )
        .await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ApiError> {
        self.call(
            reqwest::Method::POST,
            path,
            Some(body),
            Some(Duration::from_secs(300)),
        )
        .await
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ApiError> {
        self.call(
            reqwest::Method::PUT,
            path,
            Some(body),
            Some(Duration::from_secs(300)),
        )
        .await
    }

    /// DELETE; the answer body, if any, is returned as JSON.
    pub async fn delete(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        self.call(
            reqwest::Method::DELETE,
            path,
            None,
            Some(Duration::from_secs(300)),
        )
        .await
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_gets_v1_once() {
        let ep = |u: &str| Endpoint {
            api_url: u.into(),
            token: String::new(),
            source: "test".into(),
        };
        assert_eq!(
            Api::new(&ep("http://127.0.0.1:4280")).unwrap().base(),
            "http://127.0.0.1:4280/v1"
        );
        assert_eq!(
            Api::new(&ep("http://127.0.0.1:4280/v1/")).unwrap().base(),
            "http://127.0.0.1:4280/v1"
        );
        assert!(matches!(
            Api::new(&ep("127.0.0.1:4280")),
            Err(ApiError::BadUrl { .. })
        ));
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("my-app_1.x"), "my-app_1.x");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
    }
}
