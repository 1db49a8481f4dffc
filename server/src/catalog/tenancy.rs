//! Projects and bearer tokens. A token belongs to a project and has a role: `admin` sees and
//! manages everything; `member` sees its project's images and public ones. Only the sha256 of a
//! token's secret is stored; the secret is shown once, when the token is created.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{now_ms, rfc3339};
use crate::error::ApiError;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// The project of [`Caller::anonymous`]: a name no real project can have
/// ([`check_project_name`]).
const ANONYMOUS_PROJECT: &str = "(anonymous)";

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub project: String,
    pub role: Role,
}

impl Caller {
    /// The server acting for itself once it has authorized a request another way (an agent
    /// reading an image of its own deployment). No token ever authenticates as this.
    pub fn system() -> Caller {
        Caller {
            project: String::new(),
            role: Role::Admin,
        }
    }

    /// A caller with no token (an iSCSI login without authentication): it sees public and
    /// marketplace images only. Its project name is one no real project can have.
    pub fn anonymous() -> Caller {
        Caller {
            project: ANONYMOUS_PROJECT.into(),
            role: Role::Member,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this is [`Caller::anonymous`]: no token at all.
    pub fn is_anonymous(&self) -> bool {
        self.role == Role::Member && self.project == ANONYMOUS_PROJECT
    }

    /// Refuses callers that are not admins.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this needs an admin token".into()))
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub project: String,
    pub role: Role,
    pub description: String,
    pub created_at: String,
    /// Present only in the answer that created the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// The project the first admin token belongs to.
pub const ADMIN_PROJECT: &str = "admin";
/// Where the first admin token is written, inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub(crate) fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Checks a project name: 1–63 of `a-z 0-9 - _`, starting with a letter or digit.
pub fn check_project_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "invalid_project_name",
            "a project name is 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
        ))
    }
}

/// When no admin token exists (first start, or every admin token was revoked), creates the
/// admin project and an admin token, writes its secret to `<data_dir>/admin.token` (mode 0600)
/// and returns that path. The file is written and fsynced *before* the token row commits, so a
/// crash in between leaves no unusable token and the next start simply tries again.
pub fn bootstrap(conn: &mut Connection, data_dir: &Path) -> Result<Option<PathBuf>, ApiError> {
    let admins: i64 = conn.query_row(
        "SELECT COUNT(*) FROM tokens WHERE role = 'admin'",
        [],
        |r| r.get(0),
    )?;
    if admins > 0 {
        return Ok(None);
    }
    conn.execute(
        "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?1, ?2)",
        params![ADMIN_PROJECT, now_ms()],
    )?;
    let secret = new_secret()?;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let tmp = data_dir.join(format!("{ADMIN_TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    // create_new + mode: the secret is never readable by others, even for an instant.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    insert_token(
        conn,
        ADMIN_PROJECT,
        Role::Admin,
        "first admin token, created at start-up",
        &secret,
    )?;
    Ok(Some(path))
}

pub(crate) fn new_secret() -> Result<String, ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(format!("kgm_{}", hex::encode(raw)))
}

/// The caller a secret belongs to, if any.
pub fn authenticate(conn: &Connection, secret: &str) -> Result<Option<Caller>, ApiError> {
    let mut stmt =
        conn.prepare_cached("SELECT project, role FROM tokens WHERE secret_hash = ?1")?;
    let row = stmt
        .query_row([hash_secret(secret)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    Ok(row.map(|(project, role)| Caller {
        project,
        role: if role == "admin" {
            Role::Admin
        } else {
            Role::Member
        },
    }))
}

/// The tokens whose secret's sha256 starts with `prefix`, with that whole hash: how the iSCSI
/// target finds the token a CHAP name stands for (the name carries a prefix of the hash, the
/// secret is derived from the whole of it; see `stream::iscsi::chap`).
pub fn by_hash_prefix(
    conn: &Connection,
    prefix: &[u8],
) -> Result<Vec<(Caller, Vec<u8>)>, ApiError> {
    let mut stmt = conn.prepare_cached(
        "SELECT project, role, secret_hash FROM tokens WHERE substr(secret_hash, 1, ?1) = ?2",
    )?;
    let rows = stmt.query_map(params![prefix.len() as i64, prefix], |r| {
        let role: String = r.get(1)?;
        Ok((
            Caller {
                project: r.get(0)?,
                role: if role == "admin" {
                    Role::Admin
                } else {
                    Role::Member
                },
            },
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn create_project(conn: &Connection, name: &str) -> Result<Project, ApiError> {
    check_project_name(name)?;
    let now = now_ms();
    let inserted = conn.execute(
        "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?1, ?2)",
        params![name, now],
    )?;
    if inserted == 0 {
        return Err(ApiError::conflict(
            "project_exists",
            format!("project '{name}' already exists"),
        ));
    }
    Ok(Project {
        name: name.to_string(),
        created_at: rfc3339(now),
    })
}

pub fn list_projects(conn: &Connection) -> Result<Vec<Project>, ApiError> {
    let mut stmt = conn.prepare("SELECT name, created_at FROM projects ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(Project {
            name: r.get(0)?,
            created_at: rfc3339(r.get(1)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn create_token(
    conn: &Connection,
    project: &str,
    role: Role,
    description: &str,
) -> Result<TokenInfo, ApiError> {
    let exists: Option<String> = conn
        .query_row(
            "SELECT name FROM projects WHERE name = ?1",
            [project],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Err(ApiError::NotFound(format!(
            "project '{project}' does not exist; create it first"
        )));
    }
    insert_token(conn, project, role, description, &new_secret()?)
}

fn insert_token(
    conn: &Connection,
    project: &str,
    role: Role,
    description: &str,
    secret: &str,
) -> Result<TokenInfo, ApiError> {
    let id = format!("tok_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let now = now_ms();
    conn.execute(
        "INSERT INTO tokens (id, secret_hash, project, role, description, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, hash_secret(secret), project, role.as_str(), description, now],
    )?;
    Ok(TokenInfo {
        id,
        project: project.into(),
        role,
        description: description.into(),
        created_at: rfc3339(now),
        secret: Some(secret.to_string()),
    })
}

pub fn list_tokens(conn: &Connection) -> Result<Vec<TokenInfo>, ApiError> {
    let mut stmt = conn.prepare(
        "SELECT id, project, role, description, created_at FROM tokens ORDER BY created_at",
    )?;
    let rows = stmt.query_map([], |r| {
        let role: String = r.get(2)?;
        Ok(TokenInfo {
            id: r.get(0)?,
            project: r.get(1)?,
            role: if role == "admin" {
                Role::Admin
            } else {
                Role::Member
            },
            description: r.get(3)?,
            created_at: rfc3339(r.get(4)?),
            secret: None,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn revoke_token(conn: &Connection, id: &str) -> Result<(), ApiError> {
    if conn.execute("DELETE FROM tokens WHERE id = ?1", [id])? == 0 {
        return Err(ApiError::NotFound(format!("token {id} not found")));
    }
    Ok(())
}
