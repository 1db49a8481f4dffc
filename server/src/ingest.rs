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
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use kagami_images::format::{self, DiskFormat, StreamEnds};
use kagami_images::split::{ManifestBuilder, hash_blocks};
use kagami_images::{BLOCK_SIZE, BlockId, Manifest, SEGMENT_SIZE};

use kagami_images::model::{Image, ImageKind};
use uuid::Uuid;

use crate::catalog::tenancy::Caller;
use crate::catalog::{Catalog, blocks, images, now_ms};
use crate::error::ApiError;
use crate::store::{self, Location, MEMORY_ALIGN, PackStore, WriteGate};

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
    let mut group = Unindexed::default();
    group.write(catalog, store, blocks)?;
    group.commit(catalog, store)?;
    Ok(group.committed)
}

/// New blocks one ingest wrote to the store and has not yet made durable and indexed: written
/// segment after segment without waiting for the disk, then one fsync and one catalog
/// transaction for the lot ([`Unindexed::commit`]). Per segment, the fsync and the transaction
/// (whose WAL pages, for random ids, are mostly new) cost as much as writing the data. It holds
/// the store's write gate from its first write to its commit, so GC never judges a pack holding
/// blocks it has written but not indexed; dropped uncommitted (a failed ingest), its blocks are
/// dead space GC reclaims, as after a crash.
#[derive(Default)]
struct Unindexed {
    rows: Vec<(BlockId, Location)>,
    ids: HashSet<BlockId>,
    bytes: u64,
    gate: Option<WriteGate>,
    /// The store's failed fsyncs when this group took the gate ([`PackStore::unchanged_since`]).
    failures: u64,
    /// What this group's commits have made durable so far.
    committed: StoreStats,
}

impl Unindexed {
    /// Writes the blocks of `blocks` that neither the index nor this group has (each once); they
    /// are not durable until [`Unindexed::commit`].
    fn write(
        &mut self,
        catalog: &Catalog,
        store: &PackStore,
        blocks: &[(BlockId, &[u8])],
    ) -> Result<(), ApiError> {
        let mut asked = HashSet::new();
        let ids: Vec<BlockId> = blocks
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !id.is_hole() && !self.ids.contains(id) && asked.insert(*id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        // Before the lookup: find_missing touches the unreferenced blocks it finds, and GC must
        // not drop them between that and our commit.
        if self.gate.is_none() {
            self.gate = Some(store.writing());
            self.failures = store.sync_failures();
        }
        let now = now_ms();
        let missing: HashSet<BlockId> = catalog
            .run_blocking(|c| blocks::find_missing(c, &ids, now))?
            .into_iter()
            .collect();
        let to_write: Vec<(BlockId, &[u8])> = blocks
            .iter()
            .filter(|(id, _)| missing.contains(id) && self.ids.insert(*id))
            .map(|(id, d)| (*id, *d))
            .collect();
        if to_write.is_empty() {
            return Ok(());
        }
        let locations = store.append_unsynced(&to_write)?;
        self.bytes += to_write.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        self.rows
            .extend(to_write.iter().map(|(id, _)| *id).zip(locations));
        Ok(())
    }

    /// Whether the group should commit now: it holds [`GROUP_BYTES`].
    fn full(&self) -> bool {
        self.bytes >= GROUP_BYTES
    }

    /// Makes the written blocks durable (fsync) and indexes them, then lets GC in again.
    fn commit(&mut self, catalog: &Catalog, store: &PackStore) -> Result<(), ApiError> {
        if !self.rows.is_empty() {
            store.sync()?;
            store.unchanged_since(self.failures)?;
            let now = now_ms();
            let rows = &self.rows;
            catalog.run_blocking(|c| blocks::insert(c, rows, now))?;
        }
        self.committed.new_blocks += self.rows.len() as u64;
        self.committed.new_bytes += self.bytes;
        self.rows.clear();
        self.ids.clear();
        self.bytes = 0;
        self.gate = None;
        Ok(())
    }
}

/// Bytes of new blocks an ingest writes between two commits of its [`Unindexed`] group.
const GROUP_BYTES: u64 = 64 << 20;
/// The longest a group stays open (GC waits for it), however slowly its stream trickles...
const GROUP_AGE: Duration = Duration::from_secs(1);
/// ...and the pause in a stream after which the written blocks are committed at once.
const GROUP_PAUSE: Duration = Duration::from_millis(100);

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
    let mut pipeline = Pipeline::new(catalog, store);
    let mut ends = Ends::default();
    let mut pending = segment_buffer();
    let mut total: u64 = 0;
    loop {
        // A pause in the stream, or a group open for GROUP_AGE: commit what is written, so GC
        // never waits on a slow sender.
        if pipeline.due() {
            pipeline.settle().await?;
        }
        let waiting = Instant::now();
        let chunk =
            match tokio::time::timeout(pipeline.patience().min(limits.idle), body.next()).await {
                Ok(next) => next,
                Err(_) => {
                    pipeline.settle().await?;
                    let rest = limits.idle.saturating_sub(waiting.elapsed());
                    tokio::time::timeout(rest, body.next()).await.map_err(|_| {
                        ApiError::bad(
                            "upload_stalled",
                            format!(
                                "no data for {} s after {total} bytes; upload again",
                                limits.idle.as_secs()
                            ),
                        )
                    })?
                }
            };
        let chunk = match chunk {
            None => break,
            Some(Err(e)) => {
                return Err(ApiError::bad(
                    "upload_interrupted",
                    format!("the upload stream broke after {total} bytes: {e}"),
                ));
            }
            Some(Ok(chunk)) => chunk,
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
                pipeline.push(chunk.split_to(SEGMENT_SIZE)).await?;
                continue;
            }
            let take = chunk.len().min(SEGMENT_SIZE - pending.len());
            pending.extend_from_slice(&chunk.split_to(take));
            if pending.len() == SEGMENT_SIZE {
                let next = pipeline.spare();
                pipeline
                    .push(std::mem::replace(&mut pending, next).freeze())
                    .await?;
            }
        }
    }
    if !pending.is_empty() {
        pipeline.push(pending.freeze()).await?;
    }
    let (builder, stats) = pipeline.finish().await?;
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

/// An empty segment buffer starting at a 4 KiB-aligned address: the store writes its blocks to
/// the disk from there (`O_DIRECT`), without copying them into a buffer of its own — a copy
/// that cost ~15 % of an import's CPU (interleaved qcow2 imports, BENCHMARKS.md).
fn segment_buffer() -> BytesMut {
    let mut buf = BytesMut::with_capacity(SEGMENT_SIZE + MEMORY_ALIGN);
    // Empty, `buf` still points at the start of its capacity.
    let pad = store::aligned_start(&buf);
    buf.resize(pad, 0);
    bytes::Buf::advance(&mut buf, pad);
    buf
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

/// Segments on their way into the store, through two stages on the blocking pool: each is
/// hashed on every core, then its new blocks are written (into the ingest's [`Unindexed`]
/// group). Segment N+1 is hashed while N is written and N+2 arrives; one segment in each stage
/// bounds memory and gives back-pressure to the sender, and no thread is held between segments,
/// so slow uploads cannot starve the pool. Holes the reader already knows (the shared zero
/// segment) skip both stages.
struct Pipeline {
    catalog: Catalog,
    store: Arc<PackStore>,
    builder: ManifestBuilder,
    hashing: Option<tokio::task::JoinHandle<(Vec<BlockId>, Bytes)>>,
    storing: Option<tokio::task::JoinHandle<Result<(Unindexed, Bytes), ApiError>>>,
    /// The group, while no store task has it.
    group: Option<Unindexed>,
    /// When the first segment since the last [`Pipeline::settle`] was taken.
    open_since: Option<Instant>,
    /// A stored segment's buffer, for the next segment (no fresh 4 MiB and its page faults).
    spare: Option<BytesMut>,
}

impl Pipeline {
    fn new(catalog: Catalog, store: Arc<PackStore>) -> Pipeline {
        Pipeline {
            catalog,
            store,
            builder: ManifestBuilder::new(),
            hashing: None,
            storing: None,
            group: Some(Unindexed::default()),
            open_since: None,
            spare: None,
        }
    }

    /// Whether what was written has waited [`GROUP_AGE`] for its commit.
    fn due(&self) -> bool {
        self.open_since.is_some_and(|t| t.elapsed() >= GROUP_AGE)
    }

    /// How long to wait for the stream before committing what was written: [`GROUP_PAUSE`], or
    /// less when the group is due sooner.
    fn patience(&self) -> Duration {
        self.open_since
            .map_or(GROUP_PAUSE, |t| GROUP_AGE.saturating_sub(t.elapsed()))
            .min(GROUP_PAUSE)
    }

    /// An empty segment buffer.
    fn spare(&mut self) -> BytesMut {
        self.spare.take().unwrap_or_else(segment_buffer)
    }

    /// Takes the next segment (in disk order).
    async fn push(&mut self, data: Bytes) -> Result<(), ApiError> {
        self.hashed().await?;
        if crate::stream::is_zero_segment(&data) {
            return self.record(
                data.len(),
                vec![BlockId::HOLE; data.len().div_ceil(BLOCK_SIZE)],
            );
        }
        // From here the segment waits to be stored: within GROUP_AGE, however slow the stream.
        self.open_since.get_or_insert_with(Instant::now);
        self.hashing = Some(tokio::task::spawn_blocking(move || {
            (hash_blocks(&data), data)
        }));
        Ok(())
    }

    fn record(&mut self, len: usize, ids: Vec<BlockId>) -> Result<(), ApiError> {
        self.builder
            .push_ids(len, ids)
            .map(drop)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Waits for the segment being hashed, records its ids and hands it to the store stage.
    async fn hashed(&mut self) -> Result<(), ApiError> {
        let Some(task) = self.hashing.take() else {
            return Ok(());
        };
        let (ids, data) = task
            .await
            .map_err(|e| ApiError::Internal(format!("ingest task failed: {e}")))?;
        self.record(data.len(), ids.clone())?;
        if ids.iter().all(BlockId::is_hole) {
            self.recycle(data);
            return Ok(());
        }
        let mut group = self.stored().await?;
        let (catalog, store) = (self.catalog.clone(), self.store.clone());
        self.storing = Some(tokio::task::spawn_blocking(move || {
            let pairs: Vec<(BlockId, &[u8])> =
                ids.into_iter().zip(data.chunks(BLOCK_SIZE)).collect();
            group.write(&catalog, &store, &pairs)?;
            if group.full() {
                group.commit(&catalog, &store)?;
            }
            drop(pairs);
            Ok((group, data))
        }));
        Ok(())
    }

    /// Waits for the segment being stored, if any; returns the group.
    async fn stored(&mut self) -> Result<Unindexed, ApiError> {
        let Some(task) = self.storing.take() else {
            return Ok(self.group.take().unwrap_or_default());
        };
        let (group, data) = task
            .await
            .map_err(|e| ApiError::Internal(format!("ingest task failed: {e}")))??;
        self.recycle(data);
        Ok(group)
    }

    fn recycle(&mut self, data: Bytes) {
        if let Ok(mut buf) = data.try_into_mut()
            && buf.capacity() >= SEGMENT_SIZE
        {
            buf.clear();
            self.spare = Some(buf);
        }
    }

    /// Waits for both stages and commits the group: everything pushed so far is stored,
    /// durable and indexed.
    async fn settle(&mut self) -> Result<(), ApiError> {
        self.hashed().await?;
        let mut group = self.stored().await?;
        if group.gate.is_some() {
            let (catalog, store) = (self.catalog.clone(), self.store.clone());
            group =
                tokio::task::spawn_blocking(move || group.commit(&catalog, &store).map(|()| group))
                    .await
                    .map_err(|e| ApiError::Internal(format!("ingest task failed: {e}")))??;
        }
        self.group = Some(group);
        self.open_since = None;
        Ok(())
    }

    /// Settles and returns the manifest's builder and what was written.
    async fn finish(mut self) -> Result<(ManifestBuilder, StoreStats), ApiError> {
        self.settle().await?;
        let committed = self.group.map(|g| g.committed).unwrap_or_default();
        Ok((self.builder, committed))
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
/// returns its length. A body that breaks (the client went away) is an error. `wrote` hears how
/// many bytes are in the file (not in a buffer) as they land — at the latest when the body
/// pauses — for an import job reading the file as it arrives ([`crate::jobs::arriving`]).
pub async fn write_body(
    body: axum::body::Body,
    out: &mut tokio::fs::File,
    idle: Duration,
    max: u64,
    wrote: impl Fn(u64),
) -> Result<u64, ApiError> {
    use futures_util::FutureExt;
    use tokio::io::AsyncWriteExt;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    loop {
        let next = match stream.next().now_or_never() {
            Some(next) => Ok(next),
            None => {
                // Nothing more has come yet: let the last chunk land and say so, or a reader
                // waiting for its bytes would wait for the next chunk too.
                out.flush().await?;
                wrote(total);
                tokio::time::timeout(idle, stream.next()).await
            }
        };
        let chunk = match next {
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
            // An empty chunk would return from `write_all` before the previous write ends.
            Ok(Some(Ok(c))) if c.is_empty() => continue,
            Ok(Some(Ok(c))) => c,
        };
        if total + chunk.len() as u64 > max {
            return Err(ApiError::TooLarge(format!(
                "the file is larger than limits.max_image_bytes ({max} bytes)"
            )));
        }
        // `write_all` returns once this chunk is buffered and its write started, which is once
        // the previous chunks' writes are done: they are in the file.
        out.write_all(&chunk).await?;
        wrote(total);
        total += chunk.len() as u64;
    }
    out.flush().await?;
    wrote(total);
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

/// Reads `reader` (an inspected image file opened as its logical disk) into blocks through
/// [`receive`] — which checks the converted disk is raw (or an ISO) too.
pub async fn convert(
    catalog: &Catalog,
    store: &Arc<PackStore>,
    config: &crate::config::Limits,
    image: &Image,
    reader: Box<dyn format::read::Logical>,
    progress: &Arc<Progress>,
) -> Result<Manifest, ApiError> {
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
        // The reader never stalls on its own: its reads wait only for an upload still arriving,
        // whose request gives up after `upload_idle_secs` without data (and fails the reads).
        idle: Duration::from_secs(24 * 3600),
    };
    let (manifest, _) =
        receive(catalog.clone(), store.clone(), Box::pin(body), limits, disk).await?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const LIMITS: ReceiveLimits = ReceiveLimits {
        max_bytes: 1 << 30,
        idle: Duration::from_secs(5),
    };

    /// A catalog and a block store in a new folder (removed when the first value drops).
    fn fresh_store() -> (tempfile::TempDir, Catalog, Arc<PackStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = Catalog::open(&dir.path().join("c.db")).expect("catalog");
        let store = Arc::new(PackStore::open(&dir.path().join("packs"), 16 << 20).expect("store"));
        (dir, catalog, store)
    }

    /// Every one of `ids` is durable and indexed, and no ingest holds the store from GC.
    async fn assert_committed(catalog: &Catalog, store: &PackStore, ids: Vec<BlockId>) {
        let missing = catalog
            .run(move |c| blocks::find_missing(c, &ids, now_ms()))
            .await
            .expect("lookup");
        assert!(missing.is_empty(), "{} blocks not indexed", missing.len());
        assert!(store.gc_could_run(), "an ingest still holds the store");
    }

    /// Two ingests write; one's fsync fails (the kernel reports it to that fsync only): the
    /// other's commit fails too, and neither indexes a block.
    #[test]
    fn a_failed_fsync_keeps_every_open_group_from_indexing() {
        let (_dir, catalog, store) = fresh_store();
        let (a, b) = (noise(5, 65536), noise(6, 65536));
        let (a_id, b_id) = (BlockId::hash(&a), BlockId::hash(&b));
        let (mut first, mut second) = (Unindexed::default(), Unindexed::default());
        first.write(&catalog, &store, &[(a_id, &a)]).expect("write");
        second
            .write(&catalog, &store, &[(b_id, &b)])
            .expect("write");
        store.fail_next_sync();
        assert!(first.commit(&catalog, &store).is_err());
        assert!(second.commit(&catalog, &store).is_err());
        let missing = catalog
            .run_blocking(|c| blocks::find_missing(c, &[a_id, b_id], now_ms()))
            .expect("lookup");
        assert_eq!(missing.len(), 2, "nothing indexed");
    }

    /// Segment buffers start aligned, and stay so when a stored segment's buffer comes back.
    #[test]
    fn segment_buffers_are_aligned_and_stay_aligned_when_reused() {
        let aligned = |b: &[u8]| b.as_ptr().addr().is_multiple_of(4096);
        let mut buf = segment_buffer();
        assert!(aligned(&buf) && buf.capacity() >= SEGMENT_SIZE);
        buf.extend_from_slice(&noise(9, SEGMENT_SIZE));
        assert!(aligned(&buf));
        let at = buf.as_ptr();
        let (_dir, catalog, store) = fresh_store();
        let mut pipeline = Pipeline::new(catalog, store);
        pipeline.recycle(buf.freeze());
        let again = pipeline.spare();
        assert_eq!(again.as_ptr(), at, "the same buffer comes back");
        assert!(again.capacity() >= SEGMENT_SIZE && again.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trickling_stream_commits_what_it_wrote_within_a_second() {
        let (_dir, catalog, store) = fresh_store();
        let a = Bytes::from(noise(3, SEGMENT_SIZE));
        let a_ids = hash_blocks(&a);
        // A segment, then 1 KiB every 30 ms: never the 100 ms pause that commits at once.
        let mut items = vec![a.clone()];
        items.extend((0..60).map(|i| Bytes::from(noise(100 + i, 1024))));
        let (c, s) = (catalog.clone(), store.clone());
        let body =
            futures_util::stream::iter(items.into_iter().enumerate()).then(move |(i, item)| {
                let (c, s, a_ids) = (c.clone(), s.clone(), a_ids.clone());
                async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    if i == 50 {
                        // ~1.5 s after the segment: its group is committed, GC could run.
                        assert_committed(&c, &s, a_ids).await;
                    }
                    Ok::<_, std::io::Error>(item)
                }
            });
        let (manifest, _) = receive(catalog, store, Box::pin(body), LIMITS, DiskFormat::Raw)
            .await
            .expect("receive");
        assert_eq!(manifest.virtual_size(), SEGMENT_SIZE as u64 + 60 * 1024);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_are_stored_in_groups_committed_when_the_stream_pauses() {
        let (_dir, catalog, store) = fresh_store();
        let a = Bytes::from(noise(1, SEGMENT_SIZE));
        let tail = Bytes::from(noise(2, 100 << 10));
        let a_ids = hash_blocks(&a);
        // a twice (the second time its blocks are in the open group, not yet indexed), a
        // pause, a known hole (the shared zero segment), a short last segment.
        let (c, s) = (catalog.clone(), store.clone());
        let items = vec![
            a.clone(),
            a.clone(),
            Bytes::new(),
            crate::stream::ZERO_SEGMENT.clone(),
            tail.clone(),
        ];
        let body = futures_util::stream::iter(items).then(move |item| {
            let (c, s, a_ids) = (c.clone(), s.clone(), a_ids.clone());
            async move {
                if item.is_empty() {
                    // The pause: by now what came before is durable and indexed, and GC could
                    // run.
                    tokio::time::sleep(GROUP_PAUSE * 4).await;
                    assert_committed(&c, &s, a_ids).await;
                }
                Ok::<_, std::io::Error>(item)
            }
        });
        let (manifest, stats) = receive(
            catalog.clone(),
            store.clone(),
            Box::pin(body),
            LIMITS,
            DiskFormat::Raw,
        )
        .await
        .expect("receive");
        // Every distinct block written once: a's 64, the tail's 2.
        assert_eq!(stats.new_blocks, 64 + 2);
        assert_eq!(stats.new_bytes, SEGMENT_SIZE as u64 + (100 << 10));
        let whole = [&a[..], &a[..], &vec![0u8; SEGMENT_SIZE], &tail[..]].concat();
        let expected: Vec<BlockId> = whole.chunks(SEGMENT_SIZE).flat_map(hash_blocks).collect();
        let got: Vec<BlockId> = manifest.blocks().map(|b| b.id).collect();
        assert_eq!(got, expected);
        assert_eq!(manifest.virtual_size(), whole.len() as u64);
        // Every block is indexed at the end.
        assert_committed(&catalog, &store, got).await;
    }
}
