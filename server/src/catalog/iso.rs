//! ISO transitional boots: a host boots an ISO image from the network, temporarily — to install
//! an OS by hand, rescue a machine, run firmware tools — and then goes back to its own disk.
//!
//! `kagami host boot-iso HOST --image ID` puts the host in state `iso` (remembering the state it
//! had); DHCP hands it a boot file and its iPXE script `sanboot`s the ISO over HTTP from
//! `/v1/images/{id}/content?token=…`. Each script mints a per-boot token (iPXE cannot send a
//! header) that reads exactly that image's content and nothing else: no other image, no other
//! route, not the agent API. It dies with the host's next boot token, its next network boot
//! once it is no longer `iso`, a release, or the host. `--until next-boot` returns the host to
//! its state as soon as one script has been served (the booted ISO keeps reading until the host
//! boots again); `--until release` (the default) lasts until `kagami host release`.
//!
//! `--via iscsi` sanboots the ISO from the iSCSI target instead (`sanboot iscsi:…`, its target
//! `iqn.2026-11.io.kagami:<id>`, LUN 0), iPXE logging in with CHAP credentials derived from the
//! same per-boot token ([`crate::stream::iscsi::chap`]): they open that image's target only,
//! list only it in discovery, and stop opening it once the token dies.
//!
//! An ISO is never a disk: deploying one or exporting it as a disk image format is refused.

use kagami_images::model::{Image, ImageKind, ImageStatus};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::hosts::{self, Host, HostState};
use crate::catalog::tenancy::{Caller, hash_secret};
use crate::catalog::{images, now_ms, rfc3339};
use crate::error::ApiError;

/// How long an ISO boot lasts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Until {
    /// Every network boot of the host boots the ISO until `kagami host release`.
    #[default]
    Release,
    /// One boot: the host returns to its state once its script has been served.
    NextBoot,
}

impl Until {
    pub fn as_str(self) -> &'static str {
        match self {
            Until::Release => "release",
            Until::NextBoot => "next-boot",
        }
    }
}

/// How a host's iPXE reaches its ISO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// `sanboot http://…/v1/images/{id}/content?token=…` (Range requests).
    #[default]
    Http,
    /// `sanboot iscsi:…` against the server's iSCSI target, with per-boot CHAP credentials.
    Iscsi,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Iscsi => "iscsi",
        }
    }

    /// What a log line adds about it: nothing for the default.
    pub fn suffix(self) -> &'static str {
        match self {
            Via::Http => "",
            Via::Iscsi => " over iSCSI",
        }
    }

    fn parse(s: &str) -> Via {
        if s == "iscsi" { Via::Iscsi } else { Via::Http }
    }
}

/// A host's ISO boot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IsoBoot {
    pub image: Uuid,
    pub until: Until,
    #[serde(default)]
    pub via: Via,
    /// The host's state before, which it returns to after.
    pub return_state: HostState,
    /// The project that asked for it.
    pub created_by: String,
    pub created_at: String,
}

/// `POST /v1/hosts/{key}/boot-iso`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootIsoRequest {
    pub image: Uuid,
    #[serde(default)]
    pub until: Until,
    #[serde(default)]
    pub via: Via,
}

/// Who an ISO boot's token speaks for: one boot of a host, reading one image.
#[derive(Clone, Debug)]
pub struct IsoReader {
    pub host_id: Uuid,
    pub image: Uuid,
}

/// What a host in state `iso` boots now.
#[derive(Debug)]
pub enum Served {
    /// `sanboot` this image with this token, over `via`.
    Sanboot {
        image: Uuid,
        token: String,
        via: Via,
    },
    /// Nothing to boot (the ISO was deleted, say): the local disk, and why.
    Local(String),
}

/// Refuses to use an ISO image as a disk (`doing`: "deployed onto a disk", …).
pub fn refuse_as_disk(image: &Image, doing: &str) -> Result<(), ApiError> {
    if image.kind == ImageKind::Iso {
        return Err(ApiError::conflict(
            "iso_image",
            format!(
                "image {} is an ISO: it cannot be {doing}; boot it temporarily with \
                 `kagami host boot-iso HOST --image {}`",
                image.id, image.id
            ),
        ));
    }
    Ok(())
}

/// The host's ISO boot, if it is in one.
pub fn get(conn: &Connection, host: Uuid) -> Result<Option<IsoBoot>, ApiError> {
    Ok(conn
        .query_row(
            "SELECT image_id, until, return_state, created_by, created_at, via FROM iso_boots WHERE host_id = ?1",
            [host.to_string()],
            |r| {
                let image: String = r.get(0)?;
                let until: String = r.get(1)?;
                Ok(IsoBoot {
                    image: image.parse().unwrap_or_default(),
                    until: if until == "next-boot" {
                        Until::NextBoot
                    } else {
                        Until::Release
                    },
                    via: Via::parse(&r.get::<_, String>(5)?),
                    return_state: HostState::parse(&r.get::<_, String>(2)?),
                    created_by: r.get(3)?,
                    created_at: rfc3339(r.get(4)?),
                })
            },
        )
        .optional()?)
}

/// Makes the host's next network boots `sanboot` an active ISO image the caller may see;
/// `iscsi_on`: whether the server runs its iSCSI target (`--via iscsi` needs it).
pub fn boot_iso(
    conn: &mut Connection,
    caller: &Caller,
    key: &str,
    req: BootIsoRequest,
    iscsi_on: bool,
) -> Result<Host, ApiError> {
    if req.via == Via::Iscsi && !iscsi_on {
        return Err(ApiError::conflict(
            "iscsi_off",
            "this server runs no iSCSI target, so a host cannot sanboot over iSCSI: start it \
             with `kagami serve --iscsi-listen ADDR:PORT` (or iscsi.listen in kagami.toml), or \
             boot over HTTP (--via http)",
        ));
    }
    let tx = conn.transaction()?;
    let host = hosts::get(&tx, key)?;
    let image = images::get(&tx, caller, req.image)?;
    if image.kind != ImageKind::Iso {
        return Err(ApiError::bad(
            "not_iso",
            format!(
                "image {} is a {} image; only ISO images (kind iso) boot with boot-iso — \
                 `kagami host deploy` writes disk images",
                image.id, image.kind
            ),
        ));
    }
    if image.status != ImageStatus::Active {
        return Err(ApiError::conflict(
            "not_active",
            format!(
                "image {} is {}; only active images can be booted",
                image.id, image.status
            ),
        ));
    }
    hosts::refuse_busy(&host)?;
    tx.execute(
        "INSERT INTO iso_boots (host_id, image_id, until, return_state, created_by, created_at, via)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            host.id.to_string(),
            image.id.to_string(),
            req.until.as_str(),
            host.state.as_str(),
            caller.project,
            now_ms(),
            req.via.as_str()
        ],
    )?;
    let until = match req.until {
        Until::Release => "until released",
        Until::NextBoot => "for its next network boot",
    };
    let via = req.via.suffix();
    hosts::set_state(
        &tx,
        host.id,
        HostState::Iso,
        &format!("boots ISO image {} {until}{via}", image.id),
    )?;
    tx.commit()?;
    hosts::get_by_id(conn, host.id)
}

/// The boot of a host in state `iso` whose iPXE script is being served: a fresh token for its
/// ISO, and with `--until next-boot` the host back in its state.
pub fn serve(conn: &mut Connection, host: &Host) -> Result<Served, ApiError> {
    let tx = conn.transaction()?;
    let Some(boot) = get(&tx, host.id)? else {
        return Ok(Served::Local("it has no ISO boot".into()));
    };
    let usable = images::get(&tx, &Caller::system(), boot.image)
        .is_ok_and(|i| i.kind == ImageKind::Iso && i.status == ImageStatus::Active);
    if !usable {
        return Ok(Served::Local(format!(
            "its ISO image {} is gone or no longer active (release the host)",
            boot.image
        )));
    }
    let token = hosts::insert_boot_token(&tx, host.id, Some(boot.image))?;
    if boot.until == Until::NextBoot {
        tx.execute(
            "DELETE FROM iso_boots WHERE host_id = ?1",
            [host.id.to_string()],
        )?;
        hosts::set_state(
            &tx,
            host.id,
            boot.return_state,
            &format!(
                "booted ISO image {} once (until next-boot); back to {}",
                boot.image,
                boot.return_state.as_str()
            ),
        )?;
    }
    tx.commit()?;
    Ok(Served::Sanboot {
        image: boot.image,
        token,
        via: boot.via,
    })
}

/// Ends the host's ISO boot (a release): its row and its tokens go; returns what it was.
pub fn end(conn: &Connection, host: Uuid) -> Result<Option<IsoBoot>, ApiError> {
    let boot = get(conn, host)?;
    conn.execute(
        "DELETE FROM iso_boots WHERE host_id = ?1",
        [host.to_string()],
    )?;
    end_reads(conn, host)?;
    Ok(boot)
}

/// Ends the reading of an earlier boot's ISO: the host boots again, its ISO tokens die.
pub fn end_reads(conn: &Connection, host: Uuid) -> Result<(), ApiError> {
    conn.execute(
        "DELETE FROM agent_tokens WHERE host_id = ?1 AND image_id IS NOT NULL",
        [host.to_string()],
    )?;
    Ok(())
}

/// The ISO boot an ISO token was minted for.
pub fn authenticate(conn: &Connection, secret: &str) -> Result<Option<IsoReader>, ApiError> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT host_id, image_id FROM agent_tokens WHERE secret_hash = ?1 AND image_id IS NOT NULL",
            [hash_secret(secret)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.map(|(host, image)| IsoReader {
        host_id: host.parse().unwrap_or_default(),
        image: image.parse().unwrap_or_default(),
    }))
}

/// The live ISO tokens whose hash starts with `prefix`, with their hashes: whom a CHAP name
/// may stand for (`kagami-` and 16 hex digits of the hash, see `stream::iscsi::chap`).
pub fn by_hash_prefix(
    conn: &Connection,
    prefix: &[u8],
) -> Result<Vec<(IsoReader, Vec<u8>)>, ApiError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host_id, image_id, secret_hash FROM agent_tokens
         WHERE image_id IS NOT NULL AND substr(secret_hash, 1, ?1) = ?2",
    )?;
    let rows = stmt.query_map(params![prefix.len() as i64, prefix], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (host, image, hash) = row?;
        out.push((
            IsoReader {
                host_id: host.parse().unwrap_or_default(),
                image: image.parse().unwrap_or_default(),
            },
            hash,
        ));
    }
    Ok(out)
}

/// Whether the ISO token of `reader` (by its hash) is still alive.
pub fn alive(conn: &Connection, hash: &[u8]) -> Result<bool, ApiError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM agent_tokens WHERE secret_hash = ?1 AND image_id IS NOT NULL",
            [hash],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
