//! The block store: blocks appended to pack files of ~16 MiB under `<data_dir>/packs`.
//!
//! Each record is a 40-byte header (`KGB1`, length, block id) followed by the block's bytes. A
//! batch of records is written and the pack fsynced *before* the caller commits the index rows
//! that point into it (see `catalog::blocks`), so the index never names bytes that are not on
//! disk. After a crash the current pack may end in a torn or unindexed record; Kagami never
//! appends to a pack it did not create in this run, so such a tail is simply never referenced,
//! counts as dead space, and goes when GC rewrites the pack. [`scan_pack`] walks a pack's
//! records and stops at the first torn one (recovery and checks).
//!
//! The S3 backend (packs as objects) arrives with the scale-out work behind the same calls.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kagami_images::BlockId;

const RECORD_MAGIC: &[u8; 4] = b"KGB1";
const HEADER_LEN: u64 = 40;
/// Pack files kept open for reading at most.
const MAX_OPEN_PACKS: usize = 1024;

/// Where a block's bytes are: pack id, offset of the data (after the record header), length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
}

/// Pack files on local disk.
#[derive(Debug)]
pub struct PackStore {
    dir: PathBuf,
    pack_bytes: u64,
    writer: Mutex<Option<Writer>>,
    next_id: Mutex<u64>,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Held shared by writers from "append" until "indexed", exclusively by GC: GC never judges
    /// a pack whose new blocks are written but not yet in the index.
    phase: RwLock<()>,
}

#[derive(Debug)]
struct Writer {
    id: u64,
    file: File,
    len: u64,
}

/// Most buffers one `writev` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

impl Writer {
    /// Writes records at the end of the pack. Only this writer moves the file's cursor (reads
    /// use `pread`), so the cursor is always at `len`.
    fn write(
        &mut self,
        records: &[([u8; HEADER_LEN as usize], &[u8])],
        bytes: u64,
    ) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = records
            .iter()
            .flat_map(|(h, d)| [IoSlice::new(h), IoSlice::new(d)])
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = (&self.file).write_vectored(&rest[..rest.len().min(IOV_MAX)])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pack write made no progress",
                ));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        self.len += bytes;
        Ok(())
    }
}

impl PackStore {
    /// Opens the store in `dir`, creating it if needed. New writes always go to a new pack.
    pub fn open(dir: &Path, pack_bytes: u64) -> io::Result<PackStore> {
        fs::create_dir_all(dir)?;
        let next = list_packs(dir)?
            .into_iter()
            .map(|(id, _)| id + 1)
            .max()
            .unwrap_or(1);
        Ok(PackStore {
            dir: dir.to_path_buf(),
            pack_bytes,
            writer: Mutex::new(None),
            next_id: Mutex::new(next),
            readers: Mutex::new(HashMap::new()),
            phase: RwLock::new(()),
        })
    }

    /// Taken by a writer across "append blocks" and "index them".
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.phase.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken by GC for a whole collection.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.phase.write().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: u64) -> PathBuf {
        pack_path(&self.dir, id)
    }

    /// Appends `blocks` and makes them durable (fsync) before returning their locations.
    pub fn append(&self, blocks: &[(BlockId, &[u8])]) -> io::Result<Vec<Location>> {
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut locations = Vec::with_capacity(blocks.len());
        // Records for the current pack, written with one vectored write: no copy of the data.
        let mut pending: Vec<([u8; HEADER_LEN as usize], &[u8])> = Vec::with_capacity(blocks.len());
        let mut pending_bytes = 0u64;
        for (id, data) in blocks {
            let record = HEADER_LEN + data.len() as u64;
            let full = guard.as_ref().is_some_and(|w| {
                let used = w.len + pending_bytes;
                used > 0 && used + record > self.pack_bytes
            });
            if full || guard.is_none() {
                if let Some(w) = guard.as_mut() {
                    w.write(&pending, pending_bytes)?;
                    w.file.sync_data()?;
                    pending.clear();
                    pending_bytes = 0;
                }
                *guard = Some(self.start_pack()?);
            }
            let w = guard.as_ref().expect("a writer was just ensured");
            let mut header = [0u8; HEADER_LEN as usize];
            header[..4].copy_from_slice(RECORD_MAGIC);
            header[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
            header[8..].copy_from_slice(&id.0);
            locations.push(Location {
                pack: w.id,
                offset: w.len + pending_bytes + HEADER_LEN,
                len: data.len() as u32,
            });
            pending.push((header, data));
            pending_bytes += record;
        }
        if let Some(w) = guard.as_mut() {
            w.write(&pending, pending_bytes)?;
            w.file.sync_data()?;
        }
        Ok(locations)
    }

    fn start_pack(&self) -> io::Result<Writer> {
        let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        *next += 1;
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(self.path(id))?;
        // The new file's directory entry must be durable before any index row names the pack.
        File::open(&self.dir)?.sync_all()?;
        Ok(Writer { id, file, len: 0 })
    }

    /// Closes the open pack so GC may judge it; the next append starts a new pack. Call only
    /// under [`PackStore::exclusive`], when no writer is between "append" and "index".
    pub fn seal(&self) {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Reads a block's bytes into `buf` (which must be `loc.len` long).
    pub fn read(&self, loc: Location, buf: &mut [u8]) -> io::Result<()> {
        let file = self.reader(loc.pack)?;
        file.read_exact_at(buf, loc.offset)
    }

    fn reader(&self, id: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = readers.get(&id) {
            return Ok(f.clone());
        }
        // Bound the open descriptors: a large store has tens of thousands of packs. Readers
        // holding an Arc keep their file open; the rest are reopened on demand.
        if readers.len() >= MAX_OPEN_PACKS {
            readers.clear();
        }
        let f = Arc::new(File::open(self.path(id))?);
        readers.insert(id, f.clone());
        Ok(f)
    }

    /// Every pack with its size in bytes.
    pub fn packs(&self) -> io::Result<Vec<(u64, u64)>> {
        list_packs(&self.dir)
    }

    /// Checks the newest pack (the one a crash could have torn) and returns, if its tail is torn
    /// or corrupt, the pack id, the end of its good prefix and its size. Nothing is changed:
    /// the tail is never appended to and never indexed, and GC reclaims it with the pack.
    pub fn torn_tail(&self) -> io::Result<Option<(u64, u64, u64)>> {
        let Some(&(id, size)) = self.packs()?.last() else {
            return Ok(None);
        };
        let (_, good) = scan_pack(&self.path(id))?;
        Ok((good < size).then_some((id, good, size)))
    }

    /// Deletes a pack file (GC, once no index row points into it).
    pub fn remove(&self, id: u64) -> io::Result<()> {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        fs::remove_file(self.path(id))?;
        File::open(&self.dir)?.sync_all()
    }
}

fn pack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.pack"))
}

fn list_packs(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut packs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".pack")) else {
            continue;
        };
        if let Ok(id) = u64::from_str_radix(stem, 16) {
            packs.push((id, entry.metadata()?.len()));
        }
    }
    packs.sort_unstable();
    Ok(packs)
}

/// Walks a pack's records, verifying each block's hash, and returns the valid ones up to the
/// first torn or corrupt record (whose offset is returned as the end of the good prefix).
pub fn scan_pack(path: &Path) -> io::Result<(Vec<(BlockId, Location)>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a pack file name"))?;
    let mut found = Vec::new();
    let mut pos = 0u64;
    let mut header = [0u8; HEADER_LEN as usize];
    let mut data = Vec::new();
    while pos + HEADER_LEN <= size {
        file.read_exact_at(&mut header, pos)?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as u64;
        if &header[..4] != RECORD_MAGIC
            || len == 0
            || len > kagami_images::BLOCK_SIZE as u64
            || pos + HEADER_LEN + len > size
        {
            break;
        }
        data.resize(len as usize, 0);
        file.read_exact_at(&mut data, pos + HEADER_LEN)?;
        let mut block = [0u8; 32];
        block.copy_from_slice(&header[8..40]);
        if BlockId::hash(&data).0 != block {
            break;
        }
        found.push((
            BlockId(block),
            Location {
                pack: id,
                offset: pos + HEADER_LEN,
                len: len as u32,
            },
        ));
        pos += HEADER_LEN + len;
    }
    Ok((found, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_roll_over_and_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackStore::open(dir.path(), 1 << 20).expect("open");
        let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i + 1; 65536]).collect();
        let batch: Vec<(BlockId, &[u8])> = blocks
            .iter()
            .map(|b| (BlockId::hash(b), b.as_slice()))
            .collect();
        let locs = store.append(&batch).expect("append");
        // 40 blocks of 64 KiB into 1 MiB packs: three packs, none over the limit.
        let packs = store.packs().expect("list");
        assert_eq!(packs.len(), 3);
        assert!(packs.iter().all(|(_, size)| *size <= 1 << 20));
        for ((id, data), loc) in batch.iter().zip(&locs) {
            let mut buf = vec![0u8; loc.len as usize];
            store.read(*loc, &mut buf).expect("read");
            assert_eq!(&buf, data);
            assert_eq!(BlockId::hash(&buf), *id);
        }
        // Tear the last pack in the middle of its last record: the scan keeps the good prefix.
        let (last, size) = *packs.last().expect("a pack");
        let path = pack_path(dir.path(), last);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open pack");
        f.set_len(size - 100).expect("truncate");
        let (good, end) = scan_pack(&path).expect("scan");
        let in_last = locs.iter().filter(|l| l.pack == last).count();
        assert_eq!(good.len(), in_last - 1);
        assert_eq!(end, (in_last as u64 - 1) * (HEADER_LEN + 65536));
        // A reopened store never appends to an existing pack.
        let again = PackStore::open(dir.path(), 1 << 20).expect("reopen");
        let loc = again.append(&batch[..1]).expect("append");
        assert_eq!(loc[0].pack, last + 1);
    }
}
