//! The block index and the refcounts that tie manifests to blocks.
//!
//! Two levels of references, both changed only inside the transaction that commits or deletes a
//! manifest: an image references its segments (one count per occurrence), and a stored segment
//! references its blocks (one count per occurrence). Re-committing known content therefore only
//! bumps segment counts. Blocks at refcount 0 are written-but-unused and are dropped by GC only
//! after the grace period *and* only if untouched since the oldest upload still in flight — so
//! an upload that relies on an existing unreferenced block never loses it before it commits.

use std::collections::{HashMap, HashSet};

use kagami_images::manifest::{Segment, SegmentId};
use kagami_images::{BlockId, Manifest};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::error::ApiError;
use crate::store::Location;

/// Of `ids`, returns those the index lacks. Those it has and that are unreferenced are touched
/// (their grace period restarts), so GC keeps them for the caller's upload.
pub fn find_missing(
    conn: &mut Connection,
    ids: &[BlockId],
    now: i64,
) -> Result<Vec<BlockId>, ApiError> {
    let tx = conn.transaction()?;
    let mut missing = Vec::new();
    {
        let mut get = tx.prepare_cached("SELECT refcount FROM blocks WHERE id = ?1")?;
        let mut touch =
            tx.prepare_cached("UPDATE blocks SET touched_at = ?2 WHERE id = ?1 AND refcount = 0")?;
        let mut seen = HashSet::new();
        for id in ids {
            if id.is_hole() || !seen.insert(*id) {
                continue;
            }
            match get
                .query_row([&id.0[..]], |r| r.get::<_, i64>(0))
                .optional()?
            {
                None => missing.push(*id),
                Some(0) => {
                    touch.execute(params![&id.0[..], now])?;
                }
                Some(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok(missing)
}

/// Records freshly written (and already fsynced) blocks at refcount 0. A block another upload
/// indexed meanwhile keeps its first location; the second copy is dead space for GC.
pub fn insert(
    conn: &mut Connection,
    blocks: &[(BlockId, Location)],
    now: i64,
) -> Result<(), ApiError> {
    let tx = conn.transaction()?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO blocks (id, pack, offset, len, refcount, touched_at) VALUES (?1, ?2, ?3, ?4, 0, ?5)
             ON CONFLICT (id) DO UPDATE SET touched_at = excluded.touched_at WHERE refcount = 0",
        )?;
        for (id, loc) in blocks {
            ins.execute(params![
                &id.0[..],
                loc.pack as i64,
                loc.offset as i64,
                loc.len,
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Where each of `ids` is stored (holes and unknown ids are absent from the map).
pub fn locate(conn: &Connection, ids: &[BlockId]) -> Result<HashMap<BlockId, Location>, ApiError> {
    let mut stmt = conn.prepare_cached("SELECT pack, offset, len FROM blocks WHERE id = ?1")?;
    let mut out = HashMap::with_capacity(ids.len());
    for id in ids {
        if id.is_hole() || out.contains_key(id) {
            continue;
        }
        let loc = stmt
            .query_row([&id.0[..]], |r| {
                Ok(Location {
                    pack: r.get::<_, i64>(0)? as u64,
                    offset: r.get::<_, i64>(1)? as u64,
                    len: r.get(2)?,
                })
            })
            .optional()?;
        if let Some(loc) = loc {
            out.insert(*id, loc);
        }
    }
    Ok(out)
}

/// Takes references for every segment of `manifest` (storing new segment bodies and referencing
/// their blocks). Fails — and the caller's transaction must roll back — with `missing_blocks` if
/// a block is not in the index, or `invalid_manifest` if a stored block's length does not fit
/// its slot (only an image's last block may be short), so a manifest can never make a reader
/// serve more or fewer bytes than the disk has.
pub fn reference(tx: &Transaction<'_>, manifest: &Manifest) -> Result<(), ApiError> {
    let mut bump_segment = tx.prepare_cached(
        "UPDATE segments SET refcount = refcount + 1 WHERE id = ?1 AND last_len = ?2",
    )?;
    let mut exists = tx.prepare_cached("SELECT 1 FROM segments WHERE id = ?1")?;
    let mut new_segment = tx.prepare_cached(
        "INSERT INTO segments (id, body, refcount, last_len) VALUES (?1, ?2, 1, ?3)",
    )?;
    let mut bump_block = tx.prepare_cached(
        "UPDATE blocks SET refcount = refcount + 1 WHERE id = ?1 AND len = ?2 RETURNING 1",
    )?;
    let mut block_len = tx.prepare_cached("SELECT len FROM blocks WHERE id = ?1")?;
    for (index, segment) in manifest.segments().iter().enumerate() {
        if segment.is_hole() {
            continue;
        }
        let slots: Vec<_> = manifest.segment_blocks(index).collect();
        // A segment's shape is the length of its last slot; every other slot is a full block.
        let last_len = slots.last().map_or(0, |b| b.len) as i64;
        if bump_segment.execute(params![&segment.id.0[..], last_len])? == 1 {
            continue;
        }
        if exists.exists([&segment.id.0[..]])? {
            return Err(ApiError::bad(
                "invalid_manifest",
                format!(
                    "segment {index} ({}) is stored with a different shape",
                    segment.id
                ),
            ));
        }
        new_segment.execute(params![&segment.id.0[..], segment.encode(), last_len])?;
        for slot in slots.iter().filter(|b| !b.id.is_hole()) {
            if bump_block.exists(params![&slot.id.0[..], slot.len as i64])? {
                continue;
            }
            return Err(
                match block_len
                    .query_row([&slot.id.0[..]], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    None => ApiError::conflict(
                        "missing_blocks",
                        format!(
                            "block {} is not stored; upload it (POST /v1/blocks) and commit again",
                            slot.id
                        ),
                    ),
                    Some(len) => ApiError::bad(
                        "invalid_manifest",
                        format!(
                            "block {} holds {len} bytes but sits in a {}-byte slot at offset {}",
                            slot.id, slot.len, slot.offset
                        ),
                    ),
                },
            );
        }
    }
    Ok(())
}

/// Drops the references `reference` took for the manifest index `index`. Blocks that reach 0
/// are touched so the grace period runs from now.
pub fn release(tx: &Transaction<'_>, index: &[u8], now: i64) -> Result<(), ApiError> {
    let (_, ids) = Manifest::decode_index(index, u64::MAX)
        .map_err(|e| ApiError::Internal(format!("stored manifest is unreadable: {e}")))?;
    let mut drop_segment = tx.prepare_cached(
        "UPDATE segments SET refcount = refcount - 1 WHERE id = ?1 RETURNING refcount",
    )?;
    let mut body = tx.prepare_cached("SELECT body FROM segments WHERE id = ?1")?;
    let mut delete_segment = tx.prepare_cached("DELETE FROM segments WHERE id = ?1")?;
    let mut drop_block = tx.prepare_cached(
        "UPDATE blocks SET refcount = refcount - 1, touched_at = CASE WHEN refcount = 1 THEN ?2 ELSE touched_at END WHERE id = ?1",
    )?;
    for id in ids.iter().filter(|id| !id.is_hole()) {
        let left: i64 = drop_segment.query_row([&id.0[..]], |r| r.get(0))?;
        if left > 0 {
            continue;
        }
        let bytes: Vec<u8> = body.query_row([&id.0[..]], |r| r.get(0))?;
        let segment = Segment::decode(*id, &bytes)
            .map_err(|e| ApiError::Internal(format!("stored segment {id}: {e}")))?;
        for block in segment.blocks.iter().filter(|b| !b.is_hole()) {
            drop_block.execute(params![&block.0[..], now])?;
        }
        delete_segment.execute([&id.0[..]])?;
    }
    Ok(())
}

/// Rebuilds a full manifest from an image's stored index and the segment table.
pub fn load_manifest(conn: &Connection, index: &[u8]) -> Result<Manifest, ApiError> {
    let corrupt = |e: &dyn std::fmt::Display| {
        ApiError::Internal(format!("stored manifest is unreadable: {e}"))
    };
    let (size, ids) = Manifest::decode_index(index, u64::MAX).map_err(|e| corrupt(&e))?;
    let mut body = conn.prepare_cached("SELECT body FROM segments WHERE id = ?1")?;
    let mut cache: HashMap<SegmentId, Segment> = HashMap::new();
    let mut segments = Vec::with_capacity(ids.len());
    for id in &ids {
        let segment = if id.is_hole() {
            Segment::hole()
        } else if let Some(s) = cache.get(id) {
            s.clone()
        } else {
            let bytes: Vec<u8> = body.query_row([&id.0[..]], |r| r.get(0))?;
            let s = Segment::decode(*id, &bytes).map_err(|e| corrupt(&e))?;
            cache.insert(*id, s.clone());
            s
        };
        segments.push(segment);
    }
    Manifest::new(size, segments).map_err(|e| corrupt(&e))
}

/// Totals of the block index: (blocks, bytes, unreferenced blocks).
pub fn stats(conn: &Connection) -> Result<(u64, u64, u64), ApiError> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(len), 0), COALESCE(SUM(refcount = 0), 0) FROM blocks",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        },
    )?)
}
