//! `/v1/exports`: where images can be read as block devices — the NBD and iSCSI listeners'
//! addresses, which `kagami image export-nbd|export-iscsi` turn into URLs — and the sessions
//! open on them now (`kagami export list`).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::catalog::tenancy::Caller;
use crate::error::ApiError;
use crate::stream::sessions::Session;

pub fn routes() -> Router<AppState> {
    Router::new().route("/exports", get(show))
}

/// The block-serving listeners (`null` for one that is off) and their open sessions.
#[derive(Debug, Serialize, Deserialize)]
pub struct Exports {
    /// `ADDR:PORT` of the NBD export (`nbd.listen`); export names are `<image-id>/<token>`.
    pub nbd: Option<String>,
    /// `ADDR:PORT` of the iSCSI target (`iscsi.listen`); target names are
    /// `iqn.2026-11.io.kagami:<image-id>`, LUN 0.
    pub iscsi: Option<String>,
    /// Open NBD connections and iSCSI sessions, oldest first: all of them for an admin, those
    /// opened with a token of the caller's own project for anyone else.
    pub sessions: Vec<Session>,
}

/// `GET /v1/exports`: any token may ask (the address is no secret; each export name is).
async fn show(State(app): State<AppState>, caller: Caller) -> Result<Json<Exports>, ApiError> {
    let nbd = app.config.nbd.listen_addr().ok().flatten();
    let iscsi = app.config.iscsi.listen_addr().ok().flatten();
    Ok(Json(Exports {
        nbd: nbd.map(|a| a.to_string()),
        iscsi: iscsi.map(|a| a.to_string()),
        sessions: app.sessions.list(&caller),
    }))
}
