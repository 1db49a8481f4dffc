//! `/v1/jobs`: durable background work and its progress.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use uuid::Uuid;

use super::AppState;
use crate::catalog::jobs::{self, Job};
use crate::catalog::tenancy::Caller;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(show))
}

async fn list(State(app): State<AppState>, caller: Caller) -> Result<Json<Vec<Job>>, ApiError> {
    Ok(Json(
        app.catalog.run(move |c| jobs::list(c, &caller)).await?,
    ))
}

async fn show(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad("invalid_id", format!("'{id}' is not a job id")))?;
    Ok(Json(
        app.catalog.run(move |c| jobs::get(c, &caller, id)).await?,
    ))
}
