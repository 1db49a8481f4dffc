//! `/v1/agent`: what an agent booted on a host may do with its per-boot token — report the
//! host's inventory, fetch its task, read the images of its own deployment (the same answers as
//! `/v1/images/{id}/manifest|segments`), report progress and the result; while it captures its
//! host, create, commit and delete that capture's images here and upload blocks through
//! `/v1/blocks` and `/v1/blocks/missing`. Nothing else: an agent token is not a project token.

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kagami_images::model::Image;
use serde_json::Value;

use super::images::{SegmentQuery, commit_manifest_body, manifest_response, segment_response};
use super::{ApiBytes, ApiJson, ApiQuery, AppState, bearer};
use crate::catalog::hosts::{self, AgentCaller, Host, Outcome, Progress, Task};
use crate::catalog::images::{self as catalog_images, NewImage, parse_id};
use crate::catalog::tenancy::Caller;
use crate::config::Config;
use crate::error::ApiError;

pub fn routes(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/agent/task", get(task))
        .route("/agent/inventory", post(inventory))
        .route("/agent/progress", post(progress))
        .route("/agent/result", post(result))
        .route("/agent/images", post(create_image))
        .route("/agent/images/{id}", delete(delete_image))
        .route(
            "/agent/images/{id}/manifest",
            get(manifest)
                .put(commit_manifest)
                .layer(DefaultBodyLimit::max(config.limits.max_block_batch_bytes)),
        )
        .route("/agent/images/{id}/segments/{index}", get(segment))
}

/// An agent, authenticated by its per-boot token.
#[derive(Debug)]
pub struct Agent(pub AgentCaller);

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let secret = bearer(parts)?;
        state
            .catalog
            .run(move |c| hosts::authenticate_agent(c, &secret))
            .await?
            .map(Agent)
            .ok_or(ApiError::Unauthorized)
    }
}

async fn task(State(app): State<AppState>, Agent(agent): Agent) -> Result<Json<Task>, ApiError> {
    Ok(Json(
        app.catalog.run(move |c| hosts::task(c, &agent)).await?,
    ))
}

async fn inventory(
    State(app): State<AppState>,
    Agent(agent): Agent,
    ApiJson(inventory): ApiJson<Value>,
) -> Result<Json<Host>, ApiError> {
    if !inventory.is_object() {
        return Err(ApiError::bad(
            "invalid_body",
            "the inventory is a JSON object",
        ));
    }
    Ok(Json(
        app.catalog
            .run(move |c| hosts::record_inventory(c, &agent, &inventory))
            .await?,
    ))
}

async fn progress(
    State(app): State<AppState>,
    Agent(agent): Agent,
    ApiJson(p): ApiJson<Progress>,
) -> Result<Json<Value>, ApiError> {
    app.catalog
        .run(move |c| hosts::record_progress(c, &agent, &p))
        .await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

async fn result(
    State(app): State<AppState>,
    Agent(agent): Agent,
    ApiJson(o): ApiJson<Outcome>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(
        app.catalog
            .run(move |c| hosts::record_outcome(c, &agent, &o))
            .await?,
    ))
}

async fn manifest(
    State(app): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    app.catalog
        .run(move |c| hosts::agent_may_read(c, &agent, id))
        .await?;
    manifest_response(&app, Caller::system(), id).await
}

/// A capturing agent creates the images of its capture (in the project that asked for it).
async fn create_image(
    State(app): State<AppState>,
    Agent(agent): Agent,
    ApiJson(new): ApiJson<NewImage>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let region = app.config.server.region.clone();
    let image = app
        .catalog
        .run(move |c| hosts::create_capture_image(c, &agent, &region, new))
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// Commits the content of an image the agent's capture made.
async fn commit_manifest(
    State(app): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Image>, ApiError> {
    let id = parse_id(&id)?;
    let caller = app
        .catalog
        .run(move |c| hosts::agent_may_write(c, &agent, id))
        .await?;
    Ok(Json(commit_manifest_body(app, caller, id, body).await?))
}

/// Deletes an image the agent's capture made (a capture that failed half way).
async fn delete_image(
    State(app): State<AppState>,
    Agent(agent): Agent,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    app.catalog
        .run(move |c| {
            let caller = hosts::agent_may_write(c, &agent, id)?;
            catalog_images::delete(c, &caller, id)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn segment(
    State(app): State<AppState>,
    Agent(agent): Agent,
    Path((id, index)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<SegmentQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    app.catalog
        .run(move |c| hosts::agent_may_read(c, &agent, id))
        .await?;
    segment_response(&app, Caller::system(), id, &index, q).await
}
