//! `/boot`: what PXE-booting machines fetch over HTTP before they have any token — their iPXE
//! script, chosen by the host's state (see `boot::ipxe`), and the agent ramdisk's kernel and
//! initrd. The handler creates a host on its first contact and mints a per-boot token when the
//! script boots the agent or `sanboot`s an ISO.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{ApiQuery, AppState};
use crate::boot::ipxe::{self, Boot};
use crate::boot::tftp::BootDir;
use crate::catalog::hosts::{self, HostState};
use crate::catalog::iso::{self, Served, Until, Via};
use crate::config::UnknownHosts;
use crate::error::ApiError;
use crate::stream::iscsi::{chap, target_name};

/// The ramdisk's files, by the only names served.
const RAMDISK_FILES: [&str; 2] = ["vmlinuz", "initrd.img"];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/boot/ipxe", get(script))
        .route("/boot/ramdisk/{file}", get(ramdisk_file))
        .route("/boot/files/{file}", get(boot_file))
}

/// `?mac=${net0/mac}` (iPXE may send more: uuid, arch, platform, …; they are ignored today).
/// Without a MAC the answer chains back here with iPXE filling it in.
#[derive(Debug, Deserialize)]
struct ScriptQuery {
    mac: Option<String>,
}

async fn script(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ScriptQuery>,
) -> Result<Response, ApiError> {
    let provision = app.config.provision.clone();
    let iscsi = app.config.iscsi.listen_addr().ok().flatten();
    let ramdisk = provision.ramdisk_dir(&app.config.server.data_dir);
    let have_ramdisk = RAMDISK_FILES.iter().all(|f| ramdisk.join(f).is_file());
    let base_url = if provision.advertise_url.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        format!("http://{host}")
    } else {
        provision.advertise_url.clone()
    };
    let Some(mac) = q.mac else {
        let script = ipxe::script(
            &Boot::Chain {
                base_url: &base_url,
            },
            "",
        );
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            script,
        )
            .into_response());
    };
    let discover = provision.unknown_hosts == UnknownHosts::Discover;
    let (plan, why) = app
        .catalog
        .run(move |c| plan(c, &mac, discover, have_ramdisk))
        .await?;
    let image_text;
    let iscsi_boot;
    let why = if matches!(
        plan,
        Plan::Iso {
            via: Via::Iscsi,
            ..
        }
    ) && iscsi.is_none()
    {
        format!(
            "{why}, but this server runs no iSCSI target (--iscsi-listen); booting the local disk"
        )
    } else {
        why
    };
    let boot = match (&plan, iscsi) {
        (Plan::Agent { token }, _) => Boot::Agent {
            base_url: &base_url,
            token,
            kernel_args: &provision.kernel_args,
        },
        (
            Plan::Iso {
                image,
                token,
                via: Via::Http,
            },
            _,
        ) => {
            image_text = image.to_string();
            Boot::Sanboot {
                base_url: &base_url,
                image: &image_text,
                token,
            }
        }
        (
            Plan::Iso {
                image,
                token,
                via: Via::Iscsi,
            },
            Some(portal),
        ) => {
            // A wildcard listener: the address the machine reached the HTTP server by.
            let server = if portal.ip().is_unspecified() {
                ipxe::url_host(&base_url).to_string()
            } else {
                portal.ip().to_string()
            };
            let (username, password) = chap::credentials(token);
            iscsi_boot = (server, target_name(*image), username, password);
            Boot::SanbootIscsi {
                server: &iscsi_boot.0,
                port: portal.port(),
                target: &iscsi_boot.1,
                username: &iscsi_boot.2,
                password: &iscsi_boot.3,
            }
        }
        (
            Plan::Iso {
                via: Via::Iscsi, ..
            },
            None,
        )
        | (Plan::Local, _) => Boot::Local,
    };
    let why = if !have_ramdisk && matches!(plan, Plan::Local) && why.contains("deploying") {
        format!(
            "{why}, but there is no agent ramdisk in {}",
            ramdisk.display()
        )
    } else {
        why
    };
    tracing::info!("boot script: {why}");
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        ipxe::script(&boot, &why),
    )
        .into_response())
}

/// What a host's script makes it boot (tokens are minted for this boot).
#[derive(Debug)]
enum Plan {
    Agent {
        token: String,
    },
    Iso {
        image: uuid::Uuid,
        token: String,
        via: Via,
    },
    Local,
}

/// The boot of the machine with `mac`, by its host's state, and why.
fn plan(
    c: &mut rusqlite::Connection,
    mac: &str,
    discover: bool,
    have_ramdisk: bool,
) -> Result<(Plan, String), ApiError> {
    let host = hosts::first_contact(c, mac)?;
    if host.state == HostState::Iso {
        return Ok(match iso::serve(c, &host)? {
            Served::Sanboot { image, token, via } => {
                let until = match host.iso_boot.as_ref().map(|b| b.until) {
                    Some(Until::NextBoot) => "once (until next-boot)",
                    _ => "until released",
                };
                (
                    Plan::Iso { image, token, via },
                    format!(
                        "host {} boots ISO image {image} {until}{}",
                        host.mac,
                        via.suffix()
                    ),
                )
            }
            Served::Local(reason) => (
                Plan::Local,
                format!(
                    "host {} is iso but {reason}; booting the local disk",
                    host.mac
                ),
            ),
        });
    }
    let agent = host.state.boots_agent(discover);
    let why = match host.state {
        HostState::Deploying => format!("host {} is deploying", host.mac),
        HostState::Discovered | HostState::Ready if agent => format!(
            "host {} is {}; booting the agent to wait for a task",
            host.mac,
            if host.state == HostState::Ready {
                "ready"
            } else {
                "new"
            }
        ),
        state => format!(
            "host {} is {}; booting the local disk",
            host.mac,
            state.as_str()
        ),
    };
    if !agent || !have_ramdisk {
        iso::end_reads(c, host.id)?;
        return Ok((Plan::Local, why));
    }
    if host.state == HostState::Deploying {
        hosts::mark(c, host.id, hosts::Milestone::Script)?;
    }
    let token = hosts::mint_agent_token(c, host.id)?;
    Ok((Plan::Agent { token }, why))
}

async fn ramdisk_file(
    State(app): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let Some(name) = RAMDISK_FILES.iter().find(|f| **f == file) else {
        return Err(ApiError::NotFound(format!(
            "the ramdisk serves only {}",
            RAMDISK_FILES.join(" and ")
        )));
    };
    let path = app
        .config
        .provision
        .ramdisk_dir(&app.config.server.data_dir)
        .join(name);
    send_file(&path).await
}

/// The boot files DHCP names for UEFI HTTP boot (`dhcp.efi_file`) and BIOS (`dhcp.bios_file`),
/// from `boot.dir`: only those two names, which the operator chose, so no request names a path.
async fn boot_file(
    State(app): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let dhcp = &app.config.dhcp;
    if file != dhcp.efi_file && file != dhcp.bios_file {
        return Err(ApiError::NotFound(format!(
            "/boot/files serves only {} and {}",
            dhcp.efi_file, dhcp.bios_file
        )));
    }
    // Opened beneath the folder, exactly as TFTP opens it: one rule for what may be served.
    let dir = app.config.boot.dir.clone();
    let (f, len) = tokio::task::spawn_blocking(move || {
        BootDir::open(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .open_file(std::path::Path::new(&file))
            .map_err(|refused| format!("{}/{file}: {}", dir.display(), refused.message))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::NotFound)?;
    Ok(file_response(tokio::fs::File::from_std(f), len))
}

async fn send_file(path: &std::path::Path) -> Result<Response, ApiError> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::NotFound(format!("{}: {e}", path.display())))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    Ok(file_response(f, len))
}

fn file_response(f: tokio::fs::File, len: u64) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(f)),
    )
        .into_response()
}
