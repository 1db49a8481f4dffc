//! The block exports' open sessions, for `GET /v1/exports` and `kagami export list`: one
//! registry for NBD and iSCSI. A connection registers once its negotiation or login is done
//! (what it opened and who opened it never change after that) and holds a [`Guard`] that takes
//! the entry out again however the connection ends. Its counters are atomics the connection
//! bumps as it serves: the registry's lock is taken only to add, remove and list sessions,
//! never on the read path.
//!
//! Memory is bounded by the listeners' connection limits (`nbd::MAX_CONNECTIONS`,
//! `iscsi::MAX_CONNECTIONS`): one small entry per open connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::tenancy::{Caller, Role};
use crate::catalog::{now_ms, rfc3339};

/// The block protocol a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Nbd,
    Iscsi,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::Iscsi => "iscsi",
        }
    }
}

/// Who opened a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Who {
    /// A bearer token (NBD's export name, iSCSI's CHAP credentials): its project and role.
    Token { project: String, role: Role },
    /// An iSCSI login without authentication (public and marketplace images only).
    Anonymous,
    /// The per-boot token of a host's ISO boot (`kagami host boot-iso --via iscsi`).
    IsoBoot { host: Uuid },
}

impl Who {
    /// A token's caller, or the anonymous one.
    pub fn caller(caller: &Caller) -> Who {
        if caller.is_anonymous() {
            Who::Anonymous
        } else {
            Who::Token {
                project: caller.project.clone(),
                role: caller.role,
            }
        }
    }

    /// Whether `caller` may see this session, by the catalog's tenancy rules: an admin sees
    /// every session; anyone else only those opened with a token of its own project. Anonymous
    /// sessions and ISO boots belong to no project (hosts are the admins' business).
    pub fn visible_to(&self, caller: &Caller) -> bool {
        if caller.is_admin() {
            return true;
        }
        matches!(self, Who::Token { project, .. } if *project == caller.project)
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Token { project, role } => {
                let role = match role {
                    Role::Admin => "admin",
                    Role::Member => "member",
                };
                write!(f, "{project}/{role}")
            }
            Who::Anonymous => f.write_str("anonymous"),
            Who::IsoBoot { host } => write!(f, "iso-boot of host {host}"),
        }
    }
}

/// What a connection registers once its session is set up.
#[derive(Debug)]
pub struct Opened {
    pub protocol: Protocol,
    pub peer: SocketAddr,
    /// The image read; `None` for an iSCSI discovery session.
    pub image: Option<Uuid>,
    pub who: Who,
    /// The iSCSI initiator's name (`InitiatorName`); `None` for NBD, which has none.
    pub initiator: Option<String>,
}

/// One open session: fixed facts and the counters its connection bumps.
#[derive(Debug)]
pub struct Live {
    id: u64,
    opened: Opened,
    started_ms: i64,
    bytes_read: AtomicU64,
    commands: AtomicU64,
}

impl Live {
    /// One command served (a SCSI command, an NBD request).
    pub fn command(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes of the image delivered by a read.
    pub fn read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    fn info(&self) -> Session {
        Session {
            id: self.id,
            protocol: self.opened.protocol,
            peer: self.opened.peer.to_string(),
            image: self.opened.image,
            who: self.opened.who.clone(),
            initiator: self.opened.initiator.clone(),
            started_at: rfc3339(self.started_ms),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
        }
    }
}

/// A session as `GET /v1/exports` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// Unique while the server runs.
    pub id: u64,
    pub protocol: Protocol,
    /// The client's `ADDR:PORT`.
    pub peer: String,
    /// The image read; `null` for an iSCSI discovery session.
    pub image: Option<Uuid>,
    pub who: Who,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    pub started_at: String,
    /// Bytes of the image read so far.
    pub bytes_read: u64,
    /// Commands served so far (SCSI commands, NBD requests).
    pub commands: u64,
}

/// The registry of open sessions; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Sessions(Arc<Mutex<Registry>>);

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Arc<Live>>,
}

impl Sessions {
    /// Registers a session; it is listed until the guard is dropped.
    pub fn open(&self, opened: Opened) -> Guard {
        let mut registry = self.lock();
        registry.next += 1;
        let live = Arc::new(Live {
            id: registry.next,
            opened,
            started_ms: now_ms(),
            bytes_read: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        });
        registry.open.insert(live.id, live.clone());
        Guard {
            sessions: self.clone(),
            live,
        }
    }

    /// The open sessions `caller` may see, oldest first.
    pub fn list(&self, caller: &Caller) -> Vec<Session> {
        self.lock()
            .open
            .values()
            .filter(|l| l.opened.who.visible_to(caller))
            .map(|l| l.info())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent map.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered session: takes it out of the registry when dropped (the connection ended,
/// however it ended). Dereferences to its counters; clone [`Guard::live`] into tasks that
/// count.
#[derive(Debug)]
pub struct Guard {
    sessions: Sessions,
    live: Arc<Live>,
}

impl Guard {
    /// The counters, for a task that outlives a borrow of the guard.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }
}

impl std::ops::Deref for Guard {
    type Target = Live;

    fn deref(&self) -> &Live {
        &self.live
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.sessions.lock().open.remove(&self.live.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(project: &str) -> Caller {
        Caller {
            project: project.into(),
            role: Role::Member,
        }
    }

    fn opened(who: Who) -> Opened {
        Opened {
            protocol: Protocol::Iscsi,
            peer: "127.0.0.1:5000".parse().expect("addr"),
            image: Some(Uuid::new_v4()),
            who,
            initiator: Some("iqn.x".into()),
        }
    }

    #[test]
    fn sessions_are_listed_while_their_guard_lives_and_counted() {
        let sessions = Sessions::default();
        let admin = Caller::system();
        let a = sessions.open(opened(Who::caller(&member("a"))));
        let b = sessions.open(opened(Who::Anonymous));
        a.command();
        a.read(4096);
        let counting = a.live();
        std::thread::spawn(move || {
            counting.command();
            counting.read(512);
        })
        .join()
        .expect("thread");
        let all = sessions.list(&admin);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].commands, all[0].bytes_read), (2, 4608));
        assert_eq!(all[1].who, Who::Anonymous);
        assert!(all[0].id < all[1].id, "oldest first");
        drop(a);
        let left = sessions.list(&admin);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.id);
        drop(b);
        assert!(sessions.list(&admin).is_empty());
    }

    #[test]
    fn members_see_their_own_project_only() {
        let host = Uuid::new_v4();
        let whos = [
            Who::caller(&member("a")),
            Who::caller(&member("b")),
            Who::Anonymous,
            Who::IsoBoot { host },
            Who::caller(&Caller {
                project: "a".into(),
                role: Role::Admin,
            }),
        ];
        let seen =
            |caller: &Caller| -> Vec<bool> { whos.iter().map(|w| w.visible_to(caller)).collect() };
        assert_eq!(seen(&member("a")), [true, false, false, false, true]);
        assert_eq!(seen(&member("b")), [false, true, false, false, false]);
        assert_eq!(seen(&Caller::anonymous()), [false; 5]);
        assert_eq!(seen(&Caller::system()), [true; 5]);
        assert_eq!(Who::caller(&Caller::anonymous()), Who::Anonymous);
        assert_eq!(Who::caller(&member("a")).to_string(), "a/member");
    }
}
