//! Durable jobs (imports, from a source URL or of an uploaded file staged for the job): a row per
//! job, enqueued in the same transaction as the state change that asks for it, claimed by a
//! worker, with progress, and re-queued after a restart.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::images;
use crate::catalog::tenancy::Caller;
use crate::catalog::{now_ms, rfc3339};
use crate::error::ApiError;

/// A job as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub image_id: Uuid,
    pub owner: String,
    /// The URL the server fetches (credentials redacted); `None` for a file uploaded with the
    /// request and staged for the job.
    pub source_url: Option<String>,
    pub disk_format: String,
    /// queued → running → succeeded | failed.
    pub state: String,
    /// What a running job is doing: `downloading` or `converting`; bytes are the source's
    /// while downloading, the logical disk's while converting.
    pub phase: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub error: Option<String>,
    /// The stable code of a failed job's error (`backing_file`, `source_unavailable`, …).
    pub error_code: Option<String>,
    pub attempts: u32,
    pub created_at: String,
    pub updated_at: String,
}

const COLUMNS: &str = "id, kind, image_id, owner, source_url, disk_format, state, phase, bytes_done, bytes_total, \
    error, attempts, created_at, updated_at, error_code";

fn row_to_job(r: &Row<'_>) -> rusqlite::Result<Job> {
    let id: String = r.get(0)?;
    let image: String = r.get(2)?;
    Ok(Job {
        id: id.parse().unwrap_or_default(),
        kind: r.get(1)?,
        image_id: image.parse().unwrap_or_default(),
        owner: r.get(3)?,
        source_url: r.get::<_, Option<String>>(4)?.map(|u| redact(&u)),
        disk_format: r.get(5)?,
        state: r.get(6)?,
        phase: r.get(7)?,
        bytes_done: r.get::<_, i64>(8)? as u64,
        bytes_total: r.get::<_, Option<i64>>(9)?.map(|n| n as u64),
        error: r.get(10)?,
        attempts: r.get(11)?,
        created_at: rfc3339(r.get(12)?),
        updated_at: rfc3339(r.get(13)?),
        error_code: r.get(14)?,
    })
}

/// A URL as shown to people: any password in it replaced, so job listings and logs never
/// carry a source's credentials. (The worker reads the stored URL, not this.)
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Puts the image in `saving` and enqueues its import from `source_url`, in one transaction.
pub fn enqueue_import(
    conn: &mut Connection,
    caller: &Caller,
    image: Uuid,
    source_url: &str,
    disk_format: &str,
) -> Result<Job, ApiError> {
    enqueue(
        conn,
        caller,
        Uuid::new_v4(),
        image,
        Some(source_url),
        disk_format,
    )
}

/// Puts the image in `saving` and starts the import of the upload arriving for job `id` (see
/// `jobs::import::accept_upload`), claimed by the request that receives it, in one transaction.
pub fn start_upload(
    conn: &mut Connection,
    caller: &Caller,
    id: Uuid,
    image: Uuid,
    disk_format: &str,
) -> Result<Job, ApiError> {
    let tx = conn.transaction()?;
    let started = images::begin_upload(&tx, caller, image)?;
    let now = now_ms();
    tx.execute(
        "INSERT INTO jobs (id, kind, image_id, owner, source_url, disk_format, state, attempts, created_at, updated_at)
         VALUES (?1, 'import', ?2, ?3, NULL, ?4, 'running', 1, ?5, ?5)",
        params![id.to_string(), image.to_string(), started.owner, disk_format, now],
    )?;
    tx.commit()?;
    get(conn, caller, id)
}

fn enqueue(
    conn: &mut Connection,
    caller: &Caller,
    id: Uuid,
    image: Uuid,
    source_url: Option<&str>,
    disk_format: &str,
) -> Result<Job, ApiError> {
    let tx = conn.transaction()?;
    let started = images::begin_upload(&tx, caller, image)?;
    let now = now_ms();
    tx.execute(
        "INSERT INTO jobs (id, kind, image_id, owner, source_url, disk_format, state, created_at, updated_at)
         VALUES (?1, 'import', ?2, ?3, ?4, ?5, 'queued', ?6, ?6)",
        params![id.to_string(), image.to_string(), started.owner, source_url, disk_format, now],
    )?;
    tx.commit()?;
    get(conn, caller, id)
}

/// A job the caller may see (its project's, or any for an admin).
pub fn get(conn: &Connection, caller: &Caller, id: Uuid) -> Result<Job, ApiError> {
    let job = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id.to_string()],
            row_to_job,
        )
        .optional()?;
    match job {
        Some(j) if caller.is_admin() || j.owner == caller.project => Ok(j),
        _ => Err(ApiError::NotFound(format!("job {id} not found"))),
    }
}

/// The caller's jobs, newest first (at most 100).
pub fn list(conn: &Connection, caller: &Caller) -> Result<Vec<Job>, ApiError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE ?1 OR owner = ?2 ORDER BY created_at DESC LIMIT 100"
    ))?;
    let rows = stmt.query_map(params![caller.is_admin(), caller.project], row_to_job)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A job's source URL as stored (credentials included), for the worker only; `None` for an
/// uploaded file staged for the job.
pub fn source(conn: &Connection, id: Uuid) -> Result<Option<String>, ApiError> {
    Ok(conn.query_row(
        "SELECT source_url FROM jobs WHERE id = ?1",
        [id.to_string()],
        |r| r.get(0),
    )?)
}

/// The jobs still to run or running (whose staged files must be kept).
pub fn unfinished(conn: &Connection) -> Result<Vec<Uuid>, ApiError> {
    let mut stmt = conn.prepare("SELECT id FROM jobs WHERE state IN ('queued', 'running')")?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for id in ids {
        if let Ok(id) = id?.parse() {
            out.push(id);
        }
    }
    Ok(out)
}

/// The uploaded-file jobs still to run or running whose image is `saving` for them, as
/// (job, image) pairs: the ones whose staged file start-up checks.
pub fn unfinished_uploads(conn: &Connection) -> Result<Vec<(Uuid, Uuid)>, ApiError> {
    let mut stmt = conn.prepare(
        "SELECT j.id, j.image_id FROM jobs j JOIN images i ON i.id = j.image_id
         WHERE j.state IN ('queued', 'running') AND j.source_url IS NULL AND i.status = 'saving'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (job, image) = row?;
        if let (Ok(job), Ok(image)) = (job.parse(), image.parse()) {
            out.push((job, image));
        }
    }
    Ok(out)
}

/// Claims the oldest queued job, if any. Its image's upload clock starts now, not at enqueue
/// time, so a long queue does not hold back garbage collection.
pub fn claim(conn: &mut Connection) -> Result<Option<Job>, ApiError> {
    let tx = conn.transaction()?;
    let now = now_ms();
    let sql = format!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, bytes_done = 0, phase = NULL, updated_at = ?1
         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1)
         RETURNING {COLUMNS}"
    );
    let job = tx.query_row(&sql, [now], row_to_job).optional()?;
    if let Some(job) = &job {
        tx.execute(
            "UPDATE images SET upload_started_at = ?2 WHERE id = ?1 AND status = 'saving'",
            params![job.image_id.to_string(), now],
        )?;
    }
    tx.commit()?;
    Ok(job)
}

pub fn progress(
    conn: &Connection,
    id: Uuid,
    phase: &str,
    done: u64,
    total: Option<u64>,
) -> Result<(), ApiError> {
    conn.execute(
        "UPDATE jobs SET phase = ?2, bytes_done = ?3, bytes_total = ?4, updated_at = ?5 WHERE id = ?1",
        params![id.to_string(), phase, done as i64, total.map(|t| t as i64), now_ms()],
    )?;
    Ok(())
}

/// Records a job's end: succeeded, or failed with the error's code and message.
pub fn finish(conn: &Connection, id: Uuid, error: Option<&ApiError>) -> Result<(), ApiError> {
    let state = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    let code = error.map(|e| e.code_and_status().0);
    let message = error.map(ToString::to_string);
    conn.execute(
        "UPDATE jobs SET state = ?2, error = ?3, error_code = ?4, phase = NULL, updated_at = ?5
         WHERE id = ?1",
        params![id.to_string(), state, message, code, now_ms()],
    )?;
    Ok(())
}

/// At start-up: jobs the last run was working on start again from the beginning.
pub fn requeue_running(conn: &Connection) -> Result<usize, ApiError> {
    Ok(conn.execute(
        "UPDATE jobs SET state = 'queued', phase = NULL, bytes_done = 0, updated_at = ?1 WHERE state = 'running'",
        [now_ms()],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tenancy::Role;
    use kagami_images::model::ImageStatus;

    #[test]
    fn a_refused_upload_fails_its_image_only_while_its_job_runs() {
        let dir = tempfile::tempdir().expect("tmp");
        let catalog = crate::catalog::Catalog::open(&dir.path().join("c.db")).expect("catalog");
        let admin = Caller {
            project: "admin".into(),
            role: Role::Admin,
        };
        catalog
            .run_blocking(|c| {
                crate::catalog::tenancy::bootstrap(c, dir.path())?;
                let new = serde_json::from_value(serde_json::json!({"name": "x"})).expect("new");
                let image = images::create(c, &admin, "local", new)?.id;
                let status = |c: &Connection| images::get(c, &admin, image).map(|i| i.status);
                let first = Uuid::new_v4();
                start_upload(c, &admin, first, image, "qcow2")?;
                // The first job runs: its refusal fails the image; the job ends.
                images::fail_upload_of_job(c, image, first, "refused")?;
                assert_eq!(status(c)?, ImageStatus::Failed);
                finish(
                    c,
                    first,
                    Some(&ApiError::bad("format_ambiguous", "refused")),
                )?;
                // A retry owns the image now; the first job's late failure leaves it alone.
                start_upload(c, &admin, Uuid::new_v4(), image, "qcow2")?;
                images::fail_upload_of_job(c, image, first, "late")?;
                assert_eq!(status(c)?, ImageStatus::Saving);
                Ok(())
            })
            .expect("catalog");
    }
}
