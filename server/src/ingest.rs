//! The one way content enters Kagami: blocks in → manifest committed.
//!
//! An upload streams bytes through [`receive`], which cuts them into 4 MiB segments, hashes each
//! segment's blocks on every core, writes the blocks the store lacks (fsynced) and indexes them at
//! refcount 0, then [`catalog::images::commit`] turns the image active in one transaction with its
//! manifest and references. Batched block uploads (capture, region copies) use [`store_blocks`]
//! and commit a manifest the same way.
//!
//! Memory is bounded whatever the image size: a few 4 MiB buffers in flight plus the manifest's
//! ids (32 bytes per 64 KiB).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use kagami_images::split::ManifestBuilder;
use kagami_images::{BlockId, Manifest, SEGMENT_SIZE};

use crate::catalog::{Catalog, blocks, now_ms};
use crate::error::ApiError;
use crate::store::PackStore;

/// What an ingest wrote.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StoreStats {
    /// Blocks written to packs (new to the store).
    pub new_blocks: u64,
    pub new_bytes: u64,
}

/// Writes the blocks of `blocks` the store lacks (each once), fsyncs, and indexes them.
pub fn store_blocks(
    catalog: &Catalog,
    store: &PackStore,
    blocks: &[(BlockId, &[u8])],
) -> Result<StoreStats, ApiError> {
    let ids: Vec<BlockId> = blocks.iter().map(|(id, _)| *id).collect();
    let _writing = store.shared();
    let now = now_ms();
    let missing: HashSet<BlockId> = catalog
        .run_blocking(|c| blocks::find_missing(c, &ids, now))?
        .into_iter()
        .collect();
    if missing.is_empty() {
        return Ok(StoreStats::default());
    }
    let mut seen = HashSet::new();
    let to_write: Vec<(BlockId, &[u8])> = blocks
        .iter()
        .filter(|(id, _)| missing.contains(id) && seen.insert(*id))
        .map(|(id, d)| (*id, *d))
        .collect();
    let locations = store.append(&to_write)?;
    let rows: Vec<_> = to_write.iter().map(|(id, _)| *id).zip(locations).collect();
    catalog.run_blocking(|c| blocks::insert(c, &rows, now))?;
    Ok(StoreStats {
        new_blocks: to_write.len() as u64,
        new_bytes: to_write.iter().map(|(_, d)| d.len() as u64).sum(),
    })
}

/// Cuts a byte stream into segments and stores their new blocks; returns the manifest (not yet
/// committed) and what was written. Fails if the stream errors (a truncated upload) or grows
/// past `max_bytes`.
pub async fn receive<S, E>(
    catalog: Catalog,
    store: Arc<PackStore>,
    mut body: S,
    max_bytes: u64,
) -> Result<(Manifest, StoreStats), ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    // Hashing and writing run on a blocking thread while the next segment arrives; a channel of
    // two segments bounds memory and gives back-pressure to the sender.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<BytesMut>(2);
    let worker =
        tokio::task::spawn_blocking(move || -> Result<(Manifest, StoreStats), ApiError> {
            let mut builder = ManifestBuilder::new();
            let mut stats = StoreStats::default();
            while let Some(segment) = rx.blocking_recv() {
                let ids = builder
                    .push(&segment)
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .blocks
                    .clone();
                let pairs: Vec<(BlockId, &[u8])> = ids
                    .iter()
                    .zip(segment.chunks(kagami_images::BLOCK_SIZE))
                    .filter(|(id, _)| !id.is_hole())
                    .map(|(id, d)| (*id, d))
                    .collect();
                let written = store_blocks(&catalog, &store, &pairs)?;
                stats.new_blocks += written.new_blocks;
                stats.new_bytes += written.new_bytes;
            }
            Ok((builder.finish(), stats))
        });

    let mut pending = BytesMut::with_capacity(SEGMENT_SIZE);
    let mut total: u64 = 0;
    let mut failure: Option<ApiError> = None;
    while let Some(chunk) = body.next().await {
        let mut chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(ApiError::bad(
                    "upload_interrupted",
                    format!("the upload stream broke after {total} bytes: {e}"),
                ));
                break;
            }
        };
        total += chunk.len() as u64;
        if total > max_bytes {
            failure = Some(ApiError::TooLarge(format!(
                "the image is larger than the limit of {max_bytes} bytes (limits.max_image_bytes)"
            )));
            break;
        }
        while !chunk.is_empty() {
            let take = chunk.len().min(SEGMENT_SIZE - pending.len());
            pending.extend_from_slice(&chunk.split_to(take));
            if pending.len() == SEGMENT_SIZE {
                let full = std::mem::replace(&mut pending, BytesMut::with_capacity(SEGMENT_SIZE));
                if tx.send(full).await.is_err() {
                    break; // the worker failed; its error is reported below
                }
            }
        }
    }
    if failure.is_none() && !pending.is_empty() {
        let _ = tx.send(pending).await;
    }
    drop(tx);
    let outcome = worker
        .await
        .map_err(|e| ApiError::Internal(format!("ingest worker failed: {e}")))?;
    match failure {
        Some(e) => Err(e),
        None => outcome,
    }
}
