//! `/v1/exports`: where images can be read as block devices. For now the NBD listener's
//! address, which `kagami image export-nbd` turns into a URL; the listing of active exports and
//! their sessions comes with the iSCSI target.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use crate::catalog::tenancy::Caller;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/exports", get(show))
}

/// The block-serving listeners; `null` for one that is off.
#[derive(Debug, Serialize)]
pub struct Exports {
    /// `ADDR:PORT` of the NBD export (`nbd.listen`); export names are `<image-id>/<token>`.
    pub nbd: Option<String>,
}

/// `GET /v1/exports`: any token may ask (the address is no secret; each export name is).
async fn show(State(app): State<AppState>, _caller: Caller) -> Result<Json<Exports>, ApiError> {
    let nbd = app.config.nbd.listen_addr().ok().flatten();
    Ok(Json(Exports {
        nbd: nbd.map(|a| a.to_string()),
    }))
}
