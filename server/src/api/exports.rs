//! `/v1/exports`: where images can be read as block devices: the NBD and iSCSI listeners'
//! addresses, which `kagami image export-nbd|export-iscsi` turn into URLs.

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
    /// `ADDR:PORT` of the iSCSI target (`iscsi.listen`); target names are
    /// `iqn.2026-11.io.kagami:<image-id>`, LUN 0.
    pub iscsi: Option<String>,
}

/// `GET /v1/exports`: any token may ask (the address is no secret; each export name is).
async fn show(State(app): State<AppState>, _caller: Caller) -> Result<Json<Exports>, ApiError> {
    let nbd = app.config.nbd.listen_addr().ok().flatten();
    let iscsi = app.config.iscsi.listen_addr().ok().flatten();
    Ok(Json(Exports {
        nbd: nbd.map(|a| a.to_string()),
        iscsi: iscsi.map(|a| a.to_string()),
    }))
}
