//! API errors: one enum, a stable `code` for each case, mapped to HTTP in one exhaustive match.
//! The body is `{"error": {"code": "...", "message": "..."}}` and the message says what to do.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "missing or invalid bearer token; pass `Authorization: Bearer <token>` (the first admin token is in the data directory's admin.token)"
    )]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A malformed or invalid request; `code` names the mistake.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request is valid but the resource's state forbids it.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("range not satisfiable: the image has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("no route for {0}; see the API reference in README.md")]
    NoRoute(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// Something on the server side failed (disk, catalog); the request may be retried.
    #[error("internal error: {0}")]
    Internal(String),
    /// A stored block no longer matches its hash: asking again returns the same bad bytes, so
    /// clients stop (code `block_corrupt`) instead of retrying a transient 500.
    #[error("{0}")]
    Corrupt(String),
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn image_not_found(id: impl std::fmt::Display) -> Self {
        ApiError::NotFound(format!(
            "image {id} not found (or not visible to your project)"
        ))
    }

    /// The stable code and HTTP status of this error.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        match self {
            ApiError::Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            ApiError::Forbidden(_) => ("forbidden", StatusCode::FORBIDDEN),
            ApiError::NotFound(_) => ("not_found", StatusCode::NOT_FOUND),
            ApiError::BadRequest { code, .. } => (code, StatusCode::BAD_REQUEST),
            ApiError::Conflict { code, .. } => (code, StatusCode::CONFLICT),
            ApiError::TooLarge(_) => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            ApiError::RangeNotSatisfiable { .. } => {
                ("range_not_satisfiable", StatusCode::RANGE_NOT_SATISFIABLE)
            }
            ApiError::NoRoute(_) => ("no_route", StatusCode::NOT_FOUND),
            ApiError::MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            ApiError::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
            ApiError::Corrupt(_) => ("block_corrupt", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        if status.is_server_error() {
            tracing::error!(code, "{self}");
        }
        let mut response = (
            status,
            Json(json!({"error": {"code": code, "message": self.to_string()}})),
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"kagami\""),
            );
        }
        if let ApiError::RangeNotSatisfiable { size } = self
            && let Ok(value) = format!("bytes */{size}").parse()
        {
            response
                .headers_mut()
                .insert(axum::http::header::CONTENT_RANGE, value);
        }
        response
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(format!("I/O: {e}"))
    }
}
