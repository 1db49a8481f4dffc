//! Reading images back out: byte ranges of the logical disk (downloads) and batches of blocks
//! (segment reads for agents and peers). Every block read from a pack is re-hashed before it is
//! served when `store.verify_reads` is on, so a corrupt pack is reported, never passed on.
//!
//! NBD and iSCSI serving arrive with the block-serving work and will read through here.

use std::sync::Arc;

use bytes::Bytes;
use kagami_images::format::read::Logical;
use kagami_images::format::write::{Export, Piece};
use kagami_images::{BLOCK_SIZE, BlockId, Manifest, SEGMENT_BLOCKS, SEGMENT_SIZE};

use crate::catalog::{Catalog, blocks};
use crate::error::ApiError;
use crate::store::PackStore;

/// What reading needs: the catalog (block locations) and the store (bytes).
#[derive(Clone, Debug)]
pub struct Reader {
    pub catalog: Catalog,
    pub store: Arc<PackStore>,
    pub verify: bool,
}

static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// A producer's channel as a stream of body chunks (what axum and [`crate::ingest::receive`]
/// consume).
pub fn body(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Streams an image's logical disk, 4 MiB at a time, from a blocking thread (import: a qcow2
/// or other format read as the raw disk it describes).
pub fn logical(
    mut disk: Box<dyn Logical>,
) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let size = disk.virtual_size();
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(SEGMENT_SIZE as u64) as usize;
            let mut buf = vec![0u8; len];
            let item = disk
                .read_logical(&mut buf, offset)
                .map(|()| Bytes::from(buf))
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
    /// Reads the given non-hole blocks (in order), verifying each.
    pub fn read_blocks(&self, ids: &[BlockId]) -> Result<Vec<Vec<u8>>, ApiError> {
        let locations = self.catalog.run_blocking(|c| blocks::locate(c, ids))?;
        kagami_images::split::parallel_map(ids, |id| {
            let read = |loc: crate::store::Location| -> std::io::Result<Vec<u8>> {
                let mut buf = vec![0u8; loc.len as usize];
                self.store.read(loc, &mut buf)?;
                Ok(buf)
            };
            let loc = *locations
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))?;
            let data = match read(loc) {
                Ok(d) => d,
                // GC may have moved the block to a new pack since it was located: look again once.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let again = self.catalog.run_blocking(|c| blocks::locate(c, &[*id]))?;
                    let loc = *again
                        .get(id)
                        .ok_or_else(|| ApiError::NotFound(format!("block {id} is not stored")))?;
                    read(loc)?
                }
                Err(e) => return Err(e.into()),
            };
            if self.verify && BlockId::hash(&data) != *id {
                return Err(ApiError::Internal(format!(
                    "block {id} is corrupt in pack {:016x}; run a scrub",
                    loc.pack
                )));
            }
            Ok(data)
        })
        .into_iter()
        .collect()
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
    pub fn stream_export(
        &self,
        manifest: Arc<Manifest>,
        export: Box<dyn Export>,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut export = export;
            while let Some(piece) = export.next_piece() {
                let bytes = match piece {
                    Piece::Meta(bytes) => Ok(Bytes::from(bytes)),
                    Piece::Blocks(indices) => reader
                        .padded_blocks(&manifest, &indices)
                        .map(|data| Bytes::from(export.encode(&indices, data))),
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

    /// Guest blocks by index, each a full 64 KiB (holes zero, a short last block padded).
    fn padded_blocks(&self, manifest: &Manifest, indices: &[u64]) -> Result<Vec<u8>, ApiError> {
        let refs: Vec<_> = indices
            .iter()
            .map(|&i| {
                let seg = (i / SEGMENT_BLOCKS as u64) as usize;
                manifest
                    .segment_blocks(seg)
                    .nth((i % SEGMENT_BLOCKS as u64) as usize)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::Internal("export asked for a block past the end of the disk".into())
            })?;
        let wanted: Vec<BlockId> = refs
            .iter()
            .filter(|b| !b.id.is_hole())
            .map(|b| b.id)
            .collect();
        let mut data = self.read_blocks(&wanted)?.into_iter();
        let mut out = vec![0u8; refs.len() * BLOCK_SIZE];
        for (slot, b) in out.chunks_mut(BLOCK_SIZE).zip(&refs) {
            if !b.id.is_hole() {
                let block = data.next().unwrap_or_default();
                let n = block.len().min(BLOCK_SIZE);
                slot[..n].copy_from_slice(&block[..n]);
            }
        }
        Ok(out)
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
                        Bytes::from_static(&ZEROS[..b.len])
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
