//! Hosts, deployments and the agents that carry them out.
//!
//! A host is a machine known by the MAC it PXE-boots from, created when an operator enrolls it
//! or on its first contact. Its state moves
//! `discovered → ready → deploying → deployed | failed` (and back to `deploying` on the next
//! deploy), every change recorded with a reason and a time in `host_events`. A capture
//! (`capturing`) and an ISO boot (`iso`, see [`crate::catalog::iso`]) return the host to the
//! state it had before.
//!
//! A deployment says which image goes on which disk. While a host is `deploying`, each of its
//! network boots gets a fresh per-boot agent token (only its hash is stored; older ones die):
//! the agent on that boot may report inventory, fetch its task, read the images of its own
//! deployment, and report progress and the result — nothing else.

use std::collections::BTreeMap;

use kagami_images::model::ImageKind;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::catalog::iso::{self, IsoBoot};
use crate::catalog::tenancy::{Caller, Role, hash_secret, new_secret};
use crate::catalog::{images, now_ms, rfc3339};
use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Seen or enrolled; no inventory yet.
    Discovered,
    /// Inventory known; nothing assigned.
    Ready,
    /// A deployment is assigned and not finished.
    Deploying,
    /// A capture is assigned and not finished: the agent reads its disks into images.
    Capturing,
    /// Its deployment succeeded; it boots from its disk.
    Deployed,
    /// Its deployment failed (the reason says why); deploy again to retry.
    Failed,
    /// Boots an ISO image from the network (iPXE `sanboot`) until released, or once.
    Iso,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Discovered => "discovered",
            HostState::Ready => "ready",
            HostState::Deploying => "deploying",
            HostState::Capturing => "capturing",
            HostState::Deployed => "deployed",
            HostState::Failed => "failed",
            HostState::Iso => "iso",
        }
    }

    /// Whether a host in this state boots the agent ramdisk from the network (else its own
    /// disk); `discover`: idle hosts wait in the agent for a task (`provision.unknown_hosts`).
    pub fn boots_agent(self, discover: bool) -> bool {
        match self {
            HostState::Deploying | HostState::Capturing => true,
            HostState::Discovered | HostState::Ready => discover,
            HostState::Deployed | HostState::Failed | HostState::Iso => false,
        }
    }

    /// Whether a host in this state boots from the network at all (the agent, or an ISO): DHCP
    /// hands only these a boot file.
    pub fn boots_from_network(self, discover: bool) -> bool {
        self == HostState::Iso || self.boots_agent(discover)
    }

    pub(crate) fn parse(s: &str) -> HostState {
        match s {
            "ready" => HostState::Ready,
            "deploying" => HostState::Deploying,
            "capturing" => HostState::Capturing,
            "deployed" => HostState::Deployed,
            "failed" => HostState::Failed,
            "iso" => HostState::Iso,
            _ => HostState::Discovered,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    pub id: Uuid,
    pub mac: String,
    pub name: Option<String>,
    pub state: HostState,
    pub state_reason: String,
    pub state_changed_at: String,
    /// What the agent reported: disks, NICs, CPU, memory, firmware.
    pub inventory: Option<Value>,
    /// The latest deployment, if any.
    pub deployment: Option<Deployment>,
    /// The ISO it boots while it is `iso`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso_boot: Option<IsoBoot>,
    pub created_at: String,
    pub updated_at: String,
}

/// One disk of a deployment and its progress.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeployDisk {
    /// The device to write (`/dev/sda`); `None` lets the agent pick: the disks without a
    /// device go onto the host's fixed disks in order, skipping those named by other entries
    /// (a whole-machine image: system disk first).
    pub device: Option<String>,
    pub image_id: Uuid,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Seconds left in the phase, as the agent estimates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deployment {
    pub id: Uuid,
    pub host_id: Uuid,
    /// pending → running → succeeded | failed.
    pub state: String,
    /// full | differential.
    pub mode: String,
    pub disks: Vec<DeployDisk>,
    /// deploy (write images onto disks) or capture (read disks into images).
    #[serde(default = "deploy_action")]
    pub action: String,
    /// A capture's request and result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSpec>,
    /// What was measured: the agent's durations (`write`, seconds) and the milestones the
    /// server saw (`*_at`: seconds since the deployment was created, see [`Milestone`]).
    pub timings: BTreeMap<String, f64>,
    /// The phases of the deployment in seconds, from `timings`: `power_on` (from the
    /// deployment's creation to the machine's first DHCP request), `ipxe` (DHCP to the agent's
    /// iPXE script), `agent_up` (script to the agent's first report: kernel, ramdisk, network),
    /// `write` (the agent's write, verification included), `reboot` (result to the local boot).
    #[serde(default)]
    pub phases: BTreeMap<String, f64>,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

fn deploy_action() -> String {
    "deploy".into()
}

/// A capture's request (name, kind, disks) and what it made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaptureSpec {
    pub name: String,
    /// system, data or whole.
    pub kind: String,
    /// The devices to read; empty: the host's first fixed disk (system, data) or all of its
    /// fixed disks (whole).
    pub devices: Vec<String>,
    /// The project the images belong to: the one that asked for the capture.
    pub project: String,
    /// The host's state before the capture, which it returns to after.
    pub return_state: String,
    /// Images the agent created for this capture (it may commit or delete only these).
    #[serde(default)]
    pub made: Vec<Uuid>,
    /// The image the capture made, once it succeeded.
    #[serde(default)]
    pub image: Option<Uuid>,
    /// Where the capture is, as the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<CaptureProgress>,
}

/// A capture's progress: the disk being read (index into its disks), the phase (reading,
/// uploading) and the phase's bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaptureProgress {
    pub disk: usize,
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
}

/// `POST /v1/hosts/{key}/capture`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    pub name: String,
    #[serde(default = "system_kind")]
    pub kind: String,
    #[serde(default)]
    pub devices: Vec<String>,
}

fn system_kind() -> String {
    "system".into()
}

/// A state change in a host's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostEvent {
    pub at: String,
    pub state: HostState,
    pub reason: String,
}

/// `kagami host add`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    pub mac: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// `kagami host deploy`: one image for the first disk, or a list of disks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    #[serde(default)]
    pub image: Option<Uuid>,
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    #[serde(default)]
    pub device: Option<String>,
    pub image: Uuid,
}

/// Who an agent token speaks for.
#[derive(Clone, Debug)]
pub struct AgentCaller {
    pub host_id: Uuid,
}

/// What the agent is asked to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum Task {
    /// Write these disks.
    Deploy {
        deployment: Uuid,
        mode: String,
        disks: Vec<DeployDisk>,
    },
    /// Read these disks (none: see [`CaptureSpec::devices`]) into a new image.
    Capture {
        deployment: Uuid,
        name: String,
        kind: String,
        disks: Vec<String>,
        /// The host, as the images' source (its name, or its MAC).
        source: String,
    },
    /// Nothing assigned: ask again later.
    Wait,
}

/// An agent's progress report for one disk.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub deployment: Uuid,
    pub disk: usize,
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

/// An agent's final word on its deployment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub deployment: Uuid,
    /// `None` on success; the reason otherwise.
    #[serde(default)]
    pub error: Option<String>,
    /// A capture's image.
    #[serde(default)]
    pub image: Option<Uuid>,
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
}

/// `aa:bb:cc:dd:ee:ff`, lower case; `-` separators and upper case are accepted.
pub fn normalize_mac(text: &str) -> Result<String, ApiError> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(ApiError::bad(
            "invalid_mac",
            format!(
                "'{}' is not a MAC address (aa:bb:cc:dd:ee:ff)",
                text.chars().take(40).collect::<String>()
            ),
        ));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains(':');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "invalid_name",
            "a host name is 1–63 of letters, digits, '-', '_' and '.'",
        ))
    }
}

const HOST_COLUMNS: &str =
    "id, mac, name, state, state_reason, state_changed_at, inventory, created_at, updated_at";

fn row_to_host(r: &Row<'_>) -> rusqlite::Result<Host> {
    let id: String = r.get(0)?;
    let inventory: Option<String> = r.get(6)?;
    Ok(Host {
        id: id.parse().unwrap_or_default(),
        mac: r.get(1)?,
        name: r.get(2)?,
        state: HostState::parse(&r.get::<_, String>(3)?),
        state_reason: r.get(4)?,
        state_changed_at: rfc3339(r.get(5)?),
        inventory: inventory.and_then(|t| serde_json::from_str(&t).ok()),
        deployment: None,
        iso_boot: None,
        created_at: rfc3339(r.get(7)?),
        updated_at: rfc3339(r.get(8)?),
    })
}

const DEPLOY_COLUMNS: &str = "id, host_id, state, mode, disks, timings, error, created_by, created_at, updated_at, finished_at, action, capture";

/// A moment of a deployment the server sees, kept in its timings under `key()` as seconds since
/// the deployment was created — the first time only, and only in the deployment's states where
/// it means something. The phases between them are [`Deployment::phases`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// The machine's DHCP request while it is deploying (a boot file is handed out).
    Dhcp,
    /// Its iPXE script, booting the agent.
    Script,
    /// The agent's first report (its inventory).
    Agent,
    /// The agent's result.
    Result,
    /// The machine's next DHCP request after success: no boot file, it boots its disk.
    LocalBoot,
}

impl Milestone {
    fn key(self) -> &'static str {
        match self {
            Milestone::Dhcp => "dhcp_at",
            Milestone::Script => "script_at",
            Milestone::Agent => "agent_at",
            Milestone::Result => "result_at",
            Milestone::LocalBoot => "local_boot_at",
        }
    }
}

/// Records `milestone` on the host's latest deployment (see [`Milestone`]).
pub fn mark(conn: &Connection, host: Uuid, milestone: Milestone) -> Result<(), ApiError> {
    let states = match milestone {
        Milestone::LocalBoot => "('succeeded')",
        _ => "('pending', 'running')",
    };
    conn.execute(
        &format!(
            "UPDATE deployments SET timings = json_set(timings, '$.' || ?2, round((?3 - created_at) / 1000.0, 3)) \
             WHERE id = (SELECT id FROM deployments WHERE host_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1) \
               AND state IN {states} AND json_extract(timings, '$.' || ?2) IS NULL"
        ),
        params![host.to_string(), milestone.key(), now_ms()],
    )?;
    Ok(())
}

/// The phases between the milestones (and the agent's own write time).
fn phases(t: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let at = |m: Milestone| t.get(m.key()).copied();
    let between = |a: Option<f64>, b: Option<f64>| Some(b? - a?).filter(|d| *d >= 0.0);
    let dhcp = at(Milestone::Dhcp);
    let script = at(Milestone::Script);
    let agent = at(Milestone::Agent);
    let result = at(Milestone::Result);
    [
        ("power_on", dhcp),
        ("ipxe", between(dhcp, script)),
        ("agent_up", between(script, agent)),
        ("write", t.get("write").copied().or(between(agent, result))),
        ("reboot", between(result, at(Milestone::LocalBoot))),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), (v? * 1000.0).round() / 1000.0)))
    .collect()
}

fn row_to_deployment(r: &Row<'_>) -> rusqlite::Result<Deployment> {
    let id: String = r.get(0)?;
    let host: String = r.get(1)?;
    let disks: String = r.get(4)?;
    let timings: String = r.get(5)?;
    let timings: BTreeMap<String, f64> = serde_json::from_str(&timings).unwrap_or_default();
    Ok(Deployment {
        action: r.get(11)?,
        capture: r
            .get::<_, Option<String>>(12)?
            .and_then(|c| serde_json::from_str(&c).ok()),
        phases: phases(&timings),
        id: id.parse().unwrap_or_default(),
        host_id: host.parse().unwrap_or_default(),
        state: r.get(2)?,
        mode: r.get(3)?,
        disks: serde_json::from_str(&disks).unwrap_or_default(),
        timings,
        error: r.get(6)?,
        created_by: r.get(7)?,
        created_at: rfc3339(r.get(8)?),
        updated_at: rfc3339(r.get(9)?),
        finished_at: r.get::<_, Option<i64>>(10)?.map(rfc3339),
    })
}

fn latest_deployment(conn: &Connection, host: Uuid) -> Result<Option<Deployment>, ApiError> {
    let sql = format!(
        "SELECT {DEPLOY_COLUMNS} FROM deployments WHERE host_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1"
    );
    Ok(conn
        .query_row(&sql, [host.to_string()], row_to_deployment)
        .optional()?)
}

fn host_not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no host '{}' (give its id, MAC or name)",
        key.chars().take(64).collect::<String>()
    ))
}

/// Whether the DHCP server hands `mac` a boot file: yes for a machine not known yet (its first
/// iPXE script enrols it) and for a host whose next boot is the agent or an ISO; no for one that boots
/// its own disk, whose firmware then goes straight to the disk instead of through iPXE — and
/// a UEFI machine is not chained back into iPXE by its next network boot entry (HTTP boot)
/// after iPXE's `exit`, a loop that would never reach the disk.
/// The request is a deploying host's [`Milestone::Dhcp`], or a deployed one's
/// [`Milestone::LocalBoot`].
pub fn wants_boot_file(conn: &Connection, mac: &str, discover: bool) -> Result<bool, ApiError> {
    let host: Option<(String, String)> = conn
        .query_row("SELECT id, state FROM hosts WHERE mac = ?1", [mac], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((id, state)) = host else {
        return Ok(true);
    };
    let (id, state) = (id.parse().unwrap_or_default(), HostState::parse(&state));
    match state {
        HostState::Deploying => mark(conn, id, Milestone::Dhcp)?,
        HostState::Deployed => mark(conn, id, Milestone::LocalBoot)?,
        _ => {}
    }
    if state != HostState::Iso {
        // A new boot: an earlier boot's ISO (`--until next-boot`) is no longer read.
        iso::end_reads(conn, id)?;
    }
    Ok(state.boots_from_network(discover))
}

/// A host by id, MAC or name, with its latest deployment.
pub fn get(conn: &Connection, key: &str) -> Result<Host, ApiError> {
    let mac = normalize_mac(key).ok();
    let sql =
        format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?1 OR mac = ?2 OR name = ?1 LIMIT 1");
    let mut host = conn
        .query_row(&sql, params![key, mac], row_to_host)
        .optional()?
        .ok_or_else(|| host_not_found(key))?;
    host.deployment = latest_deployment(conn, host.id)?;
    host.iso_boot = iso::get(conn, host.id)?;
    Ok(host)
}

pub(crate) fn get_by_id(conn: &Connection, id: Uuid) -> Result<Host, ApiError> {
    get(conn, &id.to_string())
}

pub fn list(conn: &Connection) -> Result<Vec<Host>, ApiError> {
    let sql = format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY created_at, rowid");
    let mut stmt = conn.prepare(&sql)?;
    let mut hosts = stmt
        .query_map([], row_to_host)?
        .collect::<Result<Vec<_>, _>>()?;
    for h in &mut hosts {
        h.deployment = latest_deployment(conn, h.id)?;
        h.iso_boot = iso::get(conn, h.id)?;
    }
    Ok(hosts)
}

pub fn events(conn: &Connection, host: Uuid) -> Result<Vec<HostEvent>, ApiError> {
    let mut stmt = conn.prepare(
        "SELECT at, state, reason FROM host_events WHERE host_id = ?1 ORDER BY at, rowid",
    )?;
    let rows = stmt.query_map([host.to_string()], |r| {
        Ok(HostEvent {
            at: rfc3339(r.get(0)?),
            state: HostState::parse(&r.get::<_, String>(1)?),
            reason: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Moves a host to `state`, recording why.
pub(crate) fn set_state(
    conn: &Connection,
    host: Uuid,
    state: HostState,
    reason: &str,
) -> Result<(), ApiError> {
    let now = now_ms();
    conn.execute(
        "UPDATE hosts SET state = ?2, state_reason = ?3, state_changed_at = ?4, updated_at = ?4 WHERE id = ?1",
        params![host.to_string(), state.as_str(), reason, now],
    )?;
    conn.execute(
        "INSERT INTO host_events (host_id, at, state, reason) VALUES (?1, ?2, ?3, ?4)",
        params![host.to_string(), now, state.as_str(), reason],
    )?;
    Ok(())
}

fn insert(
    conn: &Connection,
    mac: &str,
    name: Option<&str>,
    reason: &str,
) -> Result<Uuid, ApiError> {
    let id = Uuid::new_v4();
    let now = now_ms();
    conn.execute(
        "INSERT INTO hosts (id, mac, name, state, state_reason, created_at, updated_at, state_changed_at)
         VALUES (?1, ?2, ?3, 'discovered', ?4, ?5, ?5, ?5)",
        params![id.to_string(), mac, name, reason, now],
    )?;
    conn.execute(
        "INSERT INTO host_events (host_id, at, state, reason) VALUES (?1, ?2, 'discovered', ?3)",
        params![id.to_string(), now, reason],
    )?;
    Ok(id)
}

/// Enrolls a host before its first boot.
pub fn add(conn: &mut Connection, new: NewHost) -> Result<Host, ApiError> {
    let mac = normalize_mac(&new.mac)?;
    if let Some(name) = &new.name {
        check_name(name)?;
    }
    let tx = conn.transaction()?;
    let taken: Option<String> = tx
        .query_row(
            "SELECT mac FROM hosts WHERE mac = ?1 OR (name IS NOT NULL AND name = ?2)",
            params![mac, new.name],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(other) = taken {
        return Err(ApiError::conflict(
            "host_exists",
            if other == mac {
                format!("a host with MAC {mac} is already known")
            } else {
                format!(
                    "the name '{}' is taken by host {other}",
                    new.name.unwrap_or_default()
                )
            },
        ));
    }
    let id = insert(&tx, &mac, new.name.as_deref(), "enrolled by an operator")?;
    tx.commit()?;
    get_by_id(conn, id)
}

/// The host booting from `mac`, created as `discovered` on its first contact.
pub fn first_contact(conn: &mut Connection, mac: &str) -> Result<Host, ApiError> {
    let mac = normalize_mac(mac)?;
    let tx = conn.transaction()?;
    let id: Option<String> = tx
        .query_row("SELECT id FROM hosts WHERE mac = ?1", [&mac], |r| r.get(0))
        .optional()?;
    let id = match id {
        Some(id) => id.parse().unwrap_or_default(),
        None => insert(&tx, &mac, None, "first network boot")?,
    };
    tx.commit()?;
    get_by_id(conn, id)
}

/// Assigns images to a host's disks: a pending deployment, and the host `deploying`.
pub fn deploy(
    conn: &mut Connection,
    caller: &Caller,
    key: &str,
    req: DeployRequest,
) -> Result<Deployment, ApiError> {
    let mode = req.mode.unwrap_or_else(|| "full".into());
    if mode != "full" && mode != "differential" {
        return Err(ApiError::bad(
            "invalid_mode",
            format!("mode is full or differential, not '{mode}'"),
        ));
    }
    let mut disks: Vec<DeployDisk> = req
        .disks
        .into_iter()
        .map(|d| DeployDisk {
            device: d.device,
            image_id: d.image,
            phase: None,
            bytes_done: 0,
            bytes_total: 0,
            eta_secs: None,
        })
        .collect();
    if let Some(image) = req.image {
        disks.insert(
            0,
            DeployDisk {
                device: None,
                image_id: image,
                phase: None,
                bytes_done: 0,
                bytes_total: 0,
                eta_secs: None,
            },
        );
    }
    if disks.is_empty() || disks.len() > 32 {
        return Err(ApiError::bad(
            "invalid_body",
            "give an image (for the first disk) or 1–32 disks",
        ));
    }
    for dev in disks.iter().filter_map(|d| d.device.as_deref()) {
        check_device(dev)?;
    }
    let tx = conn.transaction()?;
    let host = get(&tx, key)?;
    // A whole-machine image stands for its disk images, onto the host's disks in order.
    let mut expanded = Vec::with_capacity(disks.len());
    for mut d in disks {
        let image = images::get(&tx, caller, d.image_id)?;
        if image.status != kagami_images::model::ImageStatus::Active {
            return Err(ApiError::conflict(
                "not_active",
                format!(
                    "image {} is {}; only active images can be deployed",
                    image.id, image.status
                ),
            ));
        }
        iso::refuse_as_disk(&image, "deployed onto a disk")?;
        if image.kind != ImageKind::Whole {
            d.bytes_total = image.virtual_size.unwrap_or(0);
            expanded.push(d);
            continue;
        }
        if d.device.is_some() {
            return Err(ApiError::bad(
                "invalid_device",
                format!(
                    "image {} is a whole-machine image: it goes onto the host's disks in order \
                     (give it as the image), or map its disk images {:?} with --disk DEV=IMAGE",
                    image.id, image.members
                ),
            ));
        }
        for member in &image.members {
            let m = images::get(&tx, caller, *member)?;
            expanded.push(DeployDisk {
                device: None,
                image_id: m.id,
                phase: None,
                bytes_done: 0,
                bytes_total: m.virtual_size.unwrap_or(0),
                eta_secs: None,
            });
        }
    }
    let disks = expanded;
    if disks.len() > 32 {
        return Err(ApiError::bad(
            "invalid_body",
            "a deployment writes at most 32 disks",
        ));
    }
    refuse_busy(&host)?;
    let id = Uuid::new_v4();
    let now = now_ms();
    tx.execute(
        "INSERT INTO deployments (id, host_id, state, mode, disks, created_by, created_at, updated_at)
         VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?6)",
        params![
            id.to_string(),
            host.id.to_string(),
            mode,
            json(&disks)?,
            caller.project,
            now
        ],
    )?;
    set_state(
        &tx,
        host.id,
        HostState::Deploying,
        &format!("deployment {id} assigned"),
    )?;
    tx.commit()?;
    latest_deployment(conn, host.id)?
        .ok_or_else(|| ApiError::Internal("deployment vanished".into()))
}

pub(crate) fn refuse_busy(host: &Host) -> Result<(), ApiError> {
    if matches!(
        host.state,
        HostState::Deploying | HostState::Capturing | HostState::Iso
    ) {
        return Err(ApiError::conflict(
            "host_busy",
            format!(
                "host {} is {} already; `kagami host release` it first",
                host.mac,
                host.state.as_str()
            ),
        ));
    }
    Ok(())
}

/// Asks a host to capture its disks into a new image at its next network boot: the host is
/// `capturing`, boots the agent, which reads the disks and uploads what the store lacks.
pub fn capture(
    conn: &mut Connection,
    caller: &Caller,
    key: &str,
    req: CaptureRequest,
) -> Result<Deployment, ApiError> {
    images::check_name(&req.name)?;
    let kinds = ["system", "data", "whole"];
    if !kinds.contains(&req.kind.as_str()) {
        return Err(ApiError::bad(
            "invalid_kind",
            format!(
                "a capture's kind is system, data or whole, not '{}'",
                req.kind
            ),
        ));
    }
    if req.kind != "whole" && req.devices.len() > 1 {
        return Err(ApiError::bad(
            "invalid_device",
            format!(
                "a {} image is one disk; capture several as a whole-machine image (kind whole)",
                req.kind
            ),
        ));
    }
    if req.devices.len() > images::MAX_MEMBERS {
        return Err(ApiError::bad(
            "invalid_device",
            format!("at most {} disks", images::MAX_MEMBERS),
        ));
    }
    for dev in &req.devices {
        check_device(dev)?;
    }
    let tx = conn.transaction()?;
    let host = get(&tx, key)?;
    refuse_busy(&host)?;
    let spec = CaptureSpec {
        name: req.name,
        kind: req.kind,
        devices: req.devices,
        project: caller.project.clone(),
        return_state: host.state.as_str().to_string(),
        made: Vec::new(),
        image: None,
        progress: None,
    };
    let id = Uuid::new_v4();
    let now = now_ms();
    tx.execute(
        "INSERT INTO deployments (id, host_id, state, mode, disks, created_by, created_at, updated_at, action, capture)
         VALUES (?1, ?2, 'pending', 'full', '[]', ?3, ?4, ?4, 'capture', ?5)",
        params![
            id.to_string(),
            host.id.to_string(),
            caller.project,
            now,
            json(&spec)?
        ],
    )?;
    set_state(
        &tx,
        host.id,
        HostState::Capturing,
        &format!("capture {id} assigned"),
    )?;
    tx.commit()?;
    latest_deployment(conn, host.id)?.ok_or_else(|| ApiError::Internal("capture vanished".into()))
}

fn json<T: Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(e.to_string()))
}

fn check_device(dev: &str) -> Result<(), ApiError> {
    if !dev.starts_with("/dev/") || dev.len() > 128 || dev.contains("..") {
        return Err(ApiError::bad(
            "invalid_device",
            format!("'{dev}' is not a device path under /dev/"),
        ));
    }
    Ok(())
}

/// The agent's unfinished capture, and the project its images go to; an agent with none may
/// not write images or blocks.
pub fn agents_capture(
    conn: &Connection,
    agent: &AgentCaller,
) -> Result<(Deployment, CaptureSpec, Caller), ApiError> {
    match open_deployment(conn, agent)? {
        Some(d) if d.action == "capture" => {
            let spec = d
                .capture
                .clone()
                .ok_or_else(|| ApiError::Internal("a capture without its request".into()))?;
            let caller = Caller {
                project: spec.project.clone(),
                role: Role::Member,
            };
            Ok((d, spec, caller))
        }
        _ => Err(ApiError::Forbidden(
            "this agent has no capture to upload for".into(),
        )),
    }
}

/// An image the capturing agent makes for its capture: a private system, data or whole image
/// of the project that asked, recorded as the capture's (so the agent may commit or delete it).
/// What the host's disks hold decides nothing about who may see the image.
pub fn create_capture_image(
    conn: &mut Connection,
    agent: &AgentCaller,
    region: &str,
    mut new: images::NewImage,
) -> Result<kagami_images::model::Image, ApiError> {
    let (d, mut spec, caller) = agents_capture(conn, agent)?;
    if !matches!(
        new.kind,
        ImageKind::System | ImageKind::Data | ImageKind::Whole
    ) {
        return Err(ApiError::bad(
            "invalid_kind",
            format!(
                "a capture makes system, data or whole images, not {}",
                new.kind
            ),
        ));
    }
    new.visibility = kagami_images::model::Visibility::Private;
    new.protected = false;
    let image = images::create(conn, &caller, region, new)?;
    spec.made.push(image.id);
    if let Err(e) = save_capture(conn, d.id, &spec) {
        // Not the capture's: not kept (it holds no data yet).
        let _ = images::delete(conn, &caller, image.id);
        return Err(e);
    }
    Ok(image)
}

/// Stores a capture's request and result; a pending capture is running from its agent's
/// first word on (a finished one keeps its state).
fn save_capture(conn: &Connection, deployment: Uuid, spec: &CaptureSpec) -> Result<(), ApiError> {
    conn.execute(
        "UPDATE deployments SET capture = ?2, updated_at = ?3,
             state = CASE state WHEN 'pending' THEN 'running' ELSE state END
         WHERE id = ?1",
        params![deployment.to_string(), json(spec)?, now_ms()],
    )?;
    Ok(())
}

/// The agent's capture, if `image` is one it made (the only images it may commit or delete).
pub fn agent_may_write(
    conn: &Connection,
    agent: &AgentCaller,
    image: Uuid,
) -> Result<Caller, ApiError> {
    let (_, spec, caller) = agents_capture(conn, agent)?;
    if spec.made.contains(&image) {
        Ok(caller)
    } else {
        Err(ApiError::image_not_found(image))
    }
}

/// Ends whatever the host was doing: an unfinished deployment fails as released, agent
/// tokens die, and the host is `ready` (or `discovered` without inventory); an ISO boot ends
/// and the host returns to the state it had before.
pub fn release(conn: &mut Connection, key: &str) -> Result<Host, ApiError> {
    let tx = conn.transaction()?;
    let host = get(&tx, key)?;
    if let Some(boot) = iso::end(&tx, host.id)?
        && host.state == HostState::Iso
    {
        set_state(
            &tx,
            host.id,
            boot.return_state,
            &format!(
                "ISO boot of image {} released by an operator; back to {}",
                boot.image,
                boot.return_state.as_str()
            ),
        )?;
        tx.commit()?;
        return get_by_id(conn, host.id);
    }
    let now = now_ms();
    tx.execute(
        "UPDATE deployments SET state = 'failed', error = 'released by an operator', updated_at = ?2, finished_at = ?2
         WHERE host_id = ?1 AND state IN ('pending', 'running')",
        params![host.id.to_string(), now],
    )?;
    tx.execute(
        "DELETE FROM agent_tokens WHERE host_id = ?1",
        [host.id.to_string()],
    )?;
    let state = if host.inventory.is_some() {
        HostState::Ready
    } else {
        HostState::Discovered
    };
    set_state(&tx, host.id, state, "released by an operator")?;
    tx.commit()?;
    get_by_id(conn, host.id)
}

/// Forgets a host, its history, deployments and tokens.
pub fn forget(conn: &mut Connection, key: &str) -> Result<(), ApiError> {
    let host = get(conn, key)?;
    conn.execute("DELETE FROM hosts WHERE id = ?1", [host.id.to_string()])?;
    Ok(())
}

/// A fresh token for this boot of the host; earlier boots' tokens stop working.
pub fn mint_agent_token(conn: &mut Connection, host: Uuid) -> Result<String, ApiError> {
    let tx = conn.transaction()?;
    let secret = insert_boot_token(&tx, host, None)?;
    tx.commit()?;
    Ok(secret)
}

/// Replaces the host's boot tokens with a new one: the agent's (`image` None), or an ISO
/// boot's, which reads `image` only (see [`iso::authenticate`]).
pub(crate) fn insert_boot_token(
    conn: &Connection,
    host: Uuid,
    image: Option<Uuid>,
) -> Result<String, ApiError> {
    let secret = new_secret()?;
    conn.execute(
        "DELETE FROM agent_tokens WHERE host_id = ?1",
        [host.to_string()],
    )?;
    conn.execute(
        "INSERT INTO agent_tokens (secret_hash, host_id, created_at, image_id) VALUES (?1, ?2, ?3, ?4)",
        params![
            hash_secret(&secret),
            host.to_string(),
            now_ms(),
            image.map(|i| i.to_string())
        ],
    )?;
    Ok(secret)
}

pub fn authenticate_agent(
    conn: &Connection,
    secret: &str,
) -> Result<Option<AgentCaller>, ApiError> {
    let host: Option<String> = conn
        .query_row(
            "SELECT host_id FROM agent_tokens WHERE secret_hash = ?1 AND image_id IS NULL",
            [hash_secret(secret)],
            |r| r.get(0),
        )
        .optional()?;
    Ok(host.map(|h| AgentCaller {
        host_id: h.parse().unwrap_or_default(),
    }))
}

/// The agent's deployment, if it has an unfinished one.
fn open_deployment(conn: &Connection, agent: &AgentCaller) -> Result<Option<Deployment>, ApiError> {
    Ok(latest_deployment(conn, agent.host_id)?
        .filter(|d| d.state == "pending" || d.state == "running"))
}

pub fn task(conn: &Connection, agent: &AgentCaller) -> Result<Task, ApiError> {
    Ok(match open_deployment(conn, agent)? {
        Some(Deployment {
            id,
            capture: Some(spec),
            ..
        }) => {
            let host = get_by_id(conn, agent.host_id)?;
            Task::Capture {
                deployment: id,
                name: spec.name,
                kind: spec.kind,
                disks: spec.devices,
                source: host.name.unwrap_or(host.mac),
            }
        }
        Some(d) => Task::Deploy {
            deployment: d.id,
            mode: d.mode,
            disks: d.disks,
        },
        None => Task::Wait,
    })
}

/// Whether the agent may read `image`: it is on a disk of its unfinished deployment.
pub fn agent_may_read(conn: &Connection, agent: &AgentCaller, image: Uuid) -> Result<(), ApiError> {
    match open_deployment(conn, agent)? {
        Some(d) if d.disks.iter().any(|disk| disk.image_id == image) => Ok(()),
        _ => Err(ApiError::image_not_found(image)),
    }
}

/// Stores the agent's inventory; a `discovered` host becomes `ready`.
pub fn record_inventory(
    conn: &mut Connection,
    agent: &AgentCaller,
    inventory: &Value,
) -> Result<Host, ApiError> {
    let text = serde_json::to_string(inventory).map_err(|e| ApiError::Internal(e.to_string()))?;
    let tx = conn.transaction()?;
    let host = get_by_id(&tx, agent.host_id)?;
    tx.execute(
        "UPDATE hosts SET inventory = ?2, updated_at = ?3 WHERE id = ?1",
        params![host.id.to_string(), text, now_ms()],
    )?;
    if host.state == HostState::Discovered {
        set_state(
            &tx,
            host.id,
            HostState::Ready,
            "inventory reported by the agent",
        )?;
    }
    mark(&tx, host.id, Milestone::Agent)?;
    tx.commit()?;
    get_by_id(conn, agent.host_id)
}

fn agents_deployment(
    conn: &Connection,
    agent: &AgentCaller,
    id: Uuid,
) -> Result<Deployment, ApiError> {
    match open_deployment(conn, agent)? {
        Some(d) if d.id == id => Ok(d),
        _ => Err(ApiError::conflict(
            "not_current",
            format!("deployment {id} is not this host's current deployment (released or finished)"),
        )),
    }
}

pub fn record_progress(
    conn: &mut Connection,
    agent: &AgentCaller,
    p: &Progress,
) -> Result<(), ApiError> {
    let tx = conn.transaction()?;
    let mut d = agents_deployment(&tx, agent, p.deployment)?;
    let phase: String = p.phase.chars().take(32).collect();
    if let Some(mut spec) = d.capture.take() {
        spec.progress = Some(CaptureProgress {
            disk: p.disk,
            phase,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            eta_secs: p.eta_secs,
        });
        save_capture(&tx, d.id, &spec)?;
        tx.commit()?;
        return Ok(());
    }
    let disk = d.disks.get_mut(p.disk).ok_or_else(|| {
        ApiError::bad(
            "invalid_disk",
            format!("deployment {} has no disk {}", d.id, p.disk),
        )
    })?;
    disk.phase = Some(phase);
    disk.bytes_done = p.bytes_done;
    disk.bytes_total = p.bytes_total;
    disk.eta_secs = p.eta_secs;
    tx.execute(
        "UPDATE deployments SET state = 'running', disks = ?2, updated_at = ?3 WHERE id = ?1",
        params![d.id.to_string(), json(&d.disks)?, now_ms()],
    )?;
    tx.commit()?;
    Ok(())
}

/// The agent's result: the deployment ends, the host is `deployed` or `failed`.
pub fn record_outcome(
    conn: &mut Connection,
    agent: &AgentCaller,
    o: &Outcome,
) -> Result<Host, ApiError> {
    let tx = conn.transaction()?;
    mark(&tx, agent.host_id, Milestone::Result)?;
    let mut d = agents_deployment(&tx, agent, o.deployment)?;
    let now = now_ms();
    d.timings.extend(
        o.timings
            .iter()
            .filter(|(k, _)| !k.ends_with("_at"))
            .map(|(k, v)| (k.chars().take(32).collect(), *v))
            .take(32),
    );
    let (state, error) = match &o.error {
        None => ("succeeded", None),
        Some(e) => ("failed", Some(e.chars().take(2000).collect::<String>())),
    };
    tx.execute(
        "UPDATE deployments SET state = ?2, error = ?3, timings = ?4, updated_at = ?5, finished_at = ?5 WHERE id = ?1",
        params![
            d.id.to_string(),
            state,
            error,
            json(&d.timings)?,
            now
        ],
    )?;
    if let Some(mut spec) = d.capture.take() {
        // A capture returns the host to where it was; its image must be one it made.
        if error.is_none() {
            match o.image {
                Some(image) if spec.made.contains(&image) => spec.image = Some(image),
                _ => {
                    return Err(ApiError::bad(
                        "invalid_image",
                        "a capture's result names the image it made",
                    ));
                }
            }
        }
        save_capture(&tx, d.id, &spec)?;
        let why = match (&error, spec.image) {
            (None, Some(image)) => format!("capture {} made image {image}", d.id),
            (Some(e), _) => format!("capture {} failed: {e}", d.id),
            _ => format!("capture {} ended", d.id),
        };
        set_state(
            &tx,
            agent.host_id,
            HostState::parse(&spec.return_state),
            &why,
        )?;
        tx.commit()?;
        return get_by_id(conn, agent.host_id);
    }
    match &error {
        None => set_state(
            &tx,
            agent.host_id,
            HostState::Deployed,
            &format!("deployment {} succeeded", d.id),
        )?,
        Some(e) => set_state(
            &tx,
            agent.host_id,
            HostState::Failed,
            &format!("deployment {} failed: {e}", d.id),
        )?,
    }
    tx.commit()?;
    get_by_id(conn, agent.host_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_normalized_and_checked() {
        assert_eq!(
            normalize_mac("AA-bb-CC-00-11-22").ok().as_deref(),
            Some("aa:bb:cc:00:11:22")
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:fg",
            "aabb.ccdd.eeff",
            "aa:bb:cc:dd:ee:ff:00",
        ] {
            assert!(normalize_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phases_are_the_gaps_between_milestones_in_order() {
        let t: BTreeMap<String, f64> = [
            ("dhcp_at", 4.0),
            ("script_at", 9.5),
            ("agent_at", 30.0),
            ("result_at", 33.0),
            ("local_boot_at", 40.0),
            ("write", 2.5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let p = phases(&t);
        let want = [
            ("power_on", 4.0),
            ("ipxe", 5.5),
            ("agent_up", 20.5),
            ("write", 2.5),
            ("reboot", 7.0),
        ];
        for (k, v) in want {
            assert_eq!(p.get(k), Some(&v), "{k}: {p:?}");
        }
        // Without the agent's own figure, the write is agent report to result; a milestone
        // missing (or out of order) leaves its phase out rather than inventing one.
        let mut t = t;
        t.remove("write");
        t.remove("dhcp_at");
        t.insert("local_boot_at".into(), 1.0);
        let p = phases(&t);
        assert_eq!(p.get("write"), Some(&3.0));
        for gone in ["power_on", "ipxe", "reboot"] {
            assert!(!p.contains_key(gone), "{gone}: {p:?}");
        }
    }
}
