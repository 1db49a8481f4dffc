//! The HTTP API under `/v1`: thin axum handlers, one module per resource. Extractors turn a
//! request into typed values (or a JSON error with a stable code); handlers call the catalog,
//! the ingest path or the reader and shape the response.

mod admin;
mod agent;
mod blocks;
mod boot;
mod exports;
mod formats;
mod hosts;
mod images;
mod jobs;

pub use admin::StoreStats;
pub use exports::Exports;
pub use images::DIGEST_HEADER;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::catalog::Catalog;
use crate::catalog::iso::{self, IsoReader};
use crate::catalog::tenancy::{self, Caller};
use crate::config::Config;
use crate::error::ApiError;
use crate::store::PackStore;
use crate::stream::Reader;
use crate::stream::sessions::Sessions;

/// Everything a handler may reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub catalog: Catalog,
    pub store: Arc<PackStore>,
    pub reader: Reader,
    /// Wakes the import worker when a job is queued (it also polls, for jobs queued elsewhere).
    pub job_queued: Arc<tokio::sync::Notify>,
    /// The NBD and iSCSI sessions open now (`GET /v1/exports`).
    pub sessions: Sessions,
    /// Slots for uploads converted as they arrive (`import.upload_conversions`).
    pub upload_slots: Arc<tokio::sync::Semaphore>,
}

pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_json_bytes;
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .nest(
            "/v1",
            images::routes(&state.config)
                .merge(blocks::routes(&state.config))
                .merge(admin::routes(json_limit))
                .merge(formats::routes())
                .merge(exports::routes())
                .merge(jobs::routes())
                .merge(hosts::routes())
                .merge(agent::routes(&state.config)),
        )
        .merge(boot::routes())
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NoRoute(uri.path().chars().take(200).collect())
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// The authenticated caller, from `Authorization: Bearer <token>`.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let secret = bearer(parts)?;
        state
            .catalog
            .run(move |c| tenancy::authenticate(c, &secret))
            .await?
            .ok_or(ApiError::Unauthorized)
    }
}

/// The caller of a read that a client without headers makes (iPXE's `sanboot`): the bearer
/// token as usual, or failing that `?token=` in the URL — a project token, or the per-boot
/// token of a host's ISO boot (see the `/content` route for why; no other route accepts a token
/// in its URL, and this one takes no other parameter).
#[derive(Debug)]
pub enum UrlCaller {
    Token(Caller),
    /// An ISO boot's token: it may read its image only.
    IsoBoot(IsoReader),
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<AppState> for UrlCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ApiQuery(q) = ApiQuery::<TokenQuery>::from_request_parts(parts, state).await?;
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Ok(UrlCaller::Token(
                Caller::from_request_parts(parts, state).await?,
            ));
        }
        let secret = q
            .token
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(ApiError::Unauthorized)?;
        state
            .catalog
            .run(move |c| {
                if let Some(caller) = tenancy::authenticate(c, &secret)? {
                    return Ok(Some(UrlCaller::Token(caller)));
                }
                Ok(iso::authenticate(c, &secret)?.map(UrlCaller::IsoBoot))
            })
            .await?
            .ok_or(ApiError::Unauthorized)
    }
}

/// The bearer token of a request. The scheme name is case-insensitive (RFC 9110 §11.1).
pub(crate) fn bearer(parts: &Parts) -> Result<String, ApiError> {
    let secret = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, s)| s.trim().to_string())
        .ok_or(ApiError::Unauthorized)?;
    if secret.is_empty() || secret.len() > 256 {
        return Err(ApiError::Unauthorized);
    }
    Ok(secret)
}

/// An authenticated caller with the admin role. As an extractor it runs before the body is
/// read, so a member cannot make the server buffer an admin-only request's body.
#[derive(Debug)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require_admin()?;
        Ok(Admin(caller))
    }
}

/// The raw body, with a too-large body as an [`ApiError`] (limits come from the route's
/// `DefaultBodyLimit`).
#[derive(Debug)]
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(ApiBytes).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge("the body is larger than this endpoint accepts (limits.max_block_batch_bytes)".into())
            } else {
                ApiError::bad("invalid_body", e.body_text())
            }
        })
    }
}

/// `Json<T>` whose every rejection is an [`ApiError`] with a code.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonSyntaxError(e) => ApiError::bad(
            "malformed_json",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => ApiError::bad("invalid_body", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "send the body as JSON with `Content-Type: application/json`".into(),
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge("the JSON body is larger than limits.max_json_bytes".into())
        }
        other => ApiError::bad("invalid_body", other.body_text()),
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s with a code.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad("invalid_query", e.body_text()))
    }
}
