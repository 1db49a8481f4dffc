//! Reading images back out: byte ranges of the logical disk (downloads) and batches of blocks
//! (segment reads for agents and peers). Every block read from a pack is re-hashed before it is
//! served when `store.verify_reads` is on, so a corrupt pack is reported, never passed on.
//!
//! The block exports ([`nbd`], [`iscsi`]) read through here too, and share the accept loop,
//! the access check below and the registry of open sessions ([`sessions`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kagami_images::format::read::Logical;
use kagami_images::format::write::{Export, Piece};
use kagami_images::{BLOCK_SIZE, BlockId, Manifest, SEGMENT_BLOCKS, SEGMENT_SIZE};

use crate::catalog::tenancy::Caller;
use crate::catalog::{Catalog, blocks, images};
use crate::error::ApiError;
use crate::store::{self, Location, MEMORY_ALIGN, PackStore};

pub mod iscsi;
pub mod nbd;
pub mod sessions;

/// The manifest of image `id` if `caller` may read it and it is active: what a block export
/// opens. A missing image and one the caller may not see are the same answer.
pub fn open_image(
    conn: &rusqlite::Connection,
    caller: &Caller,
    id: uuid::Uuid,
) -> Result<Arc<Manifest>, ApiError> {
    let (_, index) = images::manifest_index(conn, caller, id)?;
    Ok(Arc::new(blocks::load_manifest(conn, &index)?))
}

/// Accepts connections on `listener` until the process ends, each served by `serve` on a task
/// of its own; past `max` open connections, new ones are closed on arrival. `what` names the
/// protocol in the log.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    max: usize,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("{what} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{what} connection refused: {max} already open");
            continue;
        };
        let served = serve(stream, peer);
        tokio::spawn(async move {
            served.await;
            drop(slot);
        });
    }
}

/// What reading needs: the catalog (block locations) and the store (bytes).
#[derive(Clone, Debug)]
pub struct Reader {
    pub catalog: Catalog,
    pub store: Arc<PackStore>,
    pub verify: bool,
}

/// A segment of zeroes that is never written, for holes: allocated zeroed (a fresh mapping),
/// its pages are all the kernel's one zero page, so reading it costs no memory traffic (and no
/// 4 MiB in the binary, as a static array would).
pub(crate) static ZERO_SEGMENT: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| Bytes::from(vec![0u8; SEGMENT_SIZE]));

/// Whether `data` is (a slice of the front of) the shared zero segment: a hole its producer
/// already knew, which needs no hashing or storing.
pub fn is_zero_segment(data: &Bytes) -> bool {
    std::ptr::eq(data.as_ptr(), ZERO_SEGMENT.as_ptr())
}

/// A block to read: its id, where it is stored, and the buffer it goes into (at the front).
type Slot<'a> = (BlockId, Location, &'a mut [u8]);

/// Pieces of an export produced ahead of the client (4 MiB runs: up to 16 MiB in flight).
const EXPORT_AHEAD: usize = 4;

/// Run buffers an export keeps for reuse: enough for those in flight, one being filled, one
/// being sent.
const EXPORT_SPARE: usize = (EXPORT_AHEAD + 2) * SEGMENT_SIZE;

/// Buffers handed back once what was sent from them is gone: no fresh allocation per run or
/// request (a large one is a fresh mapping: page faults and zeroing, ~7 % of an NBD read's CPU
/// before the pool). Spares are kept up to a byte bound.
#[derive(Clone, Debug)]
pub(crate) struct BufferPool {
    spare: Arc<Mutex<Spares>>,
    keep: usize,
}

#[derive(Debug, Default)]
struct Spares {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` bytes of spare buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            spare: Arc::default(),
            keep,
        }
    }

    /// A buffer of `len` bytes whose contents are stale: the caller writes every byte.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            let buf = spare.bufs.pop().unwrap_or_default();
            spare.bytes -= buf.capacity();
            buf
        };
        buf.truncate(len);
        buf.resize(len, 0);
        buf
    }

    /// `buf` as a body chunk that comes back to the pool when dropped.
    pub(crate) fn bytes(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut spare = self.pool.spare.lock().unwrap_or_else(|p| p.into_inner());
        let size = self.buf.capacity();
        if spare.bytes + size <= self.pool.keep {
            spare.bytes += size;
            spare.bufs.push(std::mem::take(&mut self.buf));
        }
    }
}

/// A producer's channel as a stream of body chunks (what axum and [`crate::ingest::receive`]
/// consume).
pub fn body(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Segment buffers of [`logical`] kept for reuse: those in the channel, the one being filled,
/// the one being hashed and stored.
const LOGICAL_SPARE: usize = 6 * (SEGMENT_SIZE + MEMORY_ALIGN);

/// Streams an image's logical disk, 4 MiB at a time, from a blocking thread (import: a qcow2
/// or other format read as the raw disk it describes). A segment the image's tables show
/// unallocated is sent as zeroes without reading or filling anything; the others are read into
/// reused buffers.
pub fn logical(
    mut disk: Box<dyn Logical>,
) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let size = disk.virtual_size();
        let pool = BufferPool::new(LOGICAL_SPARE);
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(SEGMENT_SIZE as u64) as usize;
            let item = match disk.is_hole(offset, len as u64) {
                Ok(true) => Ok(ZERO_SEGMENT.slice(..len)),
                Ok(false) => {
                    // Read to a 4 KiB-aligned address: the store writes its blocks to the
                    // disk from there (O_DIRECT), without a copy.
                    let mut buf = pool.take(len + MEMORY_ALIGN);
                    let at = store::aligned_start(&buf);
                    disk.read_logical(&mut buf[at..at + len], offset)
                        .map(|()| pool.bytes(buf).slice(at..at + len))
                }
                Err(e) => Err(e),
            }
            .map_err(std::io::Error::other);
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
            offset += len as u64;
        }
    });
    rx
}

impl Reader {
    /// Reads the given non-hole blocks (in order), verified, on every core.
    pub fn read_blocks(&self, ids: &[BlockId]) -> Result<Vec<Vec<u8>>, ApiError> {
        let locations = self.catalog.run_blocking(|c| blocks::locate(c, ids))?;
        let located: Vec<Location> = ids
            .iter()
            .map(|id| {
                locations
                    .get(id)
                    .copied()
                    .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))
            })
            .collect::<Result<_, _>>()?;
        let mut bufs: Vec<Vec<u8>> = located.iter().map(|l| vec![0u8; l.len as usize]).collect();
        let mut slots: Vec<Slot> = ids
            .iter()
            .zip(&located)
            .zip(bufs.iter_mut())
            .map(|((id, loc), buf)| (*id, *loc, buf.as_mut_slice()))
            .collect();
        self.read_verified_all(&mut slots)?;
        Ok(bufs)
    }

    /// Reads block `id`, stored at `loc`, into the front of `dst`, unverified; returns its length
    /// and the pack it came from. GC may have moved the block to a new pack since it was
    /// located: it is looked up again once.
    fn load(&self, id: &BlockId, loc: Location, dst: &mut [u8]) -> Result<(usize, u64), ApiError> {
        let n = loc.len as usize;
        if n > dst.len() {
            return Err(ApiError::Internal(format!(
                "block {id} is stored as {n} bytes, more than a block"
            )));
        }
        match self.store.read(loc, &mut dst[..n]) {
            Ok(()) => Ok((n, loc.pack)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let again = self.catalog.run_blocking(|c| blocks::locate(c, &[*id]))?;
                let moved = *again
                    .get(id)
                    .filter(|m| m.len == loc.len)
                    .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))?;
                self.store.read(moved, &mut dst[..n])?;
                Ok((n, moved.pack))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads each block of `slots` into the front of its buffer, then verifies them together
    /// (when `verify_reads` is on; several hashed at once, [`BlockId::hash_many`]) on the
    /// calling thread; returns each block's length.
    fn read_verified(&self, slots: &mut [Slot]) -> Result<Vec<usize>, ApiError> {
        let mut loaded = Vec::with_capacity(slots.len());
        for (id, loc, dst) in slots.iter_mut() {
            loaded.push(self.load(id, *loc, dst)?);
        }
        if self.verify {
            let data: Vec<&[u8]> = slots
                .iter()
                .zip(&loaded)
                .map(|((_, _, dst), &(n, _))| &dst[..n])
                .collect();
            let hashed = BlockId::hash_many(&data);
            let corrupt = slots.iter().zip(&hashed).position(|((id, ..), h)| h != id);
            if let Some(i) = corrupt {
                return Err(ApiError::Corrupt(format!(
                    "the server's copy of block {} is corrupt (pack {:016x}); run a scrub",
                    slots[i].0, loaded[i].1
                )));
            }
        }
        Ok(loaded.into_iter().map(|(n, _)| n).collect())
    }

    /// [`Reader::read_verified`] with the slots cut into one run per core.
    fn read_verified_all(&self, slots: &mut [Slot]) -> Result<Vec<usize>, ApiError> {
        let per = slots.len().div_ceil(kagami_images::split::cores()).max(1);
        std::thread::scope(|scope| {
            let mut runs = slots.chunks_mut(per);
            let first = runs.next().unwrap_or_default();
            let others: Vec<_> = runs
                .map(|run| scope.spawn(move || self.read_verified(run)))
                .collect();
            let mut lens = Vec::new();
            let mut result = self.read_verified(first).map(|l| lens.extend(l));
            for handle in others {
                let run = handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                result = result.and(run.map(|l| lens.extend(l)));
            }
            result.map(|()| lens)
        })
    }

    /// Reads the given blocks into one body of block frames (`kagami_images::wire`).
    pub fn read_frames(&self, ids: &[BlockId]) -> Result<Vec<u8>, ApiError> {
        let data = self.read_blocks(ids)?;
        let mut out = Vec::with_capacity(data.iter().map(|d| d.len() + 36).sum());
        for (id, d) in ids.iter().zip(&data) {
            kagami_images::wire::encode_frame(&mut out, id, d);
        }
        Ok(out)
    }

    /// Streams an export (`kagami_images::format::write`): generated metadata as is, and runs
    /// of guest blocks read from the store, holes as zeroes, each padded to 64 KiB.
    ///
    /// Each run is read straight into a reused buffer (no per-block allocation, no copy into
    /// place) and verified on every core, up to [`EXPORT_AHEAD`] pieces ahead of the client:
    /// the next runs are read and hashed while the previous ones are on the wire.
    pub fn stream_export(
        &self,
        manifest: Arc<Manifest>,
        export: Box<dyn Export>,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(EXPORT_AHEAD);
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut export = export;
            let pool = BufferPool::new(EXPORT_SPARE);
            while let Some(piece) = export.next_piece() {
                let bytes = match piece {
                    Piece::Meta(bytes) => Ok(Bytes::from(bytes)),
                    Piece::Blocks(indices) => {
                        let mut buf = pool.take(indices.len() * BLOCK_SIZE);
                        reader
                            .fill_blocks(&manifest, &indices, &mut buf)
                            .map(|()| pool.bytes(export.encode(&indices, buf)))
                    }
                };
                let failed = bytes.is_err();
                if let Err(e) = &bytes {
                    tracing::error!("export aborted: {e}");
                }
                if tx
                    .blocking_send(bytes.map_err(|e| std::io::Error::other(e.to_string())))
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        });
        rx
    }

    /// Fills `buf` with guest blocks `indices`, 64 KiB a slot (a hole as zeroes, a short last
    /// block zero-padded), each read into its slot and verified there, on every core.
    fn fill_blocks(
        &self,
        manifest: &Manifest,
        indices: &[u64],
        buf: &mut [u8],
    ) -> Result<(), ApiError> {
        let ids: Vec<BlockId> = indices
            .iter()
            .map(|&i| {
                let seg = (i / SEGMENT_BLOCKS as u64) as usize;
                manifest
                    .segment_blocks(seg)
                    .nth((i % SEGMENT_BLOCKS as u64) as usize)
                    .map(|b| b.id)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::Internal("export asked for a block past the end of the disk".into())
            })?;
        let locations = self.catalog.run_blocking(|c| blocks::locate(c, &ids))?;
        let mut slots: Vec<Slot> = Vec::with_capacity(ids.len());
        for (id, slot) in ids.iter().zip(buf.chunks_mut(BLOCK_SIZE)) {
            if id.is_hole() {
                slot.fill(0);
                continue;
            }
            let loc = *locations
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))?;
            slots.push((*id, loc, slot));
        }
        let lens = self.read_verified_all(&mut slots)?;
        for ((_, _, slot), n) in slots.iter_mut().zip(lens) {
            slot[n..].fill(0);
        }
        Ok(())
    }

    /// Fills `out` with the logical bytes at `offset` (holes as zeroes): what a block protocol
    /// (NBD) asks for. Every block touched is read whole and verified like any other read; a
    /// whole block lands straight in `out`, a partly wanted one goes through a scratch block.
    /// Runs on the calling thread: a server answering many requests at once gets its
    /// parallelism from them.
    pub fn read_at(
        &self,
        manifest: &Manifest,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ApiError> {
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= manifest.virtual_size())
            .ok_or_else(|| ApiError::Internal("read past the end of the disk".into()))?;
        if out.is_empty() {
            return Ok(());
        }
        let block = BLOCK_SIZE as u64;
        let first = offset / block;
        let ids: Vec<BlockId> = (first..end.div_ceil(block))
            .map(|i| block_at(manifest, i))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::Internal("the manifest has no such block".into()))?;
        let locations = self.catalog.run_blocking(|c| blocks::locate(c, &ids))?;
        // Each block's share of `out`: a whole block is read straight into it, one cut by the
        // range's ends whole into scratch and its part copied after verification.
        let mut whole: Vec<Slot> = Vec::with_capacity(ids.len());
        let mut cut = Vec::new();
        let mut rest = out;
        for (i, id) in (first..).zip(&ids) {
            let start = i * block;
            let (from, to) = (offset.max(start), end.min(start + block));
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut((to - from) as usize);
            rest = tail;
            if id.is_hole() {
                dst.fill(0);
                continue;
            }
            let loc = *locations
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))?;
            if from == start && dst.len() == loc.len as usize {
                whole.push((*id, loc, dst));
            } else {
                cut.push((
                    *id,
                    loc,
                    (from - start) as usize..(to - start) as usize,
                    dst,
                ));
            }
        }
        let mut scratch = vec![vec![0u8; BLOCK_SIZE]; cut.len()];
        let mut slots = whole;
        for ((id, loc, ..), buf) in cut.iter().zip(scratch.iter_mut()) {
            slots.push((*id, *loc, buf.as_mut_slice()));
        }
        let lens = self.read_verified(&mut slots)?;
        drop(slots);
        let cut_lens = &lens[lens.len() - cut.len()..];
        for ((id, _, range, dst), (buf, &n)) in cut.into_iter().zip(scratch.iter().zip(cut_lens)) {
            let part = buf
                .get(range.clone())
                .filter(|_| range.end <= n)
                .ok_or_else(|| {
                    ApiError::Internal(format!("block {id} is shorter than its slot"))
                })?;
            dst.copy_from_slice(part);
        }
        Ok(())
    }

    /// Streams bytes `start..end` of the logical disk, one segment at a time, from a blocking
    /// thread. Holes come out as zeroes without touching the store. Memory: one segment's blocks.
    pub fn stream_range(
        &self,
        manifest: Arc<Manifest>,
        start: u64,
        end: u64,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let first = (start / SEGMENT_SIZE as u64) as usize;
            let last = end.div_ceil(SEGMENT_SIZE as u64) as usize;
            for index in first..last.min(manifest.segments().len()) {
                let slots: Vec<_> = manifest
                    .segment_blocks(index)
                    .filter(|b| b.offset + b.len as u64 > start && b.offset < end)
                    .collect();
                let wanted: Vec<BlockId> = slots
                    .iter()
                    .filter(|b| !b.id.is_hole())
                    .map(|b| b.id)
                    .collect();
                let mut data = match reader.read_blocks(&wanted) {
                    Ok(d) => d.into_iter(),
                    Err(e) => {
                        tracing::error!("download aborted: {e}");
                        let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                for b in slots {
                    let bytes = if b.id.is_hole() {
                        ZERO_SEGMENT.slice(..b.len)
                    } else {
                        Bytes::from(data.next().unwrap_or_default())
                    };
                    // The catalog checks lengths at commit; never trust that here with a panic.
                    if bytes.len() != b.len {
                        tracing::error!(block = %b.id, "stored block length does not match its slot; download aborted");
                        let _ =
                            tx.blocking_send(Err(std::io::Error::other("block length mismatch")));
                        return;
                    }
                    let from = start.saturating_sub(b.offset) as usize;
                    let to = (end - b.offset).min(b.len as u64) as usize;
                    if tx.blocking_send(Ok(bytes.slice(from..to))).is_err() {
                        return; // the client went away
                    }
                }
            }
        });
        rx
    }
}

/// The id of block `index` of `manifest` (a hole inside a hole segment), if the disk has it.
fn block_at(manifest: &Manifest, index: u64) -> Option<BlockId> {
    let seg = manifest
        .segments()
        .get((index / SEGMENT_BLOCKS as u64) as usize)?;
    if seg.is_hole() {
        return Some(BlockId::HOLE);
    }
    seg.blocks
        .get((index % SEGMENT_BLOCKS as u64) as usize)
        .copied()
}
