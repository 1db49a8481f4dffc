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
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use std::time::Duration;

use std::collections::VecDeque;

use kagami_images::format::{self, DiskFormat, StreamEnds};
use kagami_images::split::{ManifestBuilder, hash_blocks};
use kagami_images::{BLOCK_SIZE, BlockId, Manifest, SEGMENT_SIZE};

use kagami_images::model::{Image, ImageKind};
use uuid::Uuid;

use crate::catalog::tenancy::Caller;
use crate::catalog::{Catalog, blocks, images, now_ms};
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
/// committed) and what was written. Fails if the stream errors (a truncated upload), stalls for
/// `idle` between chunks, is empty, or grows past `max_bytes`.
///
/// Before anything is committed, the stream's ends go through the format inspector as
/// `claimed` (raw, or iso for ISO images): a qcow2 or VMDK sent "as raw" is refused here, since a
/// hypervisor that probes formats would otherwise follow its backing file.
pub async fn receive<S, E>(
    catalog: Catalog,
    store: Arc<PackStore>,
    mut body: S,
    limits: ReceiveLimits,
    claimed: DiskFormat,
) -> Result<(Manifest, StoreStats), ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut builder = ManifestBuilder::new();
    let mut stats = StoreStats::default();
    // Segment N is hashed and stored on the blocking pool while segment N+1 arrives; at most one
    // is in flight, which bounds memory and gives back-pressure to the sender. No thread is held
    // between segments, so slow uploads cannot starve the pool.
    let mut in_flight: Option<SegmentTask> = None;
    let mut ends = Ends::default();
    let mut pending = BytesMut::with_capacity(SEGMENT_SIZE);
    // The buffer of the segment before last, handed back for reuse: no fresh 4 MiB (and its
    // page faults) per segment.
    let mut spare: Option<BytesMut> = None;
    let mut total: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(limits.idle, body.next()).await {
            Err(_) => {
                return Err(ApiError::bad(
                    "upload_stalled",
                    format!(
                        "no data for {} s after {total} bytes; upload again",
                        limits.idle.as_secs()
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad(
                    "upload_interrupted",
                    format!("the upload stream broke after {total} bytes: {e}"),
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        ends.push(&chunk);
        total += chunk.len() as u64;
        if total > limits.max_bytes {
            return Err(ApiError::TooLarge(format!(
                "the image is larger than the limit of {} bytes (limits.max_image_bytes)",
                limits.max_bytes
            )));
        }
        let mut chunk = chunk;
        while !chunk.is_empty() {
            // A whole segment arriving at a segment boundary (a format reader's output) is
            // hashed and stored where it is, without a copy into `pending`.
            if pending.is_empty() && chunk.len() >= SEGMENT_SIZE {
                let full = chunk.split_to(SEGMENT_SIZE);
                if let Some(task) = in_flight.take() {
                    spare = spare.or(task.finish(&mut builder, &mut stats).await?);
                }
                in_flight = Some(SegmentTask::start(&catalog, &store, full));
                continue;
            }
            let take = chunk.len().min(SEGMENT_SIZE - pending.len());
            pending.extend_from_slice(&chunk.split_to(take));
            if pending.len() == SEGMENT_SIZE {
                let next = spare
                    .take()
                    .unwrap_or_else(|| BytesMut::with_capacity(SEGMENT_SIZE));
                let full = std::mem::replace(&mut pending, next);
                if let Some(task) = in_flight.take() {
                    spare = task.finish(&mut builder, &mut stats).await?;
                }
                in_flight = Some(SegmentTask::start(&catalog, &store, full.freeze()));
            }
        }
    }
    if let Some(task) = in_flight.take() {
        task.finish(&mut builder, &mut stats).await?;
    }
    if !pending.is_empty() {
        SegmentTask::start(&catalog, &store, pending.freeze())
            .finish(&mut builder, &mut stats)
            .await?;
    }
    if builder.size() == 0 {
        return Err(ApiError::bad(
            "empty_image",
            "the upload carried no bytes; an image needs content",
        ));
    }
    let limits = format::Limits {
        max_virtual_size: limits.max_bytes,
        ..Default::default()
    };
    format::inspect(&ends.finish(), claimed, &limits)
        .map_err(|e| ApiError::bad(e.code(), format!("the upload was refused: {e}")))?;
    Ok((builder.finish(), stats))
}

/// Collects a stream's ends for the inspector: the head is copied (once, up to 4 MiB); the tail
/// keeps the last chunks by reference (no copy) until the stream ends.
#[derive(Default)]
struct Ends {
    head: Vec<u8>,
    recent: VecDeque<Bytes>,
    recent_bytes: usize,
    size: u64,
}

impl Ends {
    fn push(&mut self, chunk: &Bytes) {
        self.size += chunk.len() as u64;
        if self.head.len() < StreamEnds::HEAD {
            let take = chunk.len().min(StreamEnds::HEAD - self.head.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.recent.push_back(chunk.clone());
        self.recent_bytes += chunk.len();
        // Many tiny chunks would pin many receive buffers: fold them into one copy.
        if self.recent.len() > 64 {
            let joined: Vec<u8> = self.recent.iter().flat_map(|b| b.iter().copied()).collect();
            let keep = joined.len().saturating_sub(StreamEnds::TAIL);
            self.recent.clear();
            self.recent
                .push_back(Bytes::copy_from_slice(&joined[keep..]));
            self.recent_bytes = joined.len() - keep;
        }
        while self
            .recent
            .front()
            .is_some_and(|f| self.recent_bytes - f.len() >= StreamEnds::TAIL)
        {
            let front = self.recent.pop_front().map_or(0, |f| f.len());
            self.recent_bytes -= front;
        }
    }

    fn finish(self) -> StreamEnds {
        let tail: Vec<u8> = self.recent.iter().flat_map(|b| b.iter().copied()).collect();
        let tail = tail[tail.len().saturating_sub(StreamEnds::TAIL)..].to_vec();
        StreamEnds {
            head: self.head,
            tail,
            size: self.size,
        }
    }
}

/// Bounds on one upload.
#[derive(Clone, Copy, Debug)]
pub struct ReceiveLimits {
    pub max_bytes: u64,
    /// Longest wait for the next chunk of the body.
    pub idle: Duration,
}

/// A stored segment: its block ids, what was written, and its buffer (returned for reuse).
type SegmentDone = (Vec<BlockId>, StoreStats, Bytes);

/// One segment being hashed and stored on the blocking pool.
struct SegmentTask {
    len: usize,
    handle: tokio::task::JoinHandle<Result<SegmentDone, ApiError>>,
}

impl SegmentTask {
    fn start(catalog: &Catalog, store: &Arc<PackStore>, data: Bytes) -> SegmentTask {
        let (catalog, store) = (catalog.clone(), store.clone());
        let len = data.len();
        let handle = tokio::task::spawn_blocking(move || {
            let ids = hash_blocks(&data);
            let pairs: Vec<(BlockId, &[u8])> = ids
                .iter()
                .zip(data.chunks(BLOCK_SIZE))
                .filter(|(id, _)| !id.is_hole())
                .map(|(id, d)| (*id, d))
                .collect();
            let written = store_blocks(&catalog, &store, &pairs)?;
            drop(pairs);
            Ok((ids, written, data))
        });
        SegmentTask { len, handle }
    }

    /// Waits for the segment, records it, and hands back its buffer for reuse.
    async fn finish(
        self,
        builder: &mut ManifestBuilder,
        stats: &mut StoreStats,
    ) -> Result<Option<BytesMut>, ApiError> {
        let (ids, written, data) = self
            .handle
            .await
            .map_err(|e| ApiError::Internal(format!("ingest task failed: {e}")))??;
        builder
            .push_ids(self.len, ids)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        stats.new_blocks += written.new_blocks;
        stats.new_bytes += written.new_bytes;
        Ok(data.try_into_mut().ok().map(|mut buf| {
            buf.clear();
            buf
        }))
    }
}

/// Where imports stage files: under the data directory (never in memory, never in /tmp).
/// Nothing in it outlives the request or job that made it; start-up clears it.
pub fn staging_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("staging")
}

/// A new staged file, deleted when dropped, and an async handle to write it.
pub async fn staged_file(
    data_dir: &std::path::Path,
) -> Result<(tempfile::NamedTempFile, tokio::fs::File), ApiError> {
    let dir = staging_dir(data_dir);
    tokio::fs::create_dir_all(&dir).await?;
    let staged = tempfile::NamedTempFile::new_in(&dir)?;
    let out = tokio::fs::File::from_std(staged.reopen()?);
    Ok((staged, out))
}

/// Writes a request body to `out`, bounded by `max` bytes and `idle` seconds between chunks;
/// returns its length. A body that breaks (the client went away) is an error.
pub async fn write_body(
    body: axum::body::Body,
    out: &mut tokio::fs::File,
    idle: Duration,
    max: u64,
) -> Result<u64, ApiError> {
    use tokio::io::AsyncWriteExt;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                return Err(ApiError::bad(
                    "upload_stalled",
                    format!("no data for {} s after {total} bytes", idle.as_secs()),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad(
                    "upload_interrupted",
                    format!("the upload broke after {total} bytes: {e}"),
                ));
            }
            Ok(Some(Ok(c))) => c,
        };
        total += chunk.len() as u64;
        if total > max {
            return Err(ApiError::TooLarge(format!(
                "the file is larger than limits.max_image_bytes ({max} bytes)"
            )));
        }
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(total)
}

/// How far a conversion has read its logical disk (for a job's progress).
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    /// The logical disk's size, once the file is inspected.
    pub total: AtomicU64,
}

/// Commits a received manifest (the image turns active), or records why it could not be
/// (the image turns failed). Every way of making an image ends here.
pub async fn commit_or_fail(
    catalog: &Catalog,
    caller: Caller,
    id: Uuid,
    received: Result<Manifest, ApiError>,
) -> Result<Image, ApiError> {
    let result = match received {
        Ok(manifest) => {
            catalog
                .run(move |c| images::commit(c, &caller, id, &manifest))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        let reason = e.to_string();
        catalog
            .run(move |c| images::fail_upload(c, id, &reason))
            .await?;
    }
    result
}

/// ISO images are for transitional boots only, and only ISO files may become them.
pub fn check_kind(image: &Image, claimed: DiskFormat) -> Result<(), ApiError> {
    if (claimed == DiskFormat::Iso) != (image.kind == ImageKind::Iso) {
        return Err(ApiError::bad(
            "format_mismatch",
            format!(
                "a {} image cannot be made from a {claimed} file; ISO files make kind=iso images only",
                image.kind
            ),
        ));
    }
    Ok(())
}

/// Imports an image file (any accepted format) already on local disk: inspects it as
/// `claimed` (refused with the inspector's reason otherwise), reads it as its logical disk and
/// feeds that through [`receive`] — which checks the converted disk is raw (or an ISO) too.
pub async fn convert_file(
    catalog: &Catalog,
    store: &Arc<PackStore>,
    config: &crate::config::Limits,
    image: &Image,
    claimed: DiskFormat,
    file: std::fs::File,
    progress: &Arc<Progress>,
) -> Result<Manifest, ApiError> {
    let limits = format::Limits {
        max_virtual_size: config.max_image_bytes,
        ..Default::default()
    };
    let reader = tokio::task::spawn_blocking(move || {
        let info = format::inspect(&file, claimed, &limits)?;
        format::read::open(file, &info, &limits)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("inspection failed: {e}")))?
    .map_err(|e| ApiError::bad(e.code(), format!("the image was refused: {e}")))?;
    progress
        .total
        .store(reader.virtual_size(), Ordering::Relaxed);
    let rx = crate::stream::logical(reader);
    let counter = progress.clone();
    let body = crate::stream::body(rx).inspect(move |chunk| {
        if let Ok(c) = chunk {
            counter.done.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
    });
    let disk = if image.kind == ImageKind::Iso {
        DiskFormat::Iso
    } else {
        DiskFormat::Raw
    };
    let limits = ReceiveLimits {
        max_bytes: config.max_image_bytes,
        idle: Duration::from_secs(config.upload_idle_secs),
    };
    let (manifest, _) =
        receive(catalog.clone(), store.clone(), Box::pin(body), limits, disk).await?;
    Ok(manifest)
}
