//! Secret keys (`/apps/{app}/secretkeys…`): named keys an app uses through the API
//! without ever seeing them — encrypt/decrypt (XAES-256-GCM, NaCl secretbox, NaCl
//! sealed box), sign/verify (HMAC-SHA-256/384/512, NaCl auth, Ed25519). The types are
//! Fly's (`hs256`, `hs384`, `hs512`, `xaes256gcm`, `nacl_auth`, `nacl_box`,
//! `nacl_secretbox`, `nacl_sign`).
//!
//! Key material is sealed with ChaCha20-Poly1305 under the install's `secrets.key`
//! (the one [`crate::secrets`] uses) in the catalog record `secretkeys/{app}`; only
//! public keys (`nacl_box`, `nacl_sign`) ever leave this module.
//!
//! Byte fields are JSON arrays of integers as in Fly's document; requests may also
//! send them as base64 strings (what Go clients encode `[]byte` as).

use std::collections::BTreeMap;

use aes_gcm::Aes256Gcm;
use aloft_store::{Expect, StoreError};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::{JsonBody, QueryPairs};
use crate::util::now_rfc3339;

/// `secretkeys/{app}`
pub fn secretkeys_key(app: &str) -> String {
    format!("secretkeys/{app}")
}

/// A secret key's type, by Fly's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Hs256,
    Hs384,
    Hs512,
    Xaes256gcm,
    NaclAuth,
    NaclBox,
    NaclSecretbox,
    NaclSign,
}

const ALL_TYPES: [KeyType; 8] = [
    KeyType::Hs256,
    KeyType::Hs384,
    KeyType::Hs512,
    KeyType::Xaes256gcm,
    KeyType::NaclAuth,
    KeyType::NaclBox,
    KeyType::NaclSecretbox,
    KeyType::NaclSign,
];

/// What a key type can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Encrypt,
    Sign,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Hs256 => "hs256",
            KeyType::Hs384 => "hs384",
            KeyType::Hs512 => "hs512",
            KeyType::Xaes256gcm => "xaes256gcm",
            KeyType::NaclAuth => "nacl_auth",
            KeyType::NaclBox => "nacl_box",
            KeyType::NaclSecretbox => "nacl_secretbox",
            KeyType::NaclSign => "nacl_sign",
        }
    }

    pub fn parse(s: &str) -> Option<KeyType> {
        ALL_TYPES.into_iter().find(|t| t.name() == s)
    }

    fn usage(self) -> Use {
        match self {
            KeyType::Xaes256gcm | KeyType::NaclBox | KeyType::NaclSecretbox => Use::Encrypt,
            _ => Use::Sign,
        }
    }

    /// Bytes of key material a new key of this type gets.
    fn generated_len(self) -> usize {
        match self {
            KeyType::Hs384 => 48,
            KeyType::Hs512 => 64,
            _ => 32,
        }
    }

    /// Checks user-supplied material and returns what is stored (`nacl_sign` also
    /// takes NaCl's 64-byte seed‖public form and keeps the seed).
    fn check_material(self, v: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            KeyType::Hs256 | KeyType::Hs384 | KeyType::Hs512 => {
                if v.len() < 16 || v.len() > 1024 {
                    return Err(format!("{} bytes; an HMAC key has 16 to 1024", v.len()));
                }
                Ok(v.to_vec())
            }
            KeyType::NaclSign if v.len() == 64 => {
                let seed: [u8; 32] = v[..32].try_into().map_err(|_| "bad seed".to_string())?;
                let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
                if sk.verifying_key().as_bytes()[..] != v[32..] {
                    return Err("the last 32 bytes are not the seed's public key".into());
                }
                Ok(seed.to_vec())
            }
            _ if v.len() == 32 => Ok(v.to_vec()),
            _ => Err(format!("{} bytes; a {} key has 32", v.len(), self.name())),
        }
    }

    /// The public half, for the asymmetric types.
    fn public_key(self, secret: &[u8]) -> Option<Vec<u8>> {
        let k: [u8; 32] = secret.try_into().ok()?;
        match self {
            KeyType::NaclSign => Some(
                ed25519_dalek::SigningKey::from_bytes(&k)
                    .verifying_key()
                    .as_bytes()
                    .to_vec(),
            ),
            KeyType::NaclBox => Some(
                crypto_box::SecretKey::from(k)
                    .public_key()
                    .as_bytes()
                    .to_vec(),
            ),
            _ => None,
        }
    }
}

/// Errors of secret-key operations; each names the app, key or field it failed on.
#[derive(Debug, thiserror::Error)]
pub enum SecretKeyError {
    #[error("invalid secret key name {0:?}: use 1-64 letters, digits, _ or -")]
    BadName(String),
    #[error("invalid field `type`: {0:?} is not one of {types}", types = type_list())]
    BadType(String),
    #[error("invalid field `value`: {0}")]
    BadValue(String),
    #[error("invalid query parameter `{param}`: {reason}")]
    BadQuery { param: &'static str, reason: String },
    #[error("secret key {name:?} of app {app:?} not found")]
    NotFound { app: String, name: String },
    #[error("secret key {name:?} has type {kind}, which cannot {op}")]
    WrongUse {
        name: String,
        kind: &'static str,
        op: &'static str,
    },
    #[error("invalid field `{field}`: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("invalid field `ciphertext`: it does not decrypt with secret key {0:?}")]
    Decrypt(String),
    #[error("invalid field `signature`: it does not verify with secret key {0:?}")]
    Verify(String),
    #[error("secret keys of app {app:?} are at version {current}, older than min_version {wanted}")]
    TooOld {
        app: String,
        current: u64,
        wanted: u64,
    },
    #[error("secret key {name:?} of app {app:?} cannot be unsealed (wrong secrets.key?)")]
    Unseal { app: String, name: String },
    #[error("catalog record secretkeys/{app}: {message}")]
    Record { app: String, message: String },
    #[error("secret keys of app {0:?} changed concurrently too many times; retry")]
    Contended(String),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn type_list() -> String {
    ALL_TYPES.map(KeyType::name).join(", ")
}

impl From<SecretKeyError> for ApiError {
    fn from(e: SecretKeyError) -> Self {
        use SecretKeyError as E;
        match e {
            E::BadName(_)
            | E::BadType(_)
            | E::BadValue(_)
            | E::BadQuery { .. }
            | E::WrongUse { .. }
            | E::BadField { .. }
            | E::Decrypt(_)
            | E::Verify(_) => ApiError::BadRequest(e.to_string()),
            E::NotFound { .. } => ApiError::NotFound(e.to_string()),
            E::TooOld { .. } | E::Contended(_) => ApiError::Conflict(e.to_string()),
            E::Secrets(s) => s.into(),
            E::Store(s) => s.into(),
            E::Unseal { .. } | E::Record { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

/// One key as stored: the material sealed under the install key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredKey {
    #[serde(rename = "type")]
    pub kind: String,
    /// Base64 12-byte nonce.
    pub nonce: String,
    /// Base64 ChaCha20-Poly1305 ciphertext of the material; AAD binds app, name, type.
    pub sealed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<Vec<u8>>,
    pub created_at: String,
    pub updated_at: String,
}

/// `secretkeys/{app}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SecretKeysRecord {
    pub schema: u32,
    pub version: u64,
    pub keys: BTreeMap<String, StoredKey>,
}

/// Bytes in a request: a JSON array of integers (Fly's document) or a base64 string
/// (Go's encoding of `[]byte`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ByteField(pub Vec<u8>);

impl<'de> Deserialize<'de> for ByteField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            List(Vec<u8>),
            Text(String),
        }
        match Option::<Either>::deserialize(d)? {
            None => Ok(ByteField(Vec::new())),
            Some(Either::List(v)) => Ok(ByteField(v)),
            Some(Either::Text(s)) => B64.decode(s.trim()).map(ByteField).map_err(|_| {
                serde::de::Error::custom("expected an array of bytes (0-255) or a base64 string")
            }),
        }
    }
}

impl Serialize for ByteField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Fly's `SecretKey`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretKey {
    pub name: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<Vec<u8>>,
    pub created_at: String,
    pub updated_at: String,
}

/// Fly's `SecretKeys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretKeys {
    pub secret_keys: Vec<SecretKey>,
}

/// Fly's `SetSecretkeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SetSecretkeyRequest {
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[schema(value_type = Option<Vec<u8>>)]
    pub value: ByteField,
}

/// Fly's `SetSecretkeyResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetSecretkeyResponse {
    pub name: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<Vec<u8>>,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
    /// DEPRECATED (same as `version`).
    #[serde(rename = "Version")]
    #[schema(rename = "Version")]
    pub version_deprecated: u64,
}

/// Fly's `DeleteSecretkeyResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeleteSecretkeyResponse {
    pub version: u64,
    /// DEPRECATED (same as `version`).
    #[serde(rename = "Version")]
    #[schema(rename = "Version")]
    pub version_deprecated: u64,
}

/// Fly's `EncryptSecretkeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EncryptSecretkeyRequest {
    #[schema(value_type = Option<Vec<u8>>)]
    pub plaintext: ByteField,
    #[schema(value_type = Option<Vec<u8>>)]
    pub associated_data: ByteField,
}

/// Fly's `EncryptSecretkeyResponse`: nonce (or ephemeral key) ‖ ciphertext.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EncryptSecretkeyResponse {
    pub ciphertext: Vec<u8>,
}

/// Fly's `DecryptSecretkeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct DecryptSecretkeyRequest {
    #[schema(value_type = Option<Vec<u8>>)]
    pub ciphertext: ByteField,
    #[schema(value_type = Option<Vec<u8>>)]
    pub associated_data: ByteField,
}

/// Fly's `DecryptSecretkeyResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecryptSecretkeyResponse {
    pub plaintext: Vec<u8>,
}

/// Fly's `SignSecretkeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SignSecretkeyRequest {
    #[schema(value_type = Option<Vec<u8>>)]
    pub plaintext: ByteField,
}

/// Fly's `SignSecretkeyResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SignSecretkeyResponse {
    pub signature: Vec<u8>,
}

/// Fly's `VerifySecretkeyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct VerifySecretkeyRequest {
    #[schema(value_type = Option<Vec<u8>>)]
    pub plaintext: ByteField,
    #[schema(value_type = Option<Vec<u8>>)]
    pub signature: ByteField,
}

// ---- crypto ---------------------------------------------------------------------

/// XAES-256-GCM (C2SP): a 24-byte nonce; the first 12 bytes derive a per-message
/// AES-256 key through a CMAC-style KDF, the last 12 are the GCM nonce.
mod xaes {
    use aes::Aes256;
    use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

    pub fn derive_key(key: &[u8; 32], nonce: &[u8; 24]) -> [u8; 32] {
        let c = Aes256::new(GenericArray::from_slice(key));
        let mut l = GenericArray::from([0u8; 16]);
        c.encrypt_block(&mut l);
        let mut k1 = [0u8; 16];
        for i in 0..16 {
            let carry = if i < 15 { l[i + 1] >> 7 } else { 0 };
            k1[i] = (l[i] << 1) | carry;
        }
        k1[15] ^= 0x87 * (l[0] >> 7);
        let mut out = [0u8; 32];
        for (half, counter) in [(0usize, 1u8), (1, 2)] {
            let mut m = [0u8; 16];
            m[1] = counter;
            m[2] = b'X';
            m[4..].copy_from_slice(&nonce[..12]);
            for (b, k) in m.iter_mut().zip(k1) {
                *b ^= k;
            }
            let mut block = GenericArray::from(m);
            c.encrypt_block(&mut block);
            out[half * 16..half * 16 + 16].copy_from_slice(&block);
        }
        out
    }
}

type Hs256 = Hmac<sha2::Sha256>;
type Hs384 = Hmac<sha2::Sha384>;
type Hs512 = Hmac<sha2::Sha512>;

fn mac(kind: KeyType, key: &[u8], msg: &[u8]) -> Vec<u8> {
    fn run<M: Mac + KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length.
        let mut m = <M as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
        m.update(msg);
        m.finalize().into_bytes().to_vec()
    }
    match kind {
        KeyType::Hs256 => run::<Hs256>(key, msg),
        KeyType::Hs384 => run::<Hs384>(key, msg),
        // NaCl's crypto_auth is HMAC-SHA-512 truncated to 32 bytes.
        KeyType::NaclAuth => run::<Hs512>(key, msg)[..32].to_vec(),
        _ => run::<Hs512>(key, msg),
    }
}

fn key32(secret: &[u8]) -> Result<[u8; 32], String> {
    secret
        .try_into()
        .map_err(|_| format!("stored key has {} bytes, not 32", secret.len()))
}

/// Encrypts with key material `secret` of type `kind`. Errors are the user's (the
/// field and why), except a corrupt stored key.
pub fn encrypt(
    kind: KeyType,
    secret: &[u8],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, (&'static str, String)> {
    let internal = |m: String| ("key", m);
    match kind {
        KeyType::Xaes256gcm => {
            let mut nonce = [0u8; 24];
            OsRng.fill_bytes(&mut nonce);
            let k = xaes::derive_key(&key32(secret).map_err(internal)?, &nonce);
            let ct = Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&k))
                .encrypt(
                    aes_gcm::Nonce::from_slice(&nonce[12..]),
                    Payload {
                        msg: plaintext,
                        aad,
                    },
                )
                .map_err(|_| ("plaintext", "too long to encrypt".to_string()))?;
            Ok([nonce.as_slice(), &ct].concat())
        }
        KeyType::NaclSecretbox => {
            no_aad(aad, kind)?;
            use crypto_secretbox::XSalsa20Poly1305;
            let c = XSalsa20Poly1305::new(crypto_secretbox::Key::from_slice(
                &key32(secret).map_err(internal)?,
            ));
            let nonce = XSalsa20Poly1305::generate_nonce(&mut OsRng);
            let ct = c
                .encrypt(&nonce, plaintext)
                .map_err(|_| ("plaintext", "too long to encrypt".to_string()))?;
            Ok([nonce.as_slice(), &ct].concat())
        }
        KeyType::NaclBox => {
            no_aad(aad, kind)?;
            let sk = crypto_box::SecretKey::from(key32(secret).map_err(internal)?);
            sk.public_key()
                .seal(&mut OsRng, plaintext)
                .map_err(|_| ("plaintext", "too long to encrypt".to_string()))
        }
        _ => Err(("type", format!("{} keys cannot encrypt", kind.name()))),
    }
}

fn no_aad(aad: &[u8], kind: KeyType) -> Result<(), (&'static str, String)> {
    if aad.is_empty() {
        Ok(())
    } else {
        Err((
            "associated_data",
            format!("{} keys take no associated data", kind.name()),
        ))
    }
}

/// Decrypts what [`encrypt`] made; `None` when the ciphertext does not open.
pub fn decrypt(
    kind: KeyType,
    secret: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Option<Vec<u8>>, (&'static str, String)> {
    let internal = |m: String| ("key", m);
    match kind {
        KeyType::Xaes256gcm => {
            if ciphertext.len() < 24 + 16 {
                return Ok(None);
            }
            let nonce: [u8; 24] = ciphertext[..24]
                .try_into()
                .map_err(|_| internal("".into()))?;
            let k = xaes::derive_key(&key32(secret).map_err(internal)?, &nonce);
            Ok(Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&k))
                .decrypt(
                    aes_gcm::Nonce::from_slice(&nonce[12..]),
                    Payload {
                        msg: &ciphertext[24..],
                        aad,
                    },
                )
                .ok())
        }
        KeyType::NaclSecretbox => {
            no_aad(aad, kind)?;
            use crypto_secretbox::XSalsa20Poly1305;
            if ciphertext.len() < 24 + 16 {
                return Ok(None);
            }
            let c = XSalsa20Poly1305::new(crypto_secretbox::Key::from_slice(
                &key32(secret).map_err(internal)?,
            ));
            Ok(c.decrypt(
                crypto_secretbox::Nonce::from_slice(&ciphertext[..24]),
                &ciphertext[24..],
            )
            .ok())
        }
        KeyType::NaclBox => {
            no_aad(aad, kind)?;
            let sk = crypto_box::SecretKey::from(key32(secret).map_err(internal)?);
            Ok(sk.unseal(ciphertext).ok())
        }
        _ => Err(("type", format!("{} keys cannot decrypt", kind.name()))),
    }
}

/// Signs (or MACs) `msg`.
pub fn sign(kind: KeyType, secret: &[u8], msg: &[u8]) -> Result<Vec<u8>, String> {
    match kind {
        KeyType::NaclSign => {
            use ed25519_dalek::Signer;
            let sk = ed25519_dalek::SigningKey::from_bytes(&key32(secret)?);
            Ok(sk.sign(msg).to_bytes().to_vec())
        }
        KeyType::Hs256 | KeyType::Hs384 | KeyType::Hs512 | KeyType::NaclAuth => {
            Ok(mac(kind, secret, msg))
        }
        _ => Err(format!("{} keys cannot sign", kind.name())),
    }
}

/// Checks a signature (constant time for MACs).
pub fn verify(kind: KeyType, secret: &[u8], msg: &[u8], sig: &[u8]) -> Result<bool, String> {
    match kind {
        KeyType::NaclSign => {
            let sk = ed25519_dalek::SigningKey::from_bytes(&key32(secret)?);
            let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
                return Ok(false);
            };
            Ok(sk.verifying_key().verify_strict(msg, &sig).is_ok())
        }
        KeyType::Hs256 | KeyType::Hs384 | KeyType::Hs512 | KeyType::NaclAuth => {
            Ok(crate::auth::ct_eq(&mac(kind, secret, msg), sig))
        }
        _ => Err(format!("{} keys cannot verify", kind.name())),
    }
}

// ---- storage --------------------------------------------------------------------

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn seal_aad(app: &str, name: &str, kind: &str) -> String {
    format!("aloft-secretkey\0{app}\0{name}\0{kind}")
}

fn seal_material(
    install: &[u8; 32],
    app: &str,
    name: &str,
    kind: KeyType,
    material: &[u8],
) -> Result<(String, String), SecretKeyError> {
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = seal_aad(app, name, kind.name());
    let ct = ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(install))
        .encrypt(
            &nonce,
            Payload {
                msg: material,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| SecretKeyError::Unseal {
            app: app.to_string(),
            name: name.to_string(),
        })?;
    Ok((B64.encode(nonce), B64.encode(ct)))
}

fn unseal(
    install: &[u8; 32],
    app: &str,
    name: &str,
    k: &StoredKey,
) -> Result<Vec<u8>, SecretKeyError> {
    let bad = || SecretKeyError::Unseal {
        app: app.to_string(),
        name: name.to_string(),
    };
    let nonce = B64.decode(&k.nonce).map_err(|_| bad())?;
    if nonce.len() != 12 {
        return Err(bad());
    }
    let ct = B64.decode(&k.sealed).map_err(|_| bad())?;
    let aad = seal_aad(app, name, &k.kind);
    ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(install))
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ct,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| bad())
}

async fn load(state: &ApiState, app: &str) -> Result<(SecretKeysRecord, Expect), SecretKeyError> {
    match state.store().get(&secretkeys_key(app)).await? {
        None => Ok((
            SecretKeysRecord {
                schema: aloft_types::catalog::SCHEMA_VERSION,
                ..Default::default()
            },
            Expect::Absent,
        )),
        Some(e) => {
            let rec = serde_json::from_slice(&e.value).map_err(|err| SecretKeyError::Record {
                app: app.to_string(),
                message: err.to_string(),
            })?;
            Ok((rec, Expect::Revision(e.revision)))
        }
    }
}

/// Applies `change` to the record with compare-and-set, retrying on a concurrent write.
async fn modify<T>(
    state: &ApiState,
    app: &str,
    mut change: impl FnMut(&mut SecretKeysRecord) -> Result<T, SecretKeyError>,
) -> Result<(T, u64), SecretKeyError> {
    for _ in 0..16 {
        let (mut rec, expect) = load(state, app).await?;
        let out = change(&mut rec)?;
        rec.version += 1;
        let bytes = serde_json::to_vec(&rec).map_err(|e| SecretKeyError::Record {
            app: app.to_string(),
            message: e.to_string(),
        })?;
        match state
            .store()
            .put_if(&secretkeys_key(app), bytes, expect)
            .await
        {
            Ok(_) => return Ok((out, rec.version)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SecretKeyError::Contended(app.to_string()))
}

fn shown(name: &str, k: &StoredKey) -> SecretKey {
    SecretKey {
        name: name.to_string(),
        kind: k.kind.clone(),
        public_key: k.public_key.clone(),
        created_at: k.created_at.clone(),
        updated_at: k.updated_at.clone(),
    }
}

fn min_version(q: &QueryPairs, app: &str, rec: &SecretKeysRecord) -> Result<(), SecretKeyError> {
    let Some(v) = q.get("min_version").filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let wanted: u64 = v.parse().map_err(|_| SecretKeyError::BadQuery {
        param: "min_version",
        reason: format!("{v:?} is not a version number"),
    })?;
    if rec.version < wanted {
        return Err(SecretKeyError::TooOld {
            app: app.to_string(),
            current: rec.version,
            wanted,
        });
    }
    Ok(())
}

/// A key's type and unsealed material, checked against `min_version`.
async fn material(
    state: &ApiState,
    app: &str,
    name: &str,
    q: &QueryPairs,
) -> Result<(KeyType, Vec<u8>), SecretKeyError> {
    let (rec, _) = load(state, app).await?;
    min_version(q, app, &rec)?;
    let k = rec.keys.get(name).ok_or_else(|| SecretKeyError::NotFound {
        app: app.to_string(),
        name: name.to_string(),
    })?;
    let kind = KeyType::parse(&k.kind).ok_or_else(|| SecretKeyError::Record {
        app: app.to_string(),
        message: format!("key {name:?} has unknown type {:?}", k.kind),
    })?;
    let install = state.secrets_key().await?;
    Ok((kind, unseal(&install, app, name, k)?))
}

/// The catalog keys to delete with the app.
pub async fn app_keys(state: &ApiState, app: &str) -> Result<Vec<String>, StoreError> {
    let key = secretkeys_key(app);
    Ok(state
        .store()
        .get(&key)
        .await?
        .map(|_| key)
        .into_iter()
        .collect())
}

fn check_name(name: &str) -> Result<(), SecretKeyError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(SecretKeyError::BadName(name.to_string()))
    }
}

async fn store_key(
    state: &ApiState,
    app: &str,
    name: &str,
    kind: KeyType,
    material: Vec<u8>,
) -> Result<SetSecretkeyResponse, SecretKeyError> {
    let install = state.secrets_key().await?;
    let public_key = kind.public_key(&material);
    let (nonce, sealed) = seal_material(&install, app, name, kind, &material)?;
    let (stored, version) = modify(state, app, |rec| {
        let now = now_rfc3339();
        let created_at = rec
            .keys
            .get(name)
            .map_or_else(|| now.clone(), |k| k.created_at.clone());
        let k = StoredKey {
            kind: kind.name().to_string(),
            nonce: nonce.clone(),
            sealed: sealed.clone(),
            public_key: public_key.clone(),
            created_at,
            updated_at: now,
        };
        rec.keys.insert(name.to_string(), k.clone());
        Ok(k)
    })
    .await?;
    Ok(SetSecretkeyResponse {
        name: name.to_string(),
        kind: stored.kind,
        public_key: stored.public_key,
        created_at: stored.created_at,
        updated_at: stored.updated_at,
        version,
        version_deprecated: version,
    })
}

fn parse_type(s: &str) -> Result<KeyType, SecretKeyError> {
    KeyType::parse(s).ok_or_else(|| SecretKeyError::BadType(s.to_string()))
}

// ---- handlers -------------------------------------------------------------------

#[utoipa::path(get, path = "/apps/{app_name}/secretkeys", tag = "Secrets", operation_id = "Secretkeys_list",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return"),
        ("types" = Option<String>, Query, description = "Comma-separated list of secret key types to list")),
    responses((status = 200, description = "OK (public keys only)", body = SecretKeys),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> Result<Json<SecretKeys>, ApiError> {
    let (rec, _) = load(&state, &app).await?;
    min_version(&q, &app, &rec)?;
    let types = q
        .get("types")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            KeyType::parse(t).ok_or_else(|| SecretKeyError::BadQuery {
                param: "types",
                reason: format!("{t:?} is not one of {}", type_list()),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(SecretKeys {
        secret_keys: rec
            .keys
            .iter()
            .filter(|(_, k)| {
                types.is_empty() || KeyType::parse(&k.kind).is_some_and(|t| types.contains(&t))
            })
            .map(|(n, k)| shown(n, k))
            .collect(),
    }))
}

#[utoipa::path(get, path = "/apps/{app_name}/secretkeys/{secret_name}", tag = "Secrets", operation_id = "Secretkey_get",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return")),
    responses((status = 200, description = "OK", body = SecretKey),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn show(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    q: QueryPairs,
) -> Result<Json<SecretKey>, ApiError> {
    let (rec, _) = load(&state, &app).await?;
    min_version(&q, &app, &rec)?;
    let k = rec
        .keys
        .get(&name)
        .ok_or_else(|| SecretKeyError::NotFound {
            app: app.clone(),
            name: name.clone(),
        })?;
    Ok(Json(shown(&name, k)))
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}", tag = "Secrets", operation_id = "Secretkey_set",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name")),
    request_body(content = SetSecretkeyRequest, description = "Create secret key request"),
    responses((status = 201, description = "Created", body = SetSecretkeyResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn set(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetSecretkeyRequest>,
) -> Result<(StatusCode, Json<SetSecretkeyResponse>), ApiError> {
    check_name(&name)?;
    let kind = parse_type(&req.kind)?;
    if req.value.0.is_empty() {
        return Err(
            SecretKeyError::BadValue("required (use /generate for a random key)".into()).into(),
        );
    }
    let material = kind
        .check_material(&req.value.0)
        .map_err(SecretKeyError::BadValue)?;
    let out = store_key(&state, &app, &name, kind, material).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}/generate", tag = "Secrets", operation_id = "Secretkey_generate",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name")),
    request_body(content = SetSecretkeyRequest, description = "generate secret key request"),
    responses((status = 201, description = "Created", body = SetSecretkeyResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn generate(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetSecretkeyRequest>,
) -> Result<(StatusCode, Json<SetSecretkeyResponse>), ApiError> {
    check_name(&name)?;
    let kind = parse_type(&req.kind)?;
    if !req.value.0.is_empty() {
        return Err(SecretKeyError::BadValue(
            "must be empty when generating a key (use POST …/secretkeys/{name} to set one)".into(),
        )
        .into());
    }
    let mut material = vec![0u8; kind.generated_len()];
    OsRng.fill_bytes(&mut material);
    let out = store_key(&state, &app, &name, kind, material).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(delete, path = "/apps/{app_name}/secretkeys/{secret_name}", tag = "Secrets", operation_id = "Secretkey_delete",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name")),
    responses((status = 200, description = "OK", body = DeleteSecretkeyResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn delete(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<DeleteSecretkeyResponse>, ApiError> {
    let ((), version) = modify(&state, &app, |rec| {
        rec.keys
            .remove(&name)
            .map(|_| ())
            .ok_or_else(|| SecretKeyError::NotFound {
                app: app.clone(),
                name: name.clone(),
            })
    })
    .await?;
    Ok(Json(DeleteSecretkeyResponse {
        version,
        version_deprecated: version,
    }))
}

/// [`material`] of a key that can do `op` (of `usage`); a key of another kind is the
/// caller's mistake, named.
async fn material_for(
    state: &ApiState,
    app: &str,
    name: &str,
    q: &QueryPairs,
    usage: Use,
    op: &'static str,
) -> Result<(KeyType, Vec<u8>), SecretKeyError> {
    let (kind, secret) = material(state, app, name, q).await?;
    if kind.usage() != usage {
        return Err(SecretKeyError::WrongUse {
            name: name.to_string(),
            kind: kind.name(),
            op,
        });
    }
    Ok((kind, secret))
}

fn field_err(app: &str, name: &str, (field, reason): (&'static str, String)) -> SecretKeyError {
    if field == "key" {
        SecretKeyError::Unseal {
            app: app.to_string(),
            name: format!("{name} ({reason})"),
        }
    } else {
        SecretKeyError::BadField { field, reason }
    }
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}/encrypt", tag = "Secrets", operation_id = "Secretkey_encrypt",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return")),
    request_body(content = EncryptSecretkeyRequest, description = "Encrypt with secret key request"),
    responses((status = 200, description = "OK", body = EncryptSecretkeyResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn encrypt_handler(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(req): JsonBody<EncryptSecretkeyRequest>,
) -> Result<Json<EncryptSecretkeyResponse>, ApiError> {
    let (kind, secret) = material_for(&state, &app, &name, &q, Use::Encrypt, "encrypt").await?;
    let ciphertext = encrypt(kind, &secret, &req.plaintext.0, &req.associated_data.0)
        .map_err(|e| field_err(&app, &name, e))?;
    Ok(Json(EncryptSecretkeyResponse { ciphertext }))
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}/decrypt", tag = "Secrets", operation_id = "Secretkey_decrypt",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return")),
    request_body(content = DecryptSecretkeyRequest, description = "Decrypt with secret key request"),
    responses((status = 200, description = "OK", body = DecryptSecretkeyResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn decrypt_handler(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(req): JsonBody<DecryptSecretkeyRequest>,
) -> Result<Json<DecryptSecretkeyResponse>, ApiError> {
    let (kind, secret) = material_for(&state, &app, &name, &q, Use::Encrypt, "decrypt").await?;
    let plaintext = decrypt(kind, &secret, &req.ciphertext.0, &req.associated_data.0)
        .map_err(|e| field_err(&app, &name, e))?
        .ok_or_else(|| SecretKeyError::Decrypt(name.clone()))?;
    Ok(Json(DecryptSecretkeyResponse { plaintext }))
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}/sign", tag = "Secrets", operation_id = "Secretkey_sign",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return")),
    request_body(content = SignSecretkeyRequest, description = "Sign with secret key request"),
    responses((status = 200, description = "OK", body = SignSecretkeyResponse),
        (status = 400, description = "Bad Request", body = ErrorResponse)))]
pub async fn sign_handler(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(req): JsonBody<SignSecretkeyRequest>,
) -> Result<Json<SignSecretkeyResponse>, ApiError> {
    let (kind, secret) = material_for(&state, &app, &name, &q, Use::Sign, "sign").await?;
    let signature =
        sign(kind, &secret, &req.plaintext.0).map_err(|m| field_err(&app, &name, ("key", m)))?;
    Ok(Json(SignSecretkeyResponse { signature }))
}

#[utoipa::path(post, path = "/apps/{app_name}/secretkeys/{secret_name}/verify", tag = "Secrets", operation_id = "Secretkey_verify",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("secret_name" = String, Path, description = "Secret key name"),
        ("min_version" = Option<String>, Query, description = "Minimum secrets version to return")),
    request_body(content = VerifySecretkeyRequest, description = "Verify with secret key request"),
    responses((status = 204, description = "No Content (the signature is valid)"),
        (status = 400, description = "Bad Request (invalid signature)", body = ErrorResponse)))]
pub async fn verify_handler(
    State(state): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(req): JsonBody<VerifySecretkeyRequest>,
) -> Result<StatusCode, ApiError> {
    let (kind, secret) = material_for(&state, &app, &name, &q, Use::Sign, "verify").await?;
    let ok = verify(kind, &secret, &req.plaintext.0, &req.signature.0)
        .map_err(|m| field_err(&app, &name, ("key", m)))?;
    if ok {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(SecretKeyError::Verify(name).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xaes_matches_c2sp_vectors() {
        let key = [1u8; 32];
        let nonce: [u8; 24] = *b"ABCDEFGHIJKLMNOPQRSTUVWX";
        let k = xaes::derive_key(&key, &nonce);
        let ct = Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&k))
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce[12..]),
                &b"XAES-256-GCM"[..],
            )
            .unwrap();
        assert_eq!(
            hex::encode(ct),
            "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"
        );
        let key = [3u8; 32];
        let k = xaes::derive_key(&key, &nonce);
        let ct = Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&k))
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce[12..]),
                Payload {
                    msg: b"XAES-256-GCM",
                    aad: b"c2sp.org/XAES-256-GCM",
                },
            )
            .unwrap();
        assert_eq!(
            hex::encode(ct),
            "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"
        );
    }

    #[test]
    fn hmac_sha256_rfc4231_case_2() {
        let tag = mac(KeyType::Hs256, b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn every_type_round_trips_and_rejects_tampering() {
        for kind in ALL_TYPES {
            let mut secret = vec![0u8; kind.generated_len()];
            OsRng.fill_bytes(&mut secret);
            match kind.usage() {
                Use::Encrypt => {
                    let aad: &[u8] = if kind == KeyType::Xaes256gcm {
                        b"ctx"
                    } else {
                        b""
                    };
                    let ct = encrypt(kind, &secret, b"hello", aad).unwrap();
                    assert_eq!(
                        decrypt(kind, &secret, &ct, aad).unwrap().as_deref(),
                        Some(&b"hello"[..]),
                        "{kind:?}"
                    );
                    let mut bad = ct.clone();
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    assert_eq!(decrypt(kind, &secret, &bad, aad).unwrap(), None, "{kind:?}");
                    assert!(sign(kind, &secret, b"x").is_err());
                }
                Use::Sign => {
                    let sig = sign(kind, &secret, b"hello").unwrap();
                    assert!(verify(kind, &secret, b"hello", &sig).unwrap(), "{kind:?}");
                    assert!(!verify(kind, &secret, b"hellp", &sig).unwrap(), "{kind:?}");
                    assert!(encrypt(kind, &secret, b"x", b"").is_err());
                }
            }
        }
    }

    #[test]
    fn nacl_sign_public_key_verifies_outside() {
        let seed = [9u8; 32];
        let pk = KeyType::NaclSign.public_key(&seed).unwrap();
        let sig = sign(KeyType::NaclSign, &seed, b"msg").unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk.try_into().unwrap()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        vk.verify_strict(b"msg", &sig).unwrap();
        // NaCl's 64-byte form is accepted only with the matching public half.
        let mut full = seed.to_vec();
        full.extend(KeyType::NaclSign.public_key(&seed).unwrap());
        assert_eq!(KeyType::NaclSign.check_material(&full).unwrap(), seed);
        full[40] ^= 1;
        assert!(KeyType::NaclSign.check_material(&full).is_err());
    }

    #[test]
    fn byte_fields_take_lists_and_base64() {
        let r: EncryptSecretkeyRequest =
            serde_json::from_str(r#"{"plaintext":[104,105],"associated_data":"aGk="}"#).unwrap();
        assert_eq!(r.plaintext.0, b"hi");
        assert_eq!(r.associated_data.0, b"hi");
        assert!(serde_json::from_str::<EncryptSecretkeyRequest>(r#"{"plaintext":[300]}"#).is_err());
        assert!(serde_json::from_str::<EncryptSecretkeyRequest>(r#"{"plaintext":"%%"}"#).is_err());
    }
}
