//! `/v1/hosts` (admin): enroll machines, assign images to their disks, capture them, boot an ISO
//! on them, release and forget them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::{Admin, ApiJson, AppState};
use crate::catalog::hosts::{
    self, CaptureRequest, DeployRequest, Deployment, Host, HostEvent, NewHost,
};
use crate::catalog::iso::{self, BootIsoRequest};
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/hosts", get(list).post(add))
        .route("/hosts/{key}", get(show).delete(forget))
        .route("/hosts/{key}/deploy", post(deploy))
        .route("/hosts/{key}/capture", post(capture))
        .route("/hosts/{key}/boot-iso", post(boot_iso))
        .route("/hosts/{key}/release", post(release))
}

async fn add(
    State(app): State<AppState>,
    _: Admin,
    ApiJson(new): ApiJson<NewHost>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    let host = app.catalog.run(move |c| hosts::add(c, new)).await?;
    Ok((StatusCode::CREATED, Json(host)))
}

async fn list(State(app): State<AppState>, _: Admin) -> Result<Json<Vec<Host>>, ApiError> {
    Ok(Json(app.catalog.run(|c| hosts::list(c)).await?))
}

/// A host with its history.
#[derive(Debug, Serialize)]
struct HostDetail {
    #[serde(flatten)]
    host: Host,
    events: Vec<HostEvent>,
}

async fn show(
    State(app): State<AppState>,
    _: Admin,
    Path(key): Path<String>,
) -> Result<Json<HostDetail>, ApiError> {
    let detail = app
        .catalog
        .run(move |c| {
            let host = hosts::get(c, &key)?;
            let events = hosts::events(c, host.id)?;
            Ok(HostDetail { host, events })
        })
        .await?;
    Ok(Json(detail))
}

async fn deploy(
    State(app): State<AppState>,
    Admin(caller): Admin,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<DeployRequest>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let deployment = app
        .catalog
        .run(move |c| hosts::deploy(c, &caller, &key, req))
        .await?;
    Ok((StatusCode::CREATED, Json(deployment)))
}

async fn capture(
    State(app): State<AppState>,
    Admin(caller): Admin,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<CaptureRequest>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let capture = app
        .catalog
        .run(move |c| hosts::capture(c, &caller, &key, req))
        .await?;
    Ok((StatusCode::CREATED, Json(capture)))
}

async fn boot_iso(
    State(app): State<AppState>,
    Admin(caller): Admin,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<BootIsoRequest>,
) -> Result<Json<Host>, ApiError> {
    let iscsi_on = app.config.iscsi.listen_addr().ok().flatten().is_some();
    Ok(Json(
        app.catalog
            .run(move |c| iso::boot_iso(c, &caller, &key, req, iscsi_on))
            .await?,
    ))
}

async fn release(
    State(app): State<AppState>,
    _: Admin,
    Path(key): Path<String>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(
        app.catalog.run(move |c| hosts::release(c, &key)).await?,
    ))
}

async fn forget(
    State(app): State<AppState>,
    _: Admin,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.catalog.run(move |c| hosts::forget(c, &key)).await?;
    Ok(StatusCode::NO_CONTENT)
}
