//! Full-mode leases, in the catalog (`dhcp_leases`): one row per address handed out, at most one
//! address per MAC. A MAC gets its own address again for as long as nobody else took it, even
//! after its lease ran out; a new MAC gets an address never handed out first, and only then the
//! one whose lease ran out longest ago. A declined address (RFC 2131 §4.4.1: the client found it
//! in use) belongs to nobody for [`DECLINE_HOLD_MS`].
//!
//! Offers are not written here: the server holds them in memory for a few seconds (a restart
//! forgets them, and the client simply asks again). Only an ACK commits a lease.
//!
//! No ping before an offer (dnsmasq pings, and its first offer to a new MAC takes ~3 s): full
//! mode is for an isolated network where the catalog knows every address it gave out, and a
//! client that still finds its address in use says so with a DECLINE.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::ApiError;

/// How long a declined address is left alone, in milliseconds.
pub const DECLINE_HOLD_MS: i64 = 10 * 60 * 1000;

/// The configured pool: `first..=last`.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Range {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }
}

/// An address for `mac`, or `None` when the pool is exhausted. `offered` are the addresses
/// offered to other clients and not yet expired: never chosen.
pub fn choose(
    conn: &Connection,
    range: Range,
    mac: &str,
    requested: Option<Ipv4Addr>,
    offered: &HashSet<Ipv4Addr>,
    now: i64,
) -> Result<Option<Ipv4Addr>, ApiError> {
    let (first, last) = (u32::from(range.first), u32::from(range.last));
    let mut stmt = conn
        .prepare_cached("SELECT ip, mac, expires_at FROM dhcp_leases WHERE ip BETWEEN ?1 AND ?2")?;
    let rows: HashMap<u32, (Option<String>, i64)> = stmt
        .query_map(params![first, last], |r| {
            Ok((r.get(0)?, (r.get(1)?, r.get(2)?)))
        })?
        .collect::<Result<_, _>>()?;
    let free = |ip: u32| !offered.contains(&Ipv4Addr::from(ip));
    if let Some((&ip, _)) = rows.iter().find(|(_, (m, _))| m.as_deref() == Some(mac))
        && free(ip)
    {
        return Ok(Some(ip.into()));
    }
    if let Some(ip) = requested.map(u32::from)
        && range.contains(ip.into())
        && !rows.contains_key(&ip)
        && free(ip)
    {
        return Ok(Some(ip.into()));
    }
    if let Some(ip) = (first..=last).find(|ip| !rows.contains_key(ip) && free(*ip)) {
        return Ok(Some(ip.into()));
    }
    Ok(rows
        .iter()
        .filter(|(ip, (_, expires))| *expires <= now && free(**ip))
        .min_by_key(|(ip, (_, expires))| (*expires, **ip))
        .map(|(ip, _)| Ipv4Addr::from(*ip)))
}

/// Commits `ip` to `mac` until `now + secs`; `false` when another client holds it (or it is
/// declined) and it has not expired. The MAC's other address, if any, is let go.
pub fn bind(
    conn: &mut Connection,
    mac: &str,
    ip: Ipv4Addr,
    secs: u32,
    now: i64,
) -> Result<bool, ApiError> {
    let tx = conn.transaction()?;
    let holder: Option<(Option<String>, i64)> = tx
        .query_row(
            "SELECT mac, expires_at FROM dhcp_leases WHERE ip = ?1",
            [u32::from(ip)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((holder, expires)) = holder
        && holder.as_deref() != Some(mac)
        && expires > now
    {
        return Ok(false);
    }
    tx.execute(
        "DELETE FROM dhcp_leases WHERE mac = ?1 AND ip != ?2",
        params![mac, u32::from(ip)],
    )?;
    tx.execute(
        "INSERT INTO dhcp_leases (ip, mac, expires_at, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(ip) DO UPDATE SET mac = excluded.mac, expires_at = excluded.expires_at,
                                       updated_at = excluded.updated_at",
        params![u32::from(ip), mac, now + i64::from(secs) * 1000, now],
    )?;
    tx.commit()?;
    Ok(true)
}

/// The client found `ip` in use: nobody gets it for a while. `false` if it was not `mac`'s.
pub fn decline(conn: &Connection, mac: &str, ip: Ipv4Addr, now: i64) -> Result<bool, ApiError> {
    let n = conn.execute(
        "UPDATE dhcp_leases SET mac = NULL, expires_at = ?3, updated_at = ?4
         WHERE ip = ?1 AND mac = ?2",
        params![u32::from(ip), mac, now + DECLINE_HOLD_MS, now],
    )?;
    Ok(n > 0)
}

/// The client gave `ip` back: it expires now (and stays the MAC's until someone else needs it).
pub fn release(conn: &Connection, mac: &str, ip: Ipv4Addr, now: i64) -> Result<bool, ApiError> {
    let n = conn.execute(
        "UPDATE dhcp_leases SET expires_at = ?3, updated_at = ?3 WHERE ip = ?1 AND mac = ?2",
        params![u32::from(ip), mac, now],
    )?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> (tempfile::TempDir, crate::catalog::Catalog) {
        let dir = tempfile::tempdir().expect("tmp");
        let c = crate::catalog::Catalog::open(&dir.path().join("c.db")).expect("open");
        (dir, c)
    }

    const RANGE: Range = Range {
        first: Ipv4Addr::new(10, 0, 0, 10),
        last: Ipv4Addr::new(10, 0, 0, 12),
    };

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[test]
    fn one_address_per_mac_never_two_macs_per_address() {
        let (_d, c) = catalog();
        c.run_blocking(|conn| {
            let none = HashSet::new();
            let a = choose(conn, RANGE, "a", None, &none, 0)?.expect("a");
            assert_eq!(a, ip(10));
            assert!(bind(conn, "a", a, 60, 0)?);
            // Same MAC, same address; another MAC, another one.
            assert_eq!(choose(conn, RANGE, "a", Some(ip(12)), &none, 1)?, Some(a));
            let b = choose(conn, RANGE, "b", Some(a), &none, 1)?.expect("b");
            assert_eq!(b, ip(11));
            assert!(!bind(conn, "b", a, 60, 1)?, "a's address is not b's");
            assert!(bind(conn, "b", b, 60, 1)?);
            // An offer in flight is skipped; the requested address is honoured when free.
            let offered = HashSet::from([ip(12)]);
            assert_eq!(choose(conn, RANGE, "c", None, &offered, 1)?, None);
            assert_eq!(
                choose(conn, RANGE, "c", Some(ip(12)), &none, 1)?,
                Some(ip(12))
            );
            assert!(bind(conn, "c", ip(12), 60, 1)?);
            // Pool full until a lease runs out: then the one that expired first.
            assert_eq!(choose(conn, RANGE, "d", None, &none, 2)?, None);
            assert!(release(conn, "b", b, 5)?);
            assert_eq!(choose(conn, RANGE, "d", None, &none, 6)?, Some(b));
            // A declined address belongs to nobody for a while.
            assert!(decline(conn, "a", a, 10)?);
            assert_eq!(choose(conn, RANGE, "a", None, &none, 11)?, Some(b));
            assert!(!bind(conn, "a", a, 60, 11)?);
            assert!(bind(conn, "a", a, 60, 11 + DECLINE_HOLD_MS)?);
            Ok(())
        })
        .expect("catalog");
    }
}
