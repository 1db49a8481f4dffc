//! Image rows: create, read with tenancy rules, list with filters and keyset pagination, update,
//! delete, and the upload state machine (queued|failed → saving → active | failed).

use std::collections::BTreeMap;

use kagami_images::Manifest;
use kagami_images::model::{BootMode, Image, ImageKind, ImagePage, ImageStatus, Visibility};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};
use serde::Deserialize;
use uuid::Uuid;

use crate::catalog::tenancy::Caller;
use crate::catalog::{blocks, now_ms, rfc3339};
use crate::error::ApiError;

const COLUMNS: &str = "id, name, description, owner, kind, visibility, status, status_reason, region, virtual_size, \
    data_size, data_blocks, digest, min_ram_mb, min_disk_gb, boot_mode, architecture, os_type, os_distro, os_version, \
    tags, properties, protected, created_at, updated_at, parent_id, disk_index, source_host, source_disk, previous_id, \
    (SELECT json_group_array(m.id ORDER BY m.disk_index) FROM images AS m WHERE m.parent_id = images.id)";

/// Disks in a whole-machine image (as in a deployment).
pub const MAX_MEMBERS: usize = 32;

/// Bounds on caller-supplied text, so no request can bloat the catalog.
pub const MAX_NAME: usize = 255;
pub const MAX_DESCRIPTION: usize = 4096;
pub const MAX_TAGS: usize = 64;
pub const MAX_PROPERTIES: usize = 128;
pub const MAX_VALUE: usize = 1024;

/// The fields a caller sets when creating an image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewImage {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_kind")]
    pub kind: ImageKind,
    #[serde(default = "default_visibility")]
    pub visibility: Visibility,
    #[serde(default)]
    pub min_ram_mb: u64,
    #[serde(default)]
    pub min_disk_gb: u64,
    pub boot_mode: Option<BootMode>,
    pub architecture: Option<String>,
    pub os_type: Option<String>,
    pub os_distro: Option<String>,
    pub os_version: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub protected: bool,
    /// For kind `whole`: the disk images it groups, in order (system disk first); each must be
    /// an active system or data image of the same project, in no other whole-machine image.
    #[serde(default)]
    pub members: Vec<Uuid>,
    /// Lineage of a capture: the host (and disk) it was made from.
    pub source_host: Option<String>,
    pub source_disk: Option<String>,
}

fn default_kind() -> ImageKind {
    ImageKind::System
}

fn default_visibility() -> Visibility {
    Visibility::Private
}

/// A partial update: absent fields stay; `null` clears an optional field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub visibility: Option<Visibility>,
    pub min_ram_mb: Option<u64>,
    pub min_disk_gb: Option<u64>,
    #[serde(default, deserialize_with = "nullable")]
    pub boot_mode: Option<Option<BootMode>>,
    #[serde(default, deserialize_with = "nullable")]
    pub architecture: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub os_type: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub os_distro: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub os_version: Option<Option<String>>,
    pub tags: Option<Vec<String>>,
    pub properties: Option<BTreeMap<String, String>>,
    pub protected: Option<bool>,
}

/// Tells a present `null` (Some(None)) from an absent field (None).
fn nullable<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::bad(
            "field_too_long",
            format!("{field} is longer than {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ApiError::bad(
            "invalid_characters",
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

pub fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::bad("invalid_name", "name must not be empty"));
    }
    check_text("name", name, MAX_NAME)
}

fn check_tags(tags: &[String]) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::bad(
            "too_many_tags",
            format!("an image has at most {MAX_TAGS} tags"),
        ));
    }
    tags.iter().try_for_each(|t| check_text("tag", t, MAX_NAME))
}

fn check_properties(props: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if props.len() > MAX_PROPERTIES {
        return Err(ApiError::bad(
            "too_many_properties",
            format!("an image has at most {MAX_PROPERTIES} properties"),
        ));
    }
    for (k, v) in props {
        check_text("property name", k, MAX_NAME)?;
        check_text("property value", v, MAX_VALUE)?;
    }
    Ok(())
}

fn check_optional(field: &str, value: Option<&String>) -> Result<(), ApiError> {
    value.map_or(Ok(()), |v| check_text(field, v, MAX_NAME))
}

impl NewImage {
    fn check(&self) -> Result<(), ApiError> {
        check_name(&self.name)?;
        check_text("description", &self.description, MAX_DESCRIPTION)?;
        check_optional("architecture", self.architecture.as_ref())?;
        check_optional("os_type", self.os_type.as_ref())?;
        check_optional("os_distro", self.os_distro.as_ref())?;
        check_optional("os_version", self.os_version.as_ref())?;
        check_tags(&self.tags)?;
        check_optional("source_host", self.source_host.as_ref())?;
        check_optional("source_disk", self.source_disk.as_ref())?;
        check_properties(&self.properties)
    }
}

fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse<T: std::str::FromStr>(text: String) -> rusqlite::Result<T> {
    text.parse()
        .map_err(|_| rusqlite::Error::InvalidColumnType(0, text, rusqlite::types::Type::Text))
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|n| n as u64)
}

fn row_to_image(r: &Row<'_>) -> rusqlite::Result<Image> {
    let id: String = r.get(0)?;
    Ok(Image {
        id: parse(id)?,
        name: r.get(1)?,
        description: r.get(2)?,
        owner: r.get(3)?,
        kind: parse(r.get(4)?)?,
        visibility: parse(r.get(5)?)?,
        status: parse(r.get(6)?)?,
        status_reason: r.get(7)?,
        region: r.get(8)?,
        virtual_size: opt_u64(r.get(9)?),
        data_size: opt_u64(r.get(10)?),
        data_blocks: opt_u64(r.get(11)?),
        digest: r.get(12)?,
        min_ram_mb: r.get::<_, i64>(13)? as u64,
        min_disk_gb: r.get::<_, i64>(14)? as u64,
        boot_mode: r.get::<_, Option<String>>(15)?.map(parse).transpose()?,
        architecture: r.get(16)?,
        os_type: r.get(17)?,
        os_distro: r.get(18)?,
        os_version: r.get(19)?,
        tags: serde_json::from_str(&r.get::<_, String>(20)?).unwrap_or_default(),
        properties: serde_json::from_str(&r.get::<_, String>(21)?).unwrap_or_default(),
        protected: r.get(22)?,
        created_at: rfc3339(r.get(23)?),
        updated_at: rfc3339(r.get(24)?),
        parent: r.get::<_, Option<String>>(25)?.map(parse).transpose()?,
        disk_index: r.get::<_, Option<i64>>(26)?.map(|i| i as u32),
        source_host: r.get(27)?,
        source_disk: r.get(28)?,
        previous: r.get::<_, Option<String>>(29)?.map(parse).transpose()?,
        members: r
            .get::<_, Option<String>>(30)?
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or_default(),
    })
}

/// Whether `caller` may see an image owned by `owner` with `visibility`.
fn visible(caller: &Caller, owner: &str, visibility: Visibility) -> bool {
    // Shared images are visible to their owner only until image membership lands.
    caller.is_admin()
        || caller.project == owner
        || matches!(visibility, Visibility::Public | Visibility::Marketplace)
}

/// Parses an image id from a path; a malformed id is a client mistake, not a missing image.
pub fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad(
            "invalid_id",
            format!(
                "'{}' is not an image id (a UUID)",
                text.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// Creates an image: `queued` until data arrives — or, for a whole-machine image, `active` at
/// once over its (already active) disk images, which it takes as members in the same
/// transaction. A capture's image records the previous capture of the same host and disk.
pub fn create(
    conn: &Connection,
    caller: &Caller,
    region: &str,
    new: NewImage,
) -> Result<Image, ApiError> {
    new.check()?;
    let id = Uuid::new_v4();
    let now = now_ms();
    let tx = conn.unchecked_transaction()?;
    let members = whole_members(&tx, caller, &new)?;
    let previous = previous_capture(&tx, &caller.project, &new)?;
    let (status, virtual_size, data_size, data_blocks) = if new.kind == ImageKind::Whole {
        let sum = |f: fn(&Image) -> Option<u64>| {
            Some(members.iter().map(|m| f(m).unwrap_or(0)).sum::<u64>() as i64)
        };
        (
            "active",
            sum(|m| m.virtual_size),
            sum(|m| m.data_size),
            sum(|m| m.data_blocks),
        )
    } else {
        ("queued", None, None, None)
    };
    tx.execute(
        "INSERT INTO images (id, name, description, owner, kind, visibility, status, region, min_ram_mb, min_disk_gb,
             boot_mode, architecture, os_type, os_distro, os_version, tags, properties, protected, created_at, updated_at,
             source_host, source_disk, previous_id, virtual_size, data_size, data_blocks)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?19, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?18,
             ?20, ?21, ?22, ?23, ?24, ?25)",
        params![
            id.to_string(),
            new.name,
            new.description,
            caller.project,
            new.kind.as_str(),
            new.visibility.as_str(),
            region,
            new.min_ram_mb as i64,
            new.min_disk_gb as i64,
            new.boot_mode.map(BootMode::as_str),
            new.architecture,
            new.os_type,
            new.os_distro,
            new.os_version,
            json_text(&new.tags),
            json_text(&new.properties),
            new.protected,
            now,
            status,
            new.source_host,
            new.source_disk,
            previous.map(|p| p.to_string()),
            virtual_size,
            data_size,
            data_blocks
        ],
    )?;
    for (i, m) in members.iter().enumerate() {
        tx.execute(
            "UPDATE images SET parent_id = ?2, disk_index = ?3, updated_at = ?4 WHERE id = ?1",
            params![m.id.to_string(), id.to_string(), i as i64, now],
        )?;
    }
    tx.commit()?;
    get(conn, caller, id)
}

/// The disk images a new whole-machine image groups, checked; none for other kinds.
fn whole_members(
    conn: &Connection,
    caller: &Caller,
    new: &NewImage,
) -> Result<Vec<Image>, ApiError> {
    if new.kind != ImageKind::Whole {
        if !new.members.is_empty() {
            return Err(ApiError::bad(
                "invalid_members",
                "only a whole-machine image (kind whole) has members",
            ));
        }
        return Ok(Vec::new());
    }
    if new.members.is_empty() || new.members.len() > MAX_MEMBERS {
        return Err(ApiError::bad(
            "invalid_members",
            format!(
                "a whole-machine image groups 1–{MAX_MEMBERS} disk images (members, system disk \
                 first); capture one with `kagami-agent capture --kind whole --disk … --disk …`"
            ),
        ));
    }
    let mut out: Vec<Image> = Vec::with_capacity(new.members.len());
    for id in &new.members {
        let m = get_owned(conn, caller, *id)?;
        if out.iter().any(|o| o.id == m.id) {
            return Err(ApiError::bad(
                "invalid_members",
                format!("image {id} is listed twice"),
            ));
        }
        if !matches!(m.kind, ImageKind::System | ImageKind::Data) {
            return Err(ApiError::bad(
                "invalid_members",
                format!(
                    "image {id} is a {} image; members are system or data disk images",
                    m.kind
                ),
            ));
        }
        if m.status != ImageStatus::Active {
            return Err(ApiError::conflict(
                "not_active",
                format!("image {id} is {}; members must be active", m.status),
            ));
        }
        if let Some(parent) = m.parent {
            return Err(ApiError::conflict(
                "in_whole_image",
                format!("image {id} is already a disk of whole-machine image {parent}"),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// The latest active image of the same project, kind, source host and disk: the capture
/// this one follows.
fn previous_capture(
    conn: &Connection,
    project: &str,
    new: &NewImage,
) -> Result<Option<Uuid>, ApiError> {
    let Some(host) = &new.source_host else {
        return Ok(None);
    };
    let id: Option<String> = conn
        .query_row(
            "SELECT id FROM images WHERE owner = ?1 AND source_host = ?2 AND kind = ?3
                 AND source_disk IS ?4 AND status = 'active'
             ORDER BY created_at DESC, rowid DESC LIMIT 1",
            params![project, host, new.kind.as_str(), new.source_disk],
            |r| r.get(0),
        )
        .optional()?;
    Ok(id.and_then(|i| i.parse().ok()))
}

/// An image and the captures before it, newest first (those the caller may see; at most 1000).
pub fn history(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Vec<Image>, ApiError> {
    let mut chain = vec![get(conn, caller, id)?];
    while let Some(previous) = chain.last().and_then(|i| i.previous) {
        if chain.len() >= 1000 || chain.iter().any(|i| i.id == previous) {
            break;
        }
        match get(conn, caller, previous) {
            Ok(image) => chain.push(image),
            Err(_) => break,
        }
    }
    Ok(chain)
}

/// An image the caller may see; anything else is "not found", so existence does not leak.
pub fn get(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Image, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM images WHERE id = ?1");
    let image = conn
        .query_row(&sql, [id.to_string()], row_to_image)
        .optional()?;
    match image {
        Some(img) if visible(caller, &img.owner, img.visibility) => Ok(img),
        _ => Err(ApiError::image_not_found(id)),
    }
}

/// An image the caller may change: visible, and owned by the caller's project (or admin).
fn get_owned(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Image, ApiError> {
    let image = get(conn, caller, id)?;
    if caller.is_admin() || image.owner == caller.project {
        Ok(image)
    } else {
        Err(ApiError::Forbidden(format!(
            "image {id} belongs to project '{}'; only its owner may change it",
            image.owner
        )))
    }
}

/// Filters, order and page of a listing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub name: Option<String>,
    pub kind: Option<ImageKind>,
    pub visibility: Option<Visibility>,
    pub status: Option<ImageStatus>,
    pub tag: Option<String>,
    pub owner: Option<String>,
    /// `created_at` (default), `updated_at`, `name` or `virtual_size`, optionally `:asc`/`:desc`.
    pub sort: Option<String>,
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

fn sort_column(sort: Option<&str>) -> Result<(&'static str, bool), ApiError> {
    let text = sort.unwrap_or("created_at");
    let (key, dir) = text.split_once(':').unwrap_or((text, "asc"));
    let column = match key {
        "created_at" => "created_at",
        "updated_at" => "updated_at",
        "name" => "name",
        "virtual_size" => "COALESCE(virtual_size, -1)",
        _ => {
            return Err(ApiError::bad(
                "invalid_sort",
                format!(
                    "cannot sort by '{key}'; use created_at, updated_at, name or virtual_size, with :asc or :desc"
                ),
            ));
        }
    };
    let desc = match dir {
        "asc" => false,
        "desc" => true,
        _ => {
            return Err(ApiError::bad(
                "invalid_sort",
                format!("sort direction '{dir}' must be asc or desc"),
            ));
        }
    };
    Ok((column, desc))
}

pub fn list(conn: &Connection, caller: &Caller, q: &ListQuery) -> Result<ImagePage, ApiError> {
    let (column, desc) = sort_column(q.sort.as_deref())?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    let mut arg = |clause: &str, v: Value, clauses: &mut Vec<String>| {
        args.push(v);
        clauses.push(clause.replace('?', &format!("?{}", args.len())));
    };
    if !caller.is_admin() {
        arg(
            "(owner = ? OR visibility IN ('public', 'marketplace'))",
            Value::Text(caller.project.clone()),
            &mut clauses,
        );
    }
    if let Some(v) = &q.name {
        arg("name = ?", Value::Text(v.clone()), &mut clauses);
    }
    if let Some(v) = q.kind {
        arg("kind = ?", Value::Text(v.as_str().into()), &mut clauses);
    }
    if let Some(v) = q.visibility {
        arg(
            "visibility = ?",
            Value::Text(v.as_str().into()),
            &mut clauses,
        );
    }
    if let Some(v) = q.status {
        arg("status = ?", Value::Text(v.as_str().into()), &mut clauses);
    }
    if let Some(v) = &q.tag {
        arg(
            "EXISTS (SELECT 1 FROM json_each(images.tags) WHERE value = ?)",
            Value::Text(v.clone()),
            &mut clauses,
        );
    }
    if let Some(v) = &q.owner {
        arg("owner = ?", Value::Text(v.clone()), &mut clauses);
    }
    if let Some(marker) = &q.marker {
        let marker = parse_id(marker)?;
        // The marker must be an image this caller can see, or pagination would leak existence.
        get(conn, caller, marker)?;
        let op = if desc { "<" } else { ">" };
        let key: Value = conn.query_row(
            &format!("SELECT {column} FROM images WHERE id = ?1"),
            [marker.to_string()],
            |r| r.get(0),
        )?;
        args.push(key);
        args.push(Value::Text(marker.to_string()));
        let (a, b) = (args.len() - 1, args.len());
        clauses.push(format!("({column}, id) {op} (?{a}, ?{b})"));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let dir = if desc { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT {COLUMNS} FROM images {filter} ORDER BY {column} {dir}, id {dir} LIMIT {}",
        limit + 1
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut images = stmt
        .query_map(params_from_iter(args), row_to_image)?
        .collect::<Result<Vec<_>, _>>()?;
    let next_marker = if images.len() > limit as usize {
        images.truncate(limit as usize);
        images.last().map(|i| i.id)
    } else {
        None
    };
    Ok(ImagePage {
        images,
        next_marker,
    })
}

pub fn update(
    conn: &Connection,
    caller: &Caller,
    id: Uuid,
    patch: ImagePatch,
) -> Result<Image, ApiError> {
    let mut image = get_owned(conn, caller, id)?;
    if let Some(v) = patch.name {
        check_name(&v)?;
        image.name = v;
    }
    if let Some(v) = patch.description {
        check_text("description", &v, MAX_DESCRIPTION)?;
        image.description = v;
    }
    if let Some(v) = patch.visibility {
        image.visibility = v;
    }
    if let Some(v) = patch.min_ram_mb {
        image.min_ram_mb = v;
    }
    if let Some(v) = patch.min_disk_gb {
        image.min_disk_gb = v;
    }
    if let Some(v) = patch.boot_mode {
        image.boot_mode = v;
    }
    for (field, value, slot) in [
        ("architecture", patch.architecture, &mut image.architecture),
        ("os_type", patch.os_type, &mut image.os_type),
        ("os_distro", patch.os_distro, &mut image.os_distro),
        ("os_version", patch.os_version, &mut image.os_version),
    ] {
        if let Some(v) = value {
            check_optional(field, v.as_ref())?;
            *slot = v;
        }
    }
    if let Some(v) = patch.tags {
        check_tags(&v)?;
        image.tags = v;
    }
    if let Some(v) = patch.properties {
        check_properties(&v)?;
        image.properties = v;
    }
    if let Some(v) = patch.protected {
        image.protected = v;
    }
    conn.execute(
        "UPDATE images SET name = ?2, description = ?3, visibility = ?4, min_ram_mb = ?5, min_disk_gb = ?6, boot_mode = ?7,
             architecture = ?8, os_type = ?9, os_distro = ?10, os_version = ?11, tags = ?12, properties = ?13,
             protected = ?14, updated_at = ?15
         WHERE id = ?1",
        params![
            id.to_string(),
            image.name,
            image.description,
            image.visibility.as_str(),
            image.min_ram_mb as i64,
            image.min_disk_gb as i64,
            image.boot_mode.map(BootMode::as_str),
            image.architecture,
            image.os_type,
            image.os_distro,
            image.os_version,
            json_text(&image.tags),
            json_text(&image.properties),
            image.protected,
            now_ms()
        ],
    )?;
    get(conn, caller, id)
}

/// Deletes an image and releases its blocks to GC. Refused while protected or while an upload
/// is in flight (the upload would otherwise commit into a deleted row).
pub fn delete(conn: &mut Connection, caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    let image = get_owned(conn, caller, id)?;
    if image.protected {
        return Err(ApiError::conflict(
            "image_protected",
            format!("image {id} is protected; set protected=false first"),
        ));
    }
    if image.status == ImageStatus::Saving {
        return Err(ApiError::conflict(
            "upload_in_progress",
            format!("image {id} is receiving data; retry when the upload ends"),
        ));
    }
    if let Some(parent) = image.parent {
        return Err(ApiError::conflict(
            "in_whole_image",
            format!(
                "image {id} is disk {} of whole-machine image {parent}; delete that image (its \
                 disks go with it)",
                image.disk_index.unwrap_or(0)
            ),
        ));
    }
    let tx = conn.transaction()?;
    let now = now_ms();
    // A whole-machine image takes its disk images with it: they go first, so the whole image
    // is no longer anyone's parent when its own row goes.
    let gone: Vec<String> = image
        .members
        .iter()
        .chain([&id])
        .map(Uuid::to_string)
        .collect();
    for g in &gone {
        let index: Option<Vec<u8>> =
            tx.query_row("SELECT manifest FROM images WHERE id = ?1", [g], |r| {
                r.get(0)
            })?;
        if let Some(index) = index {
            blocks::release(&tx, &index, now)?;
        }
        // The lineage closes over the gap: what followed it now follows what it followed.
        tx.execute(
            "UPDATE images SET previous_id = (SELECT previous_id FROM images WHERE id = ?1)
             WHERE previous_id = ?1",
            [g],
        )?;
        tx.execute("DELETE FROM images WHERE id = ?1", [g])?;
    }
    tx.commit()?;
    Ok(())
}

/// Refuses data for a whole-machine image: its disks are images of their own.
fn refuse_whole(image: &Image) -> Result<(), ApiError> {
    if image.kind == ImageKind::Whole {
        return Err(ApiError::conflict(
            "whole_image",
            format!(
                "image {} is a whole-machine image: its data is in its disk images (members)",
                image.id
            ),
        ));
    }
    Ok(())
}

/// queued|failed → saving. Only the owner uploads; an active image's content never changes.
pub fn begin_upload(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Image, ApiError> {
    let image = get_owned(conn, caller, id)?;
    refuse_whole(&image)?;
    let now = now_ms();
    let changed = conn.execute(
        "UPDATE images SET status = 'saving', status_reason = NULL, upload_started_at = ?2, updated_at = ?2
         WHERE id = ?1 AND status IN ('queued', 'failed')",
        params![id.to_string(), now],
    )?;
    if changed == 0 {
        return Err(ApiError::conflict(
            "wrong_state",
            format!(
                "image {id} is {}; data can be uploaded only to a queued or failed image (create a new image to change content)",
                image.status
            ),
        ));
    }
    get(conn, caller, id)
}

/// The image, if `caller` may upload into it now (it is queued or failed): checked before an
/// upload is staged, so a body is not received for nothing. [`begin_upload`] checks again.
pub fn check_uploadable(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Image, ApiError> {
    let image = get_owned(conn, caller, id)?;
    refuse_whole(&image)?;
    if !matches!(image.status, ImageStatus::Queued | ImageStatus::Failed) {
        return Err(ApiError::conflict(
            "wrong_state",
            format!(
                "image {id} is {}; data can be uploaded only to a queued or failed image (create a new image to change content)",
                image.status
            ),
        ));
    }
    Ok(image)
}

/// saving → failed, with the reason, only while import job `job` is still running: the image
/// is then that job's. Once the job has ended (failed with its image, in one transaction) the
/// image may be a retry's, and is left alone.
pub fn fail_upload_of_job(
    conn: &Connection,
    id: Uuid,
    job: Uuid,
    reason: &str,
) -> Result<(), ApiError> {
    conn.execute(
        "UPDATE images SET status = 'failed', status_reason = ?3, upload_started_at = NULL, updated_at = ?4
         WHERE id = ?1 AND status = 'saving'
           AND EXISTS (SELECT 1 FROM jobs WHERE id = ?2 AND state = 'running')",
        params![id.to_string(), job.to_string(), reason, now_ms()],
    )?;
    Ok(())
}

/// saving → failed, with the reason shown to the operator.
pub fn fail_upload(conn: &Connection, id: Uuid, reason: &str) -> Result<(), ApiError> {
    conn.execute(
        "UPDATE images SET status = 'failed', status_reason = ?2, upload_started_at = NULL, updated_at = ?3
         WHERE id = ?1 AND status = 'saving'",
        params![id.to_string(), reason, now_ms()],
    )?;
    Ok(())
}

/// saving → active, in the one transaction that stores the manifest and takes its references.
/// This is the single "blocks in → manifest committed" step every way of making an image ends in.
pub fn commit(
    conn: &mut Connection,
    caller: &Caller,
    id: Uuid,
    manifest: &Manifest,
) -> Result<Image, ApiError> {
    let tx = conn.transaction()?;
    let status: Option<String> = tx
        .query_row(
            "SELECT status FROM images WHERE id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    if status.as_deref() != Some("saving") {
        return Err(ApiError::conflict(
            "wrong_state",
            format!("image {id} is no longer receiving data; nothing was committed"),
        ));
    }
    blocks::reference(&tx, manifest)?;
    let (data_blocks, data_size) = manifest.data_stats();
    tx.execute(
        "UPDATE images SET status = 'active', status_reason = NULL, upload_started_at = NULL, virtual_size = ?2,
             data_size = ?3, data_blocks = ?4, digest = ?5, manifest = ?6, updated_at = ?7
         WHERE id = ?1",
        params![
            id.to_string(),
            manifest.virtual_size() as i64,
            data_size as i64,
            data_blocks as i64,
            format!("sha256:{}", manifest.digest()),
            manifest.encode_index(),
            now_ms()
        ],
    )?;
    tx.commit()?;
    get(conn, caller, id)
}

/// The stored manifest index of an active image the caller may see.
pub fn manifest_index(
    conn: &Connection,
    caller: &Caller,
    id: Uuid,
) -> Result<(Image, Vec<u8>), ApiError> {
    let image = get(conn, caller, id)?;
    refuse_whole(&image)?;
    if image.status != ImageStatus::Active {
        return Err(ApiError::conflict(
            "not_active",
            format!(
                "image {id} is {}; only active images can be read",
                image.status
            ),
        ));
    }
    let index: Vec<u8> = conn.query_row(
        "SELECT manifest FROM images WHERE id = ?1",
        [id.to_string()],
        |r| r.get(0),
    )?;
    Ok((image, index))
}

/// At start-up: uploads the previous run left in flight can never finish; mark them failed so
/// they never turn active, and let GC reclaim their blocks. Images fed by a durable job are
/// left `saving`: their job runs again.
pub fn fail_interrupted(conn: &Connection) -> Result<usize, ApiError> {
    Ok(conn.execute(
        "UPDATE images SET status = 'failed', status_reason = 'the server stopped during the upload; upload again',
             upload_started_at = NULL, updated_at = ?1
         WHERE status = 'saving'
           AND id NOT IN (SELECT image_id FROM jobs WHERE state IN ('queued', 'running'))",
        [now_ms()],
    )?)
}

/// The start of the oldest upload in flight, if any (GC keeps every block touched since).
pub fn oldest_upload(conn: &Connection) -> Result<Option<i64>, ApiError> {
    Ok(conn.query_row(
        "SELECT MIN(upload_started_at) FROM images WHERE status = 'saving'",
        [],
        |r| r.get(0),
    )?)
}
