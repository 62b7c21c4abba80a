//! The one error type handlers return, and its JSON rendering: always
//! `{"error": "...", "status": "..."}` with the status code the mistake deserves.

use aloft_agent::AgentError;
use aloft_store::StoreError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An API failure, by the HTTP status it maps to. Each message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NameTaken(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Internal(String),
}

/// Fly's `ErrorResponse`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    /// `unknown`, `insufficient_capacity` or `name_taken`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::NameTaken(_) => StatusCode::CONFLICT,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Capacity(_) | ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Capacity(_) => Some("insufficient_capacity"),
            ApiError::NameTaken(_) => Some("name_taken"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(msg) = &self {
            tracing::error!(error = %msg, "internal API error");
        }
        let body = ErrorResponse {
            error: self.to_string(),
            status: self.code().map(str::to_string),
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::NotFound { .. } => ApiError::NotFound(msg),
            AgentError::Invalid { .. } => ApiError::BadRequest(msg),
            AgentError::Conflict(_) => ApiError::Conflict(msg),
            AgentError::WaitTimeout { .. } => ApiError::Timeout(msg),
            AgentError::Capacity { .. } => ApiError::Capacity(msg),
            AgentError::Internal(_) => ApiError::Internal(msg),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Keys are built from ids in the path: an id no key can hold names nothing.
            StoreError::InvalidKey { key, reason } => {
                ApiError::NotFound(format!("no such item {key:?} ({reason})"))
            }
            other => ApiError::Internal(format!("catalog: {other}")),
        }
    }
}
