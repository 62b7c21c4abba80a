//! App secrets, encrypted at rest with ChaCha20-Poly1305 under a 32-byte key kept in
//! `<data_dir>/secrets.key` (mode 0600, created on first use). The catalog record
//! `secrets/{app}` holds only nonces, ciphertexts and keyed digests; values leave this
//! module only through [`app_secrets`], for the agent that boots a machine.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aloft_store::{Expect, Store, StoreError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ApiState;
use crate::error::ApiError;
use crate::util::now_rfc3339;

/// `secrets/{app}`
pub fn secrets_key(app: &str) -> String {
    format!("secrets/{app}")
}

/// Errors of secret storage; each names the file, app or secret it failed on.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets key file {path} holds {len} bytes, expected 32")]
    KeyLength { path: PathBuf, len: usize },
    #[error("invalid secret name {0:?}: use letters, digits and _ , not starting with a digit")]
    BadName(String),
    #[error("secret {name:?} of app {app:?} cannot be decrypted (wrong secrets.key?)")]
    Decrypt { app: String, name: String },
    #[error("encrypting secret {0:?} failed")]
    Encrypt(String),
    #[error("secret {name:?} of app {app:?} not found")]
    NotFound { app: String, name: String },
    #[error("catalog record secrets/{app}: {message}")]
    Record { app: String, message: String },
    #[error("secrets of app {0:?} changed concurrently too many times; retry")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SecretsError> for ApiError {
    fn from(e: SecretsError) -> Self {
        match e {
            SecretsError::BadName(_) => ApiError::BadRequest(e.to_string()),
            SecretsError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            SecretsError::Contended(_) => ApiError::Conflict(e.to_string()),
            SecretsError::Store(store) => store.into(),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

/// One sealed secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// Base64 12-byte nonce.
    pub nonce: String,
    /// Base64 ciphertext + tag; the AAD is `{app}/{name}`.
    pub ciphertext: String,
    /// Keyed digest of the value (lets a client see that a value changed).
    pub digest: String,
    pub created_at: String,
    pub updated_at: String,
}

/// `secrets/{app}`: every secret of an app and the secrets version.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SecretsRecord {
    pub schema: u32,
    pub version: u64,
    pub secrets: BTreeMap<String, SealedSecret>,
}

/// A secret as the API shows it: never the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSecret {
    pub name: String,
    pub digest: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Loads `<dir>/secrets.key`, creating it (0600, random) on first use.
pub fn load_or_create_key(dir: &Path) -> Result<[u8; 32], SecretsError> {
    let path = dir.join("secrets.key");
    let io = |source| SecretsError::KeyFile {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes
                .as_slice()
                .try_into()
                .map_err(|_| SecretsError::KeyLength {
                    path: path.clone(),
                    len: bytes.len(),
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let key = ChaCha20Poly1305::generate_key(&mut OsRng);
    let tmp = dir.join(format!("secrets.key.tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(key.as_slice()).map_err(io)?;
    f.sync_all().map_err(io)?;
    // A concurrent creator may win the race; its key is then the one to use.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            let mut out = [0u8; 32];
            out.copy_from_slice(key.as_slice());
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            load_or_create_key(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io(e))
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

fn digest(key: &[u8; 32], value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"aloft-secret-digest\0");
    h.update(key);
    h.update(value.as_bytes());
    hex::encode(&h.finalize()[..8])
}

fn seal(
    key: &[u8; 32],
    app: &str,
    name: &str,
    value: &str,
    created_at: Option<String>,
) -> Result<SealedSecret, SecretsError> {
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = format!("{app}/{name}");
    let ct = cipher(key)
        .encrypt(
            &nonce,
            Payload {
                msg: value.as_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| SecretsError::Encrypt(name.to_string()))?;
    let now = now_rfc3339();
    Ok(SealedSecret {
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(ct),
        digest: digest(key, value),
        created_at: created_at.unwrap_or_else(|| now.clone()),
        updated_at: now,
    })
}

fn open(key: &[u8; 32], app: &str, name: &str, s: &SealedSecret) -> Result<String, SecretsError> {
    let bad = || SecretsError::Decrypt {
        app: app.to_string(),
        name: name.to_string(),
    };
    let nonce = B64.decode(&s.nonce).map_err(|_| bad())?;
    if nonce.len() != 12 {
        return Err(bad());
    }
    let ct = B64.decode(&s.ciphertext).map_err(|_| bad())?;
    let aad = format!("{app}/{name}");
    let plain = cipher(key)
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ct,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| bad())?;
    String::from_utf8(plain).map_err(|_| bad())
}

async fn load(store: &dyn Store, app: &str) -> Result<(SecretsRecord, Expect), SecretsError> {
    match store.get(&secrets_key(app)).await? {
        None => Ok((
            SecretsRecord {
                schema: aloft_types::catalog::SCHEMA_VERSION,
                ..Default::default()
            },
            Expect::Absent,
        )),
        Some(e) => {
            let rec = serde_json::from_slice(&e.value).map_err(|err| SecretsError::Record {
                app: app.to_string(),
                message: err.to_string(),
            })?;
            Ok((rec, Expect::Revision(e.revision)))
        }
    }
}

/// Lists an app's secrets (names and digests).
pub async fn list(state: &ApiState, app: &str) -> Result<(Vec<AppSecret>, u64), SecretsError> {
    let (rec, _) = load(state.store(), app).await?;
    Ok((shown(&rec), rec.version))
}

fn shown(rec: &SecretsRecord) -> Vec<AppSecret> {
    rec.secrets
        .iter()
        .map(|(name, s)| AppSecret {
            name: name.clone(),
            digest: s.digest.clone(),
            created_at: s.created_at.clone(),
            updated_at: s.updated_at.clone(),
        })
        .collect()
}

/// Sets (`Some`) or removes (`None`) secrets atomically; returns the new listing and version.
pub async fn update(
    state: &ApiState,
    app: &str,
    changes: &BTreeMap<String, Option<String>>,
) -> Result<(Vec<AppSecret>, u64), SecretsError> {
    if let Some(bad) = changes.keys().find(|n| !valid_name(n)) {
        return Err(SecretsError::BadName(bad.clone()));
    }
    let key = state.secrets_key().await?;
    for _ in 0..16 {
        let (mut rec, expect) = load(state.store(), app).await?;
        for (name, value) in changes {
            match value {
                Some(v) => {
                    let created = rec.secrets.get(name).map(|s| s.created_at.clone());
                    rec.secrets
                        .insert(name.clone(), seal(&key, app, name, v, created)?);
                }
                None => {
                    rec.secrets.remove(name);
                }
            }
        }
        rec.version += 1;
        let bytes = serde_json::to_vec(&rec).map_err(|e| SecretsError::Record {
            app: app.to_string(),
            message: e.to_string(),
        })?;
        match state.store().put_if(&secrets_key(app), bytes, expect).await {
            Ok(_) => return Ok((shown(&rec), rec.version)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SecretsError::Contended(app.to_string()))
}

/// One secret's listing entry, or NotFound.
pub async fn get(state: &ApiState, app: &str, name: &str) -> Result<AppSecret, SecretsError> {
    let (rec, _) = load(state.store(), app).await?;
    shown(&rec)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SecretsError::NotFound {
            app: app.to_string(),
            name: name.to_string(),
        })
}

/// The decrypted secrets of an app, for the agent creating or updating a machine.
pub async fn app_secrets(
    state: &ApiState,
    app: &str,
) -> Result<BTreeMap<String, String>, SecretsError> {
    let (rec, _) = load(state.store(), app).await?;
    if rec.secrets.is_empty() {
        return Ok(BTreeMap::new());
    }
    let key = state.secrets_key().await?;
    rec.secrets
        .iter()
        .map(|(name, s)| Ok((name.clone(), open(&key, app, name, s)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_aad_binds_names() {
        let key = [7u8; 32];
        let s = seal(&key, "a", "DB", "hunter2", None).unwrap();
        assert_eq!(open(&key, "a", "DB", &s).unwrap(), "hunter2");
        assert!(open(&key, "b", "DB", &s).is_err());
        assert!(open(&key, "a", "OTHER", &s).is_err());
        assert!(open(&[8u8; 32], "a", "DB", &s).is_err());
        assert!(!s.ciphertext.contains("hunter2"));
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        let k2 = load_or_create_key(dir.path()).unwrap();
        assert_eq!(k1, k2);
        let mode = std::fs::metadata(dir.path().join("secrets.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn names() {
        assert!(valid_name("DATABASE_URL"));
        assert!(valid_name("_x1"));
        assert!(!valid_name("1X"));
        assert!(!valid_name("A-B"));
        assert!(!valid_name(""));
    }
}
