//! `/v1/blocks`: batched block transfer for agents, captures and region copies — never one
//! request per 64 KiB block. Bodies are binary: 32-byte ids back to back, or block frames.
//!
//! Admin only for now: answering "which blocks do you have?" across tenants would let one
//! project confirm another's content. Per-host agent tokens scoped to their task come with the
//! PXE work.

use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kagami_images::wire;

use super::agent::Agent;
use super::images::FRAMES_TYPE;
use super::{Admin, ApiBytes, AppState};
use crate::catalog::{blocks, hosts, now_ms};
use crate::config::Config;
use crate::error::ApiError;
use crate::ingest::{self, StoreStats};

/// Ids in one query; 32 bytes each (2 MiB), enough for a 4 GiB disk's blocks in one request.
const MAX_IDS: usize = 65536;
/// Blocks in one read; with 64 KiB blocks the answer stays under 64 MiB.
const MAX_READ: usize = 1024;

pub fn routes(config: &Config) -> Router<AppState> {
    Router::new()
        .route(
            "/blocks/missing",
            post(missing).layer(DefaultBodyLimit::max(MAX_IDS * 32)),
        )
        .route(
            "/blocks/read",
            post(read).layer(DefaultBodyLimit::max(MAX_READ * 32)),
        )
        .route(
            "/blocks",
            post(upload).layer(DefaultBodyLimit::max(config.limits.max_block_batch_bytes)),
        )
}

fn ids_body(body: &[u8], max: usize) -> Result<Vec<kagami_images::BlockId>, ApiError> {
    let ids = wire::decode_ids(body).ok_or_else(|| {
        ApiError::bad(
            "invalid_ids",
            "the body must be 32-byte block ids back to back",
        )
    })?;
    if ids.len() > max {
        return Err(ApiError::TooLarge(format!("at most {max} ids per request")));
    }
    Ok(ids)
}

fn binary(body: Vec<u8>, content_type: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// `POST /v1/blocks/missing`: which of these ids does the store lack? Answers the missing ids.
/// Who may ask for missing blocks and upload blocks: an admin, or an agent while it captures
/// its host (its per-boot token; block ids reveal content, so members may not).
#[derive(Debug)]
pub struct BlockWriter;

impl FromRequestParts<AppState> for BlockWriter {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Admin::from_request_parts(parts, state).await {
            Ok(_) => Ok(BlockWriter),
            Err(ApiError::Unauthorized) => {
                let Agent(agent) = Agent::from_request_parts(parts, state).await?;
                state
                    .catalog
                    .run(move |c| hosts::agents_capture(c, &agent))
                    .await?;
                Ok(BlockWriter)
            }
            Err(e) => Err(e),
        }
    }
}

async fn missing(
    State(app): State<AppState>,
    _: BlockWriter,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let ids = ids_body(&body, MAX_IDS)?;
    let now = now_ms();
    let missing = app
        .catalog
        .run(move |c| blocks::find_missing(c, &ids, now))
        .await?;
    Ok(binary(
        wire::encode_ids(&missing),
        "application/octet-stream",
    ))
}

/// `POST /v1/blocks`: stores a body of block frames; every block is re-hashed first.
async fn upload(
    State(app): State<AppState>,
    _: BlockWriter,
    ApiBytes(body): ApiBytes,
) -> Result<Json<StoreStats>, ApiError> {
    let stats = tokio::task::spawn_blocking(move || {
        let frames = wire::decode_frames(&body)
            .map_err(|e| ApiError::bad("invalid_frame", e.to_string()))?;
        ingest::store_blocks(&app.catalog, &app.store, &frames)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("block upload failed: {e}")))??;
    Ok(Json(stats))
}

/// `POST /v1/blocks/read`: the listed blocks as frames, in the order asked.
async fn read(
    State(app): State<AppState>,
    _: Admin,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let ids = ids_body(&body, MAX_READ)?;
    if ids.iter().any(|id| id.is_hole()) {
        return Err(ApiError::bad(
            "invalid_ids",
            "holes are never stored; do not ask for the zero id",
        ));
    }
    let reader = app.reader.clone();
    let frames = tokio::task::spawn_blocking(move || reader.read_frames(&ids))
        .await
        .map_err(|e| ApiError::Internal(format!("block read failed: {e}")))??;
    Ok(binary(frames, FRAMES_TYPE))
}
