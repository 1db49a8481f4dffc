//! `POST /v1/formats/inspect`: a dry run of the format inspector on an uploaded file. The body
//! is staged in the data directory (never in memory), inspected, and deleted; the answer is the
//! verdict, whether the file would be accepted or not.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use kagami_images::format::{self, DiskFormat, Verdict};
use serde::Deserialize;

use super::{ApiQuery, AppState};
use crate::catalog::tenancy::Caller;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/formats/inspect",
        post(inspect).layer(DefaultBodyLimit::disable()),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InspectQuery {
    /// The claimed format; without it, the file's own signature decides (raw if none).
    disk_format: Option<DiskFormat>,
}

async fn inspect(
    State(app): State<AppState>,
    _: Caller,
    ApiQuery(q): ApiQuery<InspectQuery>,
    body: Body,
) -> Result<Json<Verdict>, ApiError> {
    let staged = stage(&app, body).await?;
    let limits = app.config.limits.formats();
    let verdict = tokio::task::spawn_blocking(move || {
        format::verdict(staged.as_file(), q.disk_format, &limits)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("inspection failed: {e}")))?;
    Ok(Json(verdict))
}

/// Writes a request body to a temporary file under `<data_dir>/staging`, deleted when dropped.
/// Bounded by `limits.max_image_bytes` and the upload idle timeout.
async fn stage(app: &AppState, body: Body) -> Result<tempfile::NamedTempFile, ApiError> {
    let (staged, mut out) = crate::ingest::staged_file(&app.config.server.data_dir).await?;
    let idle = Duration::from_secs(app.config.limits.upload_idle_secs);
    crate::ingest::write_body(
        body,
        &mut out,
        idle,
        app.config.limits.max_image_bytes,
        |_| {},
    )
    .await?;
    Ok(staged)
}
