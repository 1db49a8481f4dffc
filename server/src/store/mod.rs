//! The block store: blocks appended to pack files of ~16 MiB under `<data_dir>/packs`.
//!
//! A pack is a run of *batches*, everything aligned to 4 KiB so packs are written with
//! `O_DIRECT` (no copy into the page cache: that copy was a quarter of the ingest CPU): a 4 KiB
//! batch header (`KGB2`, a count, then each block's id and length), then each block's bytes
//! padded to a multiple of 4 KiB. A batch is written and the pack fsynced *before* the caller
//! commits the index rows that point into it (see `catalog::blocks`), so the index never names
//! bytes that are not on disk: [`PackStore::append`] fsyncs before it returns; an ingest
//! writing many batches uses [`PackStore::append_unsynced`] and one [`PackStore::sync`] before
//! it indexes them all (a pack that fills up is fsynced as it is closed, so `sync` of the open
//! one covers every batch written before it). A failed fsync retires its pack and fails every
//! writer that had written and not yet indexed when it happened — conservatively, those whose
//! blocks were in the other lane's pack too ([`PackStore::unchanged_since`]): the kernel reports
//! a write-back error to one fsync only. After a crash the current pack may end in a torn or
//! unindexed batch; Kagami never appends to a pack it did not create in this run, so such a
//! tail is never referenced, counts as dead space, and goes when GC rewrites the pack. [`scan_pack`] walks a
//! pack's batches, verifying every block, and stops at the first torn one.
//!
//! Where the filesystem refuses `O_DIRECT` (tmpfs), packs are written through the page cache;
//! the layout is the same.
//!
//! The S3 backend (packs as objects) arrives with the scale-out work behind the same calls.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use parking_lot::{RawRwLock, RwLock, RwLockWriteGuard};

use kagami_images::BlockId;

const BATCH_MAGIC: &[u8; 4] = b"KGB2";
/// Alignment of every write, offset and length in a pack (O_DIRECT needs it).
const ALIGN: u64 = 4096;
/// Blocks per batch: the header (8 bytes + 36 per block) must fit in one 4 KiB sector.
const MAX_BATCH: usize = 100;
const ENTRY: usize = 36;

/// Packs open for writing at once. A run of blocks is split between them and written by two
/// threads, so the disk has two writes in flight: one O_DIRECT write at a time reached about
/// two thirds of what two reach on this VM's disk (`dd oflag=direct`, one stream or two), and
/// one file cannot take two at once (ext4 serializes direct writes that extend a file).
const LANES: usize = 2;
/// The smallest run of blocks [`PackStore::append_unsynced`] splits between the lanes.
const LANE_SPLIT: usize = 1 << 20;

/// Bytes a block of `len` takes in a pack.
fn padded(len: usize) -> u64 {
    (len as u64).next_multiple_of(ALIGN)
}
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
    /// The open pack of each lane (see [`LANES`]).
    writers: Mutex<[Option<Writer>; LANES]>,
    next_id: Mutex<u64>,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Held shared by writers from "append" until "indexed", exclusively by GC: GC never judges
    /// a pack whose new blocks are written but not yet in the index. Task-fair: a waiting GC
    /// holds back new writers.
    phase: Arc<RwLock<()>>,
    /// fsyncs of packs that failed, ever (see [`PackStore::unchanged_since`]).
    sync_failures: AtomicU64,
    /// Makes the next fsync fail, as a disk's write error would.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

/// A writer's hold on the store between "append" and "indexed" (see [`PackStore::writing`]);
/// it may move between threads.
pub type WriteGate = parking_lot::ArcRwLockReadGuard<RawRwLock, ()>;

#[derive(Debug)]
struct Writer {
    id: u64,
    path: PathBuf,
    file: File,
    /// Whether `file` was opened with O_DIRECT.
    direct: bool,
    len: u64,
    /// Reused for every batch (no fresh allocation, no page faults per write).
    buf: Vec<u8>,
}

/// The alignment of memory an `O_DIRECT` write is made from ([`ALIGN`]). Callers that fill
/// buffers the store writes (ingest's segments) start them there, so the store writes their
/// blocks from where they are ([`Writer::write_batch`]).
pub const MEMORY_ALIGN: usize = ALIGN as usize;

/// Where the first [`MEMORY_ALIGN`]-aligned byte of `buf` is: a buffer that many bytes longer
/// than what it must hold always has its aligned window there (0 if the platform declines).
pub fn aligned_start(buf: &[u8]) -> usize {
    buf.as_ptr().align_offset(MEMORY_ALIGN).min(MEMORY_ALIGN)
}

/// Whether `data` can go to an `O_DIRECT` write from where it is: aligned in memory and in
/// length.
fn in_place(data: &[u8]) -> bool {
    aligned_start(data) == 0 && data.len().is_multiple_of(MEMORY_ALIGN)
}

/// `pwritev` of all of `slices` at `offset`.
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [io::IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = rustix::io::pwritev(file, slices, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

impl Writer {
    /// Writes one batch at the end of the pack; returns where its blocks landed. Blocks that
    /// are aligned in memory and length (a segment from an aligned buffer: every 64 KiB block
    /// of it) are written from where they are, behind the header built here; others are copied
    /// into the writer's aligned buffer first.
    fn write_batch(&mut self, batch: &[(BlockId, &[u8])]) -> io::Result<Vec<Location>> {
        let bytes = ALIGN + batch.iter().map(|(_, d)| padded(d.len())).sum::<u64>();
        let from_place = self.direct && batch.iter().all(|(_, d)| in_place(d));
        let built = if from_place { ALIGN } else { bytes };
        let need = built as usize + MEMORY_ALIGN;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        // O_DIRECT wants the memory aligned too: the aligned window in the buffer.
        let start = aligned_start(&self.buf);
        let out = &mut self.buf[start..start + built as usize];
        out[..ALIGN as usize].fill(0);
        out[..4].copy_from_slice(BATCH_MAGIC);
        out[4..8].copy_from_slice(&(batch.len() as u32).to_le_bytes());
        let mut locations = Vec::with_capacity(batch.len());
        let mut at = ALIGN as usize;
        for (i, (id, data)) in batch.iter().enumerate() {
            let entry = 8 + i * ENTRY;
            out[entry..entry + 32].copy_from_slice(&id.0);
            out[entry + 32..entry + 36].copy_from_slice(&(data.len() as u32).to_le_bytes());
            let slot = padded(data.len()) as usize;
            if !from_place {
                out[at..at + data.len()].copy_from_slice(data);
                out[at + data.len()..at + slot].fill(0);
            }
            locations.push(Location {
                pack: self.id,
                offset: self.len + at as u64,
                len: data.len() as u32,
            });
            at += slot;
        }
        // What was built (the header, or the whole batch), then the blocks written in place.
        let mut slices = vec![io::IoSlice::new(out)];
        if from_place {
            slices.extend(batch.iter().map(|(_, d)| io::IoSlice::new(d)));
        }
        let write = |file: &File| write_all_vectored_at(file, &mut slices.clone(), self.len);
        match write(&self.file) {
            // The filesystem took O_DIRECT at open but refuses the write: go through the page
            // cache from now on (same layout), and write this batch again.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(pack = %self.path.display(), "O_DIRECT writes refused; using the page cache");
                let file = OpenOptions::new().write(true).open(&self.path)?;
                write(&file)?;
                self.file = file;
                self.direct = false;
            }
            other => other?,
        }
        self.len += bytes;
        Ok(locations)
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
            writers: Mutex::new([const { None }; LANES]),
            next_id: Mutex::new(next),
            readers: Mutex::new(HashMap::new()),
            phase: Arc::new(RwLock::new(())),
            sync_failures: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Taken by a writer across "append blocks" and "index them" (blocks while GC runs).
    pub fn writing(&self) -> WriteGate {
        self.phase.read_arc()
    }

    /// Whether GC could take the store now (no writer holds it).
    #[cfg(test)]
    pub fn gc_could_run(&self) -> bool {
        self.phase.try_write().is_some()
    }

    /// Taken by GC for a whole collection.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.phase.write()
    }

    fn path(&self, id: u64) -> PathBuf {
        pack_path(&self.dir, id)
    }

    /// Appends `blocks` and makes them durable (fsync) before returning their locations.
    pub fn append(&self, blocks: &[(BlockId, &[u8])]) -> io::Result<Vec<Location>> {
        let failures = self.sync_failures();
        let locations = self.append_unsynced(blocks)?;
        self.sync()?;
        self.unchanged_since(failures)?;
        Ok(locations)
    }

    /// Makes every block appended so far durable: fsyncs the open packs (full ones were
    /// fsynced when they were closed). A writer must then check [`PackStore::unchanged_since`]
    /// before it indexes what it wrote.
    pub fn sync(&self) -> io::Result<()> {
        let mut lanes = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let mut result = Ok(());
        for lane in lanes.iter_mut() {
            result = result.and(self.sync_lane(lane));
        }
        result
    }

    /// fsyncs a lane's open pack. One that fails is retired (nothing more is written to it)
    /// and counted: the kernel reports a write-back error to one fsync only, so another
    /// writer whose blocks sat in the same pack would see its own fsync succeed.
    fn sync_lane(&self, lane: &mut Option<Writer>) -> io::Result<()> {
        let Some(w) = lane.as_ref() else {
            return Ok(());
        };
        #[cfg(test)]
        let synced = if self.fail_next_sync.swap(false, Ordering::Relaxed) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            w.file.sync_data()
        };
        #[cfg(not(test))]
        let synced = w.file.sync_data();
        if let Err(e) = synced {
            tracing::error!(pack = %w.path.display(), "fsync of a pack failed: {e}");
            *lane = None;
            self.sync_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    /// Failed pack fsyncs so far: a writer notes it before its first write.
    pub fn sync_failures(&self) -> u64 {
        self.sync_failures.load(Ordering::Relaxed)
    }

    /// Fails if any pack fsync failed since the writer noted `failures`: its blocks may be
    /// lost even though its own fsync succeeded (the error went to another), so it must not
    /// index them. Conservative: a failure in another pack fails it too.
    pub fn unchanged_since(&self, failures: u64) -> io::Result<()> {
        if self.sync_failures() != failures {
            return Err(io::Error::other(
                "a write to the block store failed while these blocks were on their way to disk; \
                 nothing of them is kept (check the disk, then try again)",
            ));
        }
        Ok(())
    }

    /// Makes the next pack fsync fail (a disk's write error, for tests).
    #[cfg(test)]
    pub fn fail_next_sync(&self) {
        self.fail_next_sync.store(true, Ordering::Relaxed);
    }

    /// Appends `blocks` without waiting for the disk; they are durable once [`PackStore::sync`]
    /// returns (call it before indexing them). A run of at least [`LANE_SPLIT`] bytes is cut in
    /// two, written to both lanes at once.
    pub fn append_unsynced(&self, blocks: &[(BlockId, &[u8])]) -> io::Result<Vec<Location>> {
        let mut lanes = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let [first, second] = &mut *lanes;
        let bytes: usize = blocks.iter().map(|(_, d)| d.len()).sum();
        if bytes < LANE_SPLIT || blocks.len() < 2 {
            return self.append_to(0, first, blocks);
        }
        let (front, back) = blocks.split_at(blocks.len() / 2);
        let (mut front, back) = std::thread::scope(|s| {
            let back = s.spawn(|| self.append_to(1, second, back));
            let front = self.append_to(0, first, front);
            (
                front,
                back.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            )
        });
        if let Ok(locations) = &mut front {
            locations.extend(back?);
        }
        front
    }

    /// Appends `blocks` to lane `which`, whose open pack is `lane`, starting packs as they fill.
    fn append_to(
        &self,
        which: usize,
        lane: &mut Option<Writer>,
        blocks: &[(BlockId, &[u8])],
    ) -> io::Result<Vec<Location>> {
        let mut locations = Vec::with_capacity(blocks.len());
        let mut next = 0;
        while next < blocks.len() {
            let w = match lane.as_mut() {
                Some(w) => w,
                None => lane.insert(self.start_pack(which)?),
            };
            // As many of the next blocks as fit in this pack (at least one in an empty pack).
            let (mut n, mut bytes) = (0, ALIGN);
            while next + n < blocks.len() && n < MAX_BATCH {
                let more = padded(blocks[next + n].1.len());
                if w.len + bytes + more > self.pack_bytes && (w.len > 0 || n > 0) {
                    break;
                }
                bytes += more;
                n += 1;
            }
            if n == 0 {
                // This pack is full: make it durable and start the next.
                self.sync_lane(lane)?;
                *lane = None;
                continue;
            }
            locations.extend(w.write_batch(&blocks[next..next + n])?);
            next += n;
        }
        Ok(locations)
    }

    /// A new pack for lane `which`. Each lane's packs have ids of their own residue (`id %
    /// LANES == which`), so each lane's newest pack — the one a crash may have torn — is known
    /// by its id alone ([`PackStore::torn_tails`]), however many packs the other lane filled
    /// since; the ids skipped are never used.
    fn start_pack(&self, which: usize) -> io::Result<Writer> {
        let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        let lanes = LANES as u64;
        let id = *next + (which as u64 + lanes - *next % lanes) % lanes;
        *next = id + 1;
        let path = self.path(id);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        // The new file's directory entry must be durable before any index row names the pack.
        File::open(&self.dir)?.sync_all()?;
        // Write around the page cache where the filesystem allows it.
        let (file, direct) = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(direct) => (direct, true),
            Err(_) => (file, false),
        };
        Ok(Writer {
            id,
            path,
            file,
            direct,
            len: 0,
            buf: Vec::new(),
        })
    }

    /// Closes the open pack so GC may judge it; the next append starts a new pack. Call only
    /// under [`PackStore::exclusive`], when no writer is between "append" and "index".
    pub fn seal(&self) {
        *self.writers.lock().unwrap_or_else(|p| p.into_inner()) = [const { None }; LANES];
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

    /// Checks each lane's newest pack (those a crash could have torn; see
    /// [`PackStore::start_pack`]) and returns, for each whose tail is torn or corrupt, the pack
    /// id, the end of its good prefix and its size. Nothing is changed: the tail is never
    /// appended to and never indexed, and GC reclaims it with the pack. A diagnostic only: it
    /// can miss a torn pack in a store written before packs took their lane's ids, or one
    /// retired after a failed fsync (nothing of which was indexed either).
    pub fn torn_tails(&self) -> io::Result<Vec<(u64, u64, u64)>> {
        let packs = self.packs()?;
        let mut newest = [None; LANES];
        for &(id, size) in &packs {
            newest[(id % LANES as u64) as usize] = Some((id, size));
        }
        let mut torn = Vec::new();
        for (id, size) in newest.into_iter().flatten() {
            let (_, good) = scan_pack(&self.path(id))?;
            if good < size {
                torn.push((id, good, size));
            }
        }
        Ok(torn)
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

/// Walks a pack's batches, verifying each block's hash, and returns the valid blocks up to the
/// first torn or corrupt one, with the offset where the good prefix ends.
pub fn scan_pack(path: &Path) -> io::Result<(Vec<(BlockId, Location)>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a pack file name"))?;
    let mut found = Vec::new();
    let (mut pos, mut good) = (0u64, 0u64);
    let mut header = [0u8; ALIGN as usize];
    let mut data = Vec::new();
    'batches: while pos + ALIGN <= size {
        file.read_exact_at(&mut header, pos)?;
        let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if &header[..4] != BATCH_MAGIC || count == 0 || count > MAX_BATCH {
            break;
        }
        let mut at = pos + ALIGN;
        for i in 0..count {
            let entry = &header[8 + i * ENTRY..8 + (i + 1) * ENTRY];
            let len = u32::from_le_bytes([entry[32], entry[33], entry[34], entry[35]]) as usize;
            if len == 0 || len > kagami_images::BLOCK_SIZE || at + len as u64 > size {
                break 'batches;
            }
            data.resize(len, 0);
            file.read_exact_at(&mut data, at)?;
            let mut block = [0u8; 32];
            block.copy_from_slice(&entry[..32]);
            if BlockId::hash(&data).0 != block {
                break 'batches;
            }
            found.push((
                BlockId(block),
                Location {
                    pack: id,
                    offset: at,
                    len: len as u32,
                },
            ));
            at += padded(len);
            good = at;
        }
        pos = at;
    }
    Ok((found, good))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel tells one fsync of a write-back error; a second writer with blocks in the
    /// same pack learns of it from the store, never indexes them, and the pack takes no more.
    #[test]
    fn a_failed_fsync_fails_every_writer_whose_blocks_were_not_yet_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackStore::open(dir.path(), 16 << 20).expect("open");
        let data = [vec![1u8; 65536], vec![2u8; 65536]];
        let block = |i: usize| [(BlockId::hash(&data[i]), data[i].as_slice())];
        let (first, second) = (store.sync_failures(), store.sync_failures());
        let a = store.append_unsynced(&block(0)).expect("first writer");
        let _ = store.append_unsynced(&block(1)).expect("second writer");
        store.fail_next_sync();
        assert!(store.sync().is_err(), "the first writer's fsync fails");
        assert!(store.unchanged_since(first).is_err());
        // The second writer's own fsync succeeds, as the kernel's would: the store still says no.
        store.sync().expect("nothing left to fsync");
        assert!(store.unchanged_since(second).is_err());
        // What comes after goes into a new pack and is kept.
        let after = store.sync_failures();
        let b = store.append(&block(0)).expect("a new pack");
        assert_ne!(b[0].pack, a[0].pack);
        store.unchanged_since(after).expect("no failure since");
        // `append` checks for itself.
        store.fail_next_sync();
        assert!(store.append(&block(1)).is_err());
    }

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
        // 40 blocks of 64 KiB, 20 to each lane, into 1 MiB packs (a 4 KiB header + 15 blocks
        // each): two packs per lane, none over the limit, every block 4 KiB-aligned.
        let packs = store.packs().expect("list");
        assert_eq!(packs.len(), 4);
        // (Which lane starts its pack first, and so gets the lower id, is a race.)
        assert_ne!(locs[20].pack, locs[0].pack);
        assert!(packs.iter().all(|(_, size)| *size <= 1 << 20));
        assert!(locs.iter().all(|l| l.offset % ALIGN == 0));
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
        assert_eq!(end, ALIGN + (in_last as u64 - 1) * 65536);
        assert_eq!(store.torn_tails().expect("scan"), [(last, end, size - 100)]);
        // Short blocks are padded, and read back exactly.
        let short = [vec![9u8; 100], vec![8u8; 5000]];
        let pairs: Vec<(BlockId, &[u8])> = short
            .iter()
            .map(|b| (BlockId::hash(b), b.as_slice()))
            .collect();
        let locs = store.append(&pairs).expect("append short");
        for ((_, data), loc) in pairs.iter().zip(&locs) {
            let mut buf = vec![0u8; loc.len as usize];
            store.read(*loc, &mut buf).expect("read");
            assert_eq!(&buf[..], *data);
        }
        // A reopened store never appends to an existing pack.
        let again = PackStore::open(dir.path(), 1 << 20).expect("reopen");
        let loc = again.append(&batch[..1]).expect("append");
        assert!(loc[0].pack > last);
    }

    /// Blocks aligned in memory go to the disk from where they are, behind a header built
    /// apart; an odd-length block is copied and padded. Both read back and scan whole.
    #[test]
    fn aligned_blocks_are_written_from_where_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackStore::open(dir.path(), 16 << 20).expect("open");
        let mut raw = vec![0u8; 8 * 65536 + MEMORY_ALIGN];
        let at = aligned_start(&raw);
        for (i, b) in raw[at..at + 8 * 65536].iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ 0x5a;
        }
        let odd = vec![7u8; 1000];
        let mut batch: Vec<(BlockId, &[u8])> = raw[at..at + 8 * 65536]
            .chunks(65536)
            .map(|b| (BlockId::hash(b), b))
            .collect();
        assert!(batch.iter().all(|(_, d)| in_place(d)));
        let mut locs = store.append(&batch).expect("append in place");
        let direct = store.writers.lock().expect("lanes")[0]
            .as_ref()
            .map(|w| w.direct);
        assert_eq!(
            direct,
            Some(true),
            "O_DIRECT refused here (tmpfs?): nothing written in place"
        );
        batch.push((BlockId::hash(&odd), &odd));
        locs.extend(store.append(&batch[8..]).expect("append copied"));
        for ((id, data), loc) in batch.iter().zip(&locs) {
            let mut buf = vec![0u8; loc.len as usize];
            store.read(*loc, &mut buf).expect("read");
            assert_eq!(&buf[..], *data);
            assert_eq!(BlockId::hash(&buf), *id);
        }
        let (id, size) = store.packs().expect("list")[0];
        let (found, good) = scan_pack(&pack_path(dir.path(), id)).expect("scan");
        assert_eq!((found.len(), good), (9, size));
    }

    /// Small writes go to one lane only, which fills pack after pack; the other lane's open
    /// pack, older than all of them, is still checked for a torn tail.
    #[test]
    fn each_lane_newest_pack_is_checked_for_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackStore::open(dir.path(), 1 << 20).expect("open");
        let blocks: Vec<Vec<u8>> = (0..60u8).map(|i| vec![i + 1; 65536]).collect();
        let batch: Vec<(BlockId, &[u8])> = blocks
            .iter()
            .map(|b| (BlockId::hash(b), b.as_slice()))
            .collect();
        // 1 MiB, split between the lanes: eight blocks each.
        let split = store.append(&batch[..16]).expect("append");
        let idle = split[15].pack;
        assert_ne!(split[0].pack, idle);
        // One block at a time: lane 0 alone, 44 blocks, 15 to a pack.
        for one in batch[16..].chunks(1) {
            store.append(one).expect("append");
        }
        let packs = store.packs().expect("list");
        assert!(packs.iter().filter(|(id, _)| *id > idle).count() >= 3);
        let (_, size) = *packs
            .iter()
            .find(|(id, _)| *id == idle)
            .expect("lane 1's pack");
        let f = OpenOptions::new()
            .write(true)
            .open(pack_path(dir.path(), idle))
            .expect("open pack");
        f.set_len(size - 100).expect("truncate");
        let torn = store.torn_tails().expect("scan");
        assert_eq!(torn, [(idle, ALIGN + 7 * 65536, size - 100)]);
    }
}
