//! Request extractors whose failures are JSON errors naming the field: a JSON body
//! (required or optional) and the raw query pairs (repeatable keys, `metadata.*`).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use crate::error::ApiError;

/// A required JSON body. Unknown fields are ignored unless the type refuses them;
/// a body that is not JSON, or has a wrong type, is a 400 naming the field.
pub struct JsonBody<T>(pub T);

/// An optional JSON body: empty means `T::default()`.
pub struct OptJsonBody<T>(pub T);

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every request body of the API is an object; serde would also take a list.
    if let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace())
        && *first == b'['
    {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected an object, found a list".into(),
        ));
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?;
    // Like Fly, ignore fields we do not know (some shapes refuse them): drop each one
    // the decoder names and decode again.
    for _ in 0..MAX_IGNORED_FIELDS {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let path = e.path().to_string();
                let segments: Vec<Segment> = e.path().iter().cloned().collect();
                let inner = e.into_inner();
                if inner.to_string().starts_with("unknown field `")
                    && remove_at(&mut value, &segments)
                {
                    tracing::debug!(field = %path, "ignoring unknown field in request body");
                    continue;
                }
                return Err(if path == "." {
                    ApiError::BadRequest(format!("invalid JSON body: {inner}"))
                } else {
                    ApiError::BadRequest(format!("invalid field `{path}`: {inner}"))
                });
            }
        }
    }
    Err(ApiError::BadRequest(format!(
        "request body has more than {MAX_IGNORED_FIELDS} unknown fields"
    )))
}

/// How many unknown fields one body may carry before it is refused.
const MAX_IGNORED_FIELDS: usize = 64;

/// Removes the object member `path` names (its last segment is the key).
fn remove_at(value: &mut serde_json::Value, path: &[Segment]) -> bool {
    let Some((Segment::Map { key }, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match (seg, cur) {
            (Segment::Map { key }, serde_json::Value::Object(m)) => match m.get_mut(key) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Seq { index }, serde_json::Value::Array(a)) => match a.get_mut(*index) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    cur.as_object_mut()
        .is_some_and(|m| m.remove(key.as_str()).is_some())
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest(
                "a JSON request body is required".into(),
            ));
        }
        parse(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptJsonBody(T::default()));
        }
        parse(&bytes).map(OptJsonBody)
    }
}

/// The query string as decoded pairs, in order.
#[derive(Debug, Default)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        Ok(QueryPairs(
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl QueryPairs {
    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, comma-separated values split, empty ones dropped.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// A boolean parameter (`true`/`false`/`1`/`0`; present without value = true).
    pub fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("" | "true" | "1" | "True" | "TRUE") => Ok(true),
            Some("false" | "0" | "False" | "FALSE") => Ok(false),
            Some(v) => Err(ApiError::BadRequest(format!(
                "invalid query parameter `{name}`: {v:?} is not a boolean"
            ))),
        }
    }

    /// A non-negative integer parameter.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::BadRequest(format!(
                    "invalid query parameter `{name}`: {v:?} is not a non-negative integer"
                ))
            }),
        }
    }
}
