//! Garbage collection: drops blocks no manifest references once their grace period is over,
//! deletes packs with nothing live in them, and rewrites packs that are mostly dead.
//!
//! Safety rests on three rules: (1) refcounts change only in the catalog transactions that
//! commit or delete manifests; (2) a block at refcount 0 is dropped only if untouched for the
//! grace period *and* since the oldest upload still in flight began; (3) GC holds the store's
//! exclusive guard, so no pack it judges is half-way between "written" and "indexed", and it
//! seals the open pack before judging, so blocks it moves never land in a pack it is judging.

use std::collections::HashMap;

use kagami_images::BlockId;
use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, images, now_ms};
use crate::error::ApiError;
use crate::store::{Location, PackStore};

/// What one collection did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub dropped_blocks: u64,
    pub dropped_bytes: u64,
    pub packs_removed: u64,
    pub packs_rewritten: u64,
    pub blocks_moved: u64,
    /// Bytes of pack files freed on disk.
    pub reclaimed_bytes: u64,
}

/// Runs one collection. Blocking: call it from a blocking thread.
pub fn collect(
    catalog: &Catalog,
    store: &PackStore,
    grace_secs: u64,
    rewrite_below: f64,
) -> Result<GcReport, ApiError> {
    let _exclusive = store.exclusive();
    // Close the open pack first: every pack judged below is then sealed, and blocks a rewrite
    // moves land in a new pack that is not among them (and cannot be removed by this run).
    store.seal();
    let mut report = GcReport::default();
    let grace_ms = i64::try_from(grace_secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000);
    let mut cutoff = now_ms().saturating_sub(grace_ms);
    if let Some(oldest) = catalog.run_blocking(|c| images::oldest_upload(c))? {
        cutoff = cutoff.min(oldest);
    }
    let (n, bytes) = catalog.run_blocking(|c| {
        let mut stmt =
            c.prepare("DELETE FROM blocks WHERE refcount = 0 AND touched_at < ?1 RETURNING len")?;
        let lens = stmt
            .query_map([cutoff], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((lens.len() as u64, lens.iter().sum::<i64>() as u64))
    })?;
    report.dropped_blocks = n;
    report.dropped_bytes = bytes;

    let live: HashMap<u64, u64> = catalog.run_blocking(|c| {
        let mut stmt =
            c.prepare("SELECT pack, SUM((len + 4095) / 4096 * 4096) + 64 * COUNT(*) FROM blocks GROUP BY pack")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    })?;
    for (pack, size) in store.packs()? {
        let live_bytes = live.get(&pack).copied().unwrap_or(0);
        if live_bytes == 0 {
            store.remove(pack)?;
            report.packs_removed += 1;
            report.reclaimed_bytes += size;
        } else if (live_bytes as f64) < size as f64 * rewrite_below {
            report.blocks_moved += rewrite(catalog, store, pack)?;
            store.remove(pack)?;
            report.packs_rewritten += 1;
            report.reclaimed_bytes += size - live_bytes;
        }
    }
    Ok(report)
}

/// Copies a pack's live blocks (verified) to the open pack and repoints the index at them.
fn rewrite(catalog: &Catalog, store: &PackStore, pack: u64) -> Result<u64, ApiError> {
    let rows: Vec<(BlockId, Location)> = catalog.run_blocking(|c| {
        let mut stmt = c.prepare("SELECT id, offset, len FROM blocks WHERE pack = ?1")?;
        let rows = stmt.query_map([pack as i64], |r| {
            let id: Vec<u8> = r.get(0)?;
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(&id[..32.min(id.len())]);
            Ok((
                BlockId(bytes),
                Location {
                    pack,
                    offset: r.get::<_, i64>(1)? as u64,
                    len: r.get(2)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    })?;
    let mut data = Vec::with_capacity(rows.len());
    for (id, loc) in &rows {
        let mut buf = vec![0u8; loc.len as usize];
        store.read(*loc, &mut buf)?;
        if BlockId::hash(&buf) != *id {
            // Never copy a corrupt block forward as if it were good; leave the pack for a scrub.
            return Err(ApiError::Internal(format!(
                "block {id} in pack {pack:016x} is corrupt; GC left the pack alone"
            )));
        }
        data.push(buf);
    }
    let batch: Vec<(BlockId, &[u8])> = rows
        .iter()
        .zip(&data)
        .map(|((id, _), d)| (*id, d.as_slice()))
        .collect();
    let moved = store.append(&batch)?;
    catalog.run_blocking(|c| {
        let tx = c.transaction()?;
        {
            let mut update =
                tx.prepare("UPDATE blocks SET pack = ?2, offset = ?3 WHERE id = ?1 AND pack = ?4")?;
            for ((id, _), loc) in rows.iter().zip(&moved) {
                update.execute(params![
                    &id.0[..],
                    loc.pack as i64,
                    loc.offset as i64,
                    pack as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    })?;
    Ok(rows.len() as u64)
}
