//! Admin resources: projects, tokens, the block store's totals and garbage collection.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{Admin, ApiJson, AppState};
use crate::catalog::blocks;
use crate::catalog::tenancy::{self, Project, Role, TokenInfo};
use crate::error::ApiError;
use crate::jobs::gc::{self, GcReport};

pub fn routes(json_limit: usize) -> Router<AppState> {
    Router::new()
        .route("/projects", get(list_projects).post(create_project))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", delete(revoke_token))
        .route("/store", get(store_stats))
        .route("/store/gc", post(run_gc))
        .layer(DefaultBodyLimit::max(json_limit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
}

async fn create_project(
    State(app): State<AppState>,
    _: Admin,
    ApiJson(p): ApiJson<NewProject>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    let project = app
        .catalog
        .run(move |c| tenancy::create_project(c, &p.name))
        .await?;
    Ok((StatusCode::CREATED, Json(project)))
}

async fn list_projects(
    State(app): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<Project>>, ApiError> {
    Ok(Json(app.catalog.run(|c| tenancy::list_projects(c)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    project: String,
    role: Role,
    #[serde(default)]
    description: String,
}

async fn create_token(
    State(app): State<AppState>,
    _: Admin,
    ApiJson(t): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<TokenInfo>), ApiError> {
    if t.description.len() > 1024 {
        return Err(ApiError::bad(
            "field_too_long",
            "description is longer than 1024 bytes",
        ));
    }
    let token = app
        .catalog
        .run(move |c| tenancy::create_token(c, &t.project, t.role, &t.description))
        .await?;
    Ok((StatusCode::CREATED, Json(token)))
}

async fn list_tokens(
    State(app): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(app.catalog.run(|c| tenancy::list_tokens(c)).await?))
}

async fn revoke_token(
    State(app): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.catalog
        .run(move |c| tenancy::revoke_token(c, &id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Totals of the block store.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoreStats {
    /// Distinct blocks indexed, and their bytes (each stored once, whatever uses it).
    pub blocks: u64,
    pub block_bytes: u64,
    /// Blocks no manifest uses (uploads in flight, or released and waiting for GC).
    pub unreferenced_blocks: u64,
    pub packs: u64,
    /// Bytes of pack files on disk, live or dead.
    pub pack_bytes: u64,
}

async fn store_stats(State(app): State<AppState>, _: Admin) -> Result<Json<StoreStats>, ApiError> {
    let (blocks, block_bytes, unreferenced_blocks) = app.catalog.run(|c| blocks::stats(c)).await?;
    let packs = app.store.packs()?;
    Ok(Json(StoreStats {
        blocks,
        block_bytes,
        unreferenced_blocks,
        packs: packs.len() as u64,
        pack_bytes: packs.iter().map(|(_, size)| size).sum(),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcRequest {
    /// Overrides gc.grace_secs for this run.
    grace_secs: Option<u64>,
}

async fn run_gc(
    State(app): State<AppState>,
    _: Admin,
    ApiJson(req): ApiJson<GcRequest>,
) -> Result<Json<GcReport>, ApiError> {
    let grace = req.grace_secs.unwrap_or(app.config.gc.grace_secs);
    let fraction = app.config.gc.rewrite_below_live_fraction;
    let report =
        tokio::task::spawn_blocking(move || gc::collect(&app.catalog, &app.store, grace, fraction))
            .await
            .map_err(|e| ApiError::Internal(format!("gc failed: {e}")))??;
    Ok(Json(report))
}
