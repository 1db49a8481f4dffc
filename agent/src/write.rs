//! `kagami-agent write`: puts an image onto a disk.
//!
//! 1. Fetch the manifest (its digest checked against the server's) and open the disk (safety
//!    checks, size at least the image's).
//! 2. Plan, per 4 MiB segment, which blocks to fetch and which to zero. Full mode: every data
//!    block, every hole zeroed (or skipped with `--holes skip` on a disk known to be zeroed).
//!    Differential mode: read and hash the disk's copy of every data segment first (pipelined
//!    direct reads, hashing on every core) and keep only the blocks that differ; hole segments
//!    are discarded when the disk can do that cheaply and compared like the rest otherwise.
//! 3. Fetch segments (`--jobs` requests in flight, asking only for the planned blocks), verify
//!    every block's sha256 against the manifest before it is copied into an aligned buffer, and
//!    hand the buffer to the I/O engine (io_uring, `O_DIRECT`). A fetch that fails for a
//!    network or server reason is retried with backoff; segments already written are never
//!    fetched again, so a restarted server costs only what was in flight.
//! 4. Flush, then with `--verify` read back every segment touched and compare it with the
//!    manifest.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use kagami_images::manifest::BlockRef;
use kagami_images::manifest::{BLOCK_SIZE, SEGMENT_SIZE, blocks_in_segment};
use kagami_images::{BlockId, Manifest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{Backoff, Client, FetchError, next_chunk};
use crate::disk::Target;
use crate::io::link::{Link, Pool, scan, start_io};
use crate::io::{self, AlignedBuf, Files, Job, Op, OpKind};
use crate::progress::{Counters, Phase, Progress};

/// How the disk's current content is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Write every data block and zero every hole.
    Full,
    /// Read and hash the disk first; fetch and write only the blocks that differ.
    Differential,
}

/// What to do with the image's holes (all-zero blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Holes {
    /// Make them read back as zeroes: discard/punch where the disk guarantees zeroes,
    /// otherwise zero-out or write zeroes.
    Zero,
    /// Leave them alone: only for a disk known to be zeroed already.
    Skip,
}

#[derive(Debug)]
pub struct Options {
    pub server: String,
    pub token: String,
    pub image: String,
    pub disk: PathBuf,
    pub mode: Mode,
    pub holes: Holes,
    pub verify: bool,
    pub jobs: usize,
    pub queue_depth: usize,
    pub engine: io::Choice,
    pub force: bool,
    /// How long a failing fetch is retried before the write gives up.
    pub patience: Duration,
    /// `/images` with a project token; `/agent/images` with a per-boot agent token.
    pub images_path: &'static str,
    /// Receives progress snapshots (a deployment reports them to the server).
    pub progress: Option<tokio::sync::watch::Sender<crate::progress::Snapshot>>,
}

/// What a write did, for the terminal and for scripts (`--json`).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub image: String,
    pub disk: PathBuf,
    pub digest: String,
    pub virtual_size: u64,
    pub mode: Mode,
    pub engine: &'static str,
    pub block_device: bool,
    pub direct_io: bool,
    #[serde(flatten)]
    pub counters: crate::progress::Totals,
    pub seconds: f64,
}

/// Tags of bufferless jobs that zero whole hole segments (segment jobs use their index).
const RANGE_TAG: u64 = 1 << 63;
/// Largest zeroing handed to the disk in one op.
const MAX_ZERO_RANGE: u64 = 256 << 20;

/// What to do in one segment: blocks to fetch and write, blocks to zero (bit `j` = block `j`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SegmentPlan {
    index: usize,
    fetch: u64,
    zero: u64,
}

struct Ctx {
    client: Client,
    image: String,
    manifest: Arc<Manifest>,
    files: Arc<Files>,
    counters: Arc<Counters>,
    patience: Duration,
    link: Link,
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let client = Client::new(&opts.server, &opts.token)?.images_at(opts.images_path);
    let counters = Arc::new(Counters::default());
    let mut backoff = Backoff::new(opts.patience);
    let manifest = loop {
        match client.manifest(&opts.image).await {
            Ok(m) => break m,
            Err(e) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                backoff.wait("fetching the manifest", e).await?;
            }
        }
    };
    let target = Target::open(&opts.disk, opts.force)?;
    if target.size < manifest.virtual_size() {
        bail!(
            "{} holds {} bytes; image {} needs {} — nothing was written",
            opts.disk.display(),
            target.size,
            opts.image,
            manifest.virtual_size()
        );
    }
    let direct_io = target.direct.is_some();
    let block_device = target.block_device;
    let files = Arc::new(Files::new(target.direct, target.buffered));
    let (link, engine_name, io_thread) = start_io(
        files.clone(),
        opts.engine,
        opts.queue_depth,
        opts.jobs.max(2),
        opts.jobs + 2,
    )?;
    tracing::info!(
        "writing image {} ({} bytes) to {} with {engine_name}{}",
        opts.image,
        manifest.virtual_size(),
        opts.disk.display(),
        if direct_io { ", O_DIRECT" } else { "" }
    );
    let manifest = Arc::new(manifest);
    let mut ctx = Ctx {
        client,
        image: opts.image.clone(),
        manifest: manifest.clone(),
        files: files.clone(),
        counters: counters.clone(),
        patience: opts.patience,
        link,
    };
    let progress = Progress::start(counters.clone(), opts.progress.clone());

    let (plans, ranges) = match opts.mode {
        Mode::Full => plan_full(&manifest, opts.holes),
        Mode::Differential => {
            progress.phase(Phase::Reading, scan_bytes(&manifest, opts.holes));
            plan_differential(&mut ctx, opts.holes).await?
        }
    };
    let to_write: u64 = plans
        .iter()
        .map(|p| planned_bytes(&manifest, p))
        .sum::<u64>()
        + ranges.iter().map(|r| r.1).sum::<u64>();
    progress.phase(Phase::Writing, to_write);
    write_all(&mut ctx, &plans, &ranges, opts.jobs).await?;
    let sync_files = files.clone();
    tokio::task::spawn_blocking(move || sync_files.sync())
        .await?
        .context("flushing the disk")?;

    if opts.verify {
        let mut touched: Vec<usize> = plans.iter().map(|p| p.index).collect();
        for &(offset, len) in &ranges {
            let first = (offset / SEGMENT_SIZE as u64) as usize;
            let end = (offset + len).div_ceil(SEGMENT_SIZE as u64) as usize;
            touched.extend(first..end);
        }
        touched.sort_unstable();
        touched.dedup();
        let bytes = touched.iter().map(|&i| segment_len(&manifest, i)).sum();
        progress.phase(Phase::Verifying, bytes);
        verify(&mut ctx, touched).await?;
    }
    progress.finish();
    drop(ctx);
    match io_thread.join() {
        Ok(r) => r.context("the I/O engine failed")?,
        Err(_) => bail!("the I/O thread panicked"),
    }
    Ok(Report {
        image: opts.image,
        disk: opts.disk,
        digest: format!("sha256:{}", manifest.digest()),
        virtual_size: manifest.virtual_size(),
        mode: opts.mode,
        engine: engine_name,
        block_device,
        direct_io,
        counters: counters.totals(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn segment_len(manifest: &Manifest, index: usize) -> u64 {
    let start = index as u64 * SEGMENT_SIZE as u64;
    (manifest.virtual_size() - start).min(SEGMENT_SIZE as u64)
}

fn block_len(manifest: &Manifest, index: usize, j: usize) -> usize {
    let offset = (index * SEGMENT_SIZE + j * BLOCK_SIZE) as u64;
    (manifest.virtual_size() - offset).min(BLOCK_SIZE as u64) as usize
}

fn planned_bytes(manifest: &Manifest, plan: &SegmentPlan) -> u64 {
    (0..blocks_in_segment(manifest.virtual_size(), plan.index))
        .filter(|j| (plan.fetch | plan.zero) & (1 << j) != 0)
        .map(|j| block_len(manifest, plan.index, j) as u64)
        .sum()
}

/// Every data block, and the holes unless skipped: whole hole segments as coalesced ranges.
fn plan_full(manifest: &Manifest, holes: Holes) -> (Vec<SegmentPlan>, Vec<(u64, u64)>) {
    let mut plans = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (index, segment) in manifest.segments().iter().enumerate() {
        if segment.is_hole() {
            if holes == Holes::Zero {
                add_range(
                    &mut ranges,
                    index as u64 * SEGMENT_SIZE as u64,
                    segment_len(manifest, index),
                );
            }
            continue;
        }
        let mut plan = SegmentPlan {
            index,
            fetch: 0,
            zero: 0,
        };
        for (j, id) in segment.blocks.iter().enumerate() {
            if !id.is_hole() {
                plan.fetch |= 1 << j;
            } else if holes == Holes::Zero {
                plan.zero |= 1 << j;
            }
        }
        plans.push(plan);
    }
    (plans, ranges)
}

fn add_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    match ranges.last_mut() {
        Some(last) if last.0 + last.1 == offset && last.1 + len <= MAX_ZERO_RANGE => last.1 += len,
        _ => ranges.push((offset, len)),
    }
}

/// Bytes a differential scan reads (data segments, and hole segments if zeroed).
fn scan_bytes(manifest: &Manifest, holes: Holes) -> u64 {
    manifest
        .segments()
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_hole() || holes == Holes::Zero)
        .map(|(i, _)| segment_len(manifest, i))
        .sum()
}

/// Reads and hashes the disk where the image has data, and plans only the differences.
/// Hole segments are discarded outright when the disk discards cheaply (a punched hole or an
/// unmap that reads back as zeroes), and otherwise read and compared like the rest.
async fn plan_differential(
    ctx: &mut Ctx,
    holes: Holes,
) -> anyhow::Result<(Vec<SegmentPlan>, Vec<(u64, u64)>)> {
    let manifest = ctx.manifest.clone();
    let mut to_scan = Vec::new();
    let mut hole_segments = Vec::new();
    for (index, segment) in manifest.segments().iter().enumerate() {
        if !segment.is_hole() {
            to_scan.push(index);
        } else if holes == Holes::Zero {
            hole_segments.push(index);
        }
    }
    let mut ranges = Vec::new();
    if let Some(&first) = hole_segments.first() {
        let files = ctx.files.clone();
        let (offset, len) = (
            first as u64 * SEGMENT_SIZE as u64,
            segment_len(&manifest, first),
        );
        let cheap = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let zeroes = AlignedBuf::new(io::ZEROES_CHUNK);
            io::zero_range(&files, offset, len, &zeroes)?;
            Ok(files.zero_method() == io::ZeroStep::PunchHole)
        });
        if cheap.await?.context("discarding a hole segment")? {
            for &index in &hole_segments {
                add_range(
                    &mut ranges,
                    index as u64 * SEGMENT_SIZE as u64,
                    segment_len(&manifest, index),
                );
            }
            tracing::info!(
                "{} hole segments are discarded without reading (the disk discards to zeroes)",
                hole_segments.len()
            );
        } else {
            to_scan.extend(hole_segments);
            to_scan.sort_unstable();
        }
    }
    let mut plans = Vec::new();
    let counters = ctx.counters.clone();
    let size = manifest.virtual_size();
    scan(&mut ctx.link, size, to_scan, |index, found, _| {
        let want = manifest.segment_blocks(index);
        let mut plan = SegmentPlan {
            index,
            fetch: 0,
            zero: 0,
        };
        counters
            .scanned_bytes
            .fetch_add(segment_len(&manifest, index), Ordering::Relaxed);
        for (j, (w, have)) in want.zip(found).enumerate() {
            if w.id == have {
                counters
                    .unchanged_bytes
                    .fetch_add(w.len as u64, Ordering::Relaxed);
            } else if w.id.is_hole() {
                plan.zero |= 1 << j;
            } else {
                plan.fetch |= 1 << j;
            }
        }
        if plan.fetch | plan.zero != 0 {
            plans.push(plan);
        }
        Ok(())
    })
    .await?;
    plans.sort_unstable_by_key(|p| p.index);
    Ok((plans, ranges))
}

/// Reads back every segment in `indices` and checks each block against the manifest.
async fn verify(ctx: &mut Ctx, indices: Vec<usize>) -> anyhow::Result<()> {
    let manifest = ctx.manifest.clone();
    let counters = ctx.counters.clone();
    let mut bad = Vec::new();
    let size = manifest.virtual_size();
    scan(&mut ctx.link, size, indices, |index, found, _| {
        for (w, have) in manifest.segment_blocks(index).zip(found) {
            if w.id != have {
                bad.push((w.index, w.offset, w.id, have));
            }
        }
        counters
            .verified_bytes
            .fetch_add(segment_len(&manifest, index), Ordering::Relaxed);
        Ok(())
    })
    .await?;
    if let Some((index, offset, want, have)) = bad.iter().min_by_key(|b| b.0) {
        bail!(
            "verification failed: {} block(s) differ after the flush; the first is block \
             {index} (byte {offset}): the manifest says {want}, the disk holds {have}",
            bad.len()
        );
    }
    Ok(())
}

/// Zeroes `ranges`, then fetches, verifies and writes every planned segment.
async fn write_all(
    ctx: &mut Ctx,
    plans: &[SegmentPlan],
    ranges: &[(u64, u64)],
    jobs: usize,
) -> anyhow::Result<()> {
    let mut expected = 0usize;
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let job = Job {
            tag: RANGE_TAG | i as u64,
            buf: None,
            ops: vec![Op {
                kind: OpKind::Zero,
                disk_offset: offset,
                buf_offset: 0,
                len: len as usize,
            }],
        };
        ctx.link
            .jobs
            .send(job)
            .await
            .map_err(|_| anyhow!("the I/O thread stopped"))?;
        expected += 1;
    }
    let queue = Arc::new(Mutex::new(plans.iter().copied().collect::<VecDeque<_>>()));
    let mut fetchers = JoinSet::new();
    for _ in 0..jobs.max(1) {
        let fetcher = Fetcher {
            client: ctx.client.clone(),
            image: ctx.image.clone(),
            manifest: ctx.manifest.clone(),
            pool: ctx.link.pool.clone(),
            counters: ctx.counters.clone(),
            patience: ctx.patience,
            jobs: ctx.link.jobs.clone(),
        };
        let queue = queue.clone();
        fetchers.spawn(async move { fetcher.run(queue).await });
    }
    expected += plans.len();
    let mut finished = 0usize;
    while finished < expected {
        tokio::select! {
            joined = fetchers.join_next(), if !fetchers.is_empty() => {
                if let Some(outcome) = joined {
                    outcome??;
                }
            }
            done = ctx.link.done.recv() => {
                let (job, result) = done.ok_or_else(|| anyhow!("the I/O thread stopped"))?;
                let what = if job.tag & RANGE_TAG != 0 {
                    let op = job.ops.first().copied();
                    format!("zeroing bytes {}…", op.map_or(0, |o| o.disk_offset))
                } else {
                    format!("writing segment {}", job.tag)
                };
                result.with_context(|| format!("{what} of the disk"))?;
                for op in &job.ops {
                    let counter = match op.kind {
                        OpKind::Write => &ctx.counters.written_bytes,
                        _ => &ctx.counters.zeroed_bytes,
                    };
                    counter.fetch_add(op.len as u64, Ordering::Relaxed);
                }
                if let Some(buf) = job.buf {
                    ctx.link.pool.put(buf);
                }
                finished += 1;
            }
        }
    }
    Ok(())
}

/// One of the concurrent segment fetchers.
struct Fetcher {
    client: Client,
    image: String,
    manifest: Arc<Manifest>,
    pool: Pool,
    counters: Arc<Counters>,
    patience: Duration,
    jobs: mpsc::Sender<Job>,
}

/// Corrupt answers for one segment tolerated before the write stops.
const CORRUPT_ATTEMPTS: usize = 3;

impl Fetcher {
    async fn run(self, queue: Arc<Mutex<VecDeque<SegmentPlan>>>) -> anyhow::Result<()> {
        loop {
            let next = queue
                .lock()
                .map_err(|_| anyhow!("queue poisoned"))?
                .pop_front();
            let Some(plan) = next else { return Ok(()) };
            let job = if plan.fetch == 0 {
                Job {
                    tag: plan.index as u64,
                    buf: None,
                    ops: ops_for(&self.manifest, &plan),
                }
            } else {
                let buf = self.pool.take().await?;
                self.fetch(plan, buf).await?
            };
            self.jobs
                .send(job)
                .await
                .map_err(|_| anyhow!("the I/O thread stopped"))?;
        }
    }

    /// Fetches the planned blocks of one segment into `buf`, verified: network failures are
    /// retried with backoff, corrupt answers a few times, then the write stops.
    async fn fetch(&self, plan: SegmentPlan, mut buf: AlignedBuf) -> anyhow::Result<Job> {
        let what = format!("fetching segment {}", plan.index);
        let mut backoff = Backoff::new(self.patience);
        let mut corrupt = 0;
        loop {
            let failure = match self.receive(&plan, &mut buf).await {
                Ok(placer) => {
                    let (back, verdict) = tokio::task::spawn_blocking(move || {
                        let verdict = placer.verify(buf.as_slice());
                        (buf, verdict)
                    })
                    .await?;
                    buf = back;
                    match verdict {
                        Ok(blocks) => {
                            self.counters
                                .fetched_blocks
                                .fetch_add(blocks, Ordering::Relaxed);
                            return Ok(Job {
                                tag: plan.index as u64,
                                buf: Some(buf),
                                ops: ops_for(&self.manifest, &plan),
                            });
                        }
                        Err(e) => Attempt::Corrupt(e),
                    }
                }
                Err(failure) => failure,
            };
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            let outcome = match failure {
                Attempt::Fetch(e) => backoff.wait(&what, e).await,
                Attempt::Corrupt(e) => {
                    corrupt += 1;
                    if corrupt < CORRUPT_ATTEMPTS {
                        tracing::warn!("{what}: {e}; fetching it again");
                        Ok(())
                    } else {
                        Err(FetchError::Fatal(format!(
                            "{e} ({corrupt} times; nothing of it was written)"
                        )))
                    }
                }
            };
            if let Err(e) = outcome {
                self.pool.put(buf);
                return Err(e.into());
            }
        }
    }

    /// One attempt: streams the answer's frames into their places in `buf`.
    async fn receive(&self, plan: &SegmentPlan, buf: &mut AlignedBuf) -> Result<Placer, Attempt> {
        let mut response = self
            .client
            .segment(&self.image, plan.index, plan.fetch)
            .await
            .map_err(Attempt::Fetch)?;
        let mut placer = Placer::new(&self.manifest, plan);
        while let Some(chunk) = next_chunk(&mut response).await.map_err(Attempt::Fetch)? {
            self.counters
                .received_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            placer
                .feed(&chunk, buf.as_mut_slice())
                .map_err(Attempt::Corrupt)?;
        }
        placer.finish().map_err(Attempt::Corrupt)?;
        Ok(placer)
    }
}

/// How one attempt at a segment failed.
enum Attempt {
    /// The network or the server: retried with backoff.
    Fetch(FetchError),
    /// The answer is not what the manifest says: retried a few times.
    Corrupt(String),
}

/// Places the frames of a segment answer (`id | u32 length | bytes`, see
/// `kagami_images::wire`), as they arrive in pieces of any size, at their blocks' places in the
/// segment buffer — no copy of the answer is ever held. Each frame must be the next block
/// asked for, with its id and length; the bytes are checked afterwards, in place
/// ([`Placer::verify`]), before the buffer may go to the disk.
#[derive(Debug)]
struct Placer {
    /// Blocks asked for, in order: their index in the segment and where they lie.
    wanted: Vec<(usize, BlockRef)>,
    segment: usize,
    next: usize,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    at: usize,
    left: usize,
}

const FRAME_HEADER: usize = 36;

impl Placer {
    fn new(manifest: &Manifest, plan: &SegmentPlan) -> Self {
        Placer {
            wanted: manifest
                .segment_blocks(plan.index)
                .enumerate()
                .filter(|(j, b)| plan.fetch & (1 << j) != 0 && !b.id.is_hole())
                .collect(),
            segment: plan.index,
            next: 0,
            header: [0; FRAME_HEADER],
            header_len: 0,
            at: 0,
            left: 0,
        }
    }

    fn feed(&mut self, mut chunk: &[u8], out: &mut [u8]) -> Result<(), String> {
        while !chunk.is_empty() {
            if self.left > 0 {
                let n = self.left.min(chunk.len());
                out[self.at..self.at + n].copy_from_slice(&chunk[..n]);
                self.at += n;
                self.left -= n;
                chunk = &chunk[n..];
                if self.left == 0 {
                    self.next += 1;
                }
                continue;
            }
            let n = (FRAME_HEADER - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len < FRAME_HEADER {
                continue;
            }
            self.header_len = 0;
            let Some(&(j, block)) = self.wanted.get(self.next) else {
                return Err(format!(
                    "segment {} came back with more than the {} blocks asked for",
                    self.segment,
                    self.wanted.len()
                ));
            };
            let mut id = BlockId::HOLE;
            id.0.copy_from_slice(&self.header[..32]);
            let len = u32::from_le_bytes([
                self.header[32],
                self.header[33],
                self.header[34],
                self.header[35],
            ]) as usize;
            if id != block.id || len != block.len {
                return Err(format!(
                    "block {} (byte {}) came back as {id} ({len} bytes); the manifest says {} \
                     ({} bytes)",
                    block.index, block.offset, block.id, block.len
                ));
            }
            self.at = j * BLOCK_SIZE;
            self.left = len;
        }
        Ok(())
    }

    /// The answer ended: it must have carried every block asked for, whole.
    fn finish(&self) -> Result<(), String> {
        if self.next != self.wanted.len() || self.header_len != 0 || self.left != 0 {
            return Err(format!(
                "segment {} came back cut short: {} of {} blocks",
                self.segment,
                self.next,
                self.wanted.len()
            ));
        }
        Ok(())
    }

    /// Hashes every placed block in `out`; returns how many there are, or names the first
    /// whose bytes are not the manifest's.
    fn verify(&self, out: &[u8]) -> Result<u64, String> {
        let placed: Vec<&[u8]> = self
            .wanted
            .iter()
            .map(|&(j, block)| &out[j * BLOCK_SIZE..j * BLOCK_SIZE + block.len])
            .collect();
        for (&(_, block), actual) in self.wanted.iter().zip(BlockId::hash_many(&placed)) {
            if actual != block.id {
                return Err(format!(
                    "block {} (byte {}) came back corrupt: its bytes hash to {actual}; the \
                     manifest says {}",
                    block.index, block.offset, block.id
                ));
            }
        }
        Ok(self.wanted.len() as u64)
    }
}

/// The disk ops for a segment plan: one write per run of fetched blocks, one zeroing per run
/// of blocks to zero.
fn ops_for(manifest: &Manifest, plan: &SegmentPlan) -> Vec<Op> {
    let base = plan.index as u64 * SEGMENT_SIZE as u64;
    let count = blocks_in_segment(manifest.virtual_size(), plan.index);
    let mut ops: Vec<Op> = Vec::new();
    for j in 0..count {
        let kind = if plan.fetch & (1 << j) != 0 {
            OpKind::Write
        } else if plan.zero & (1 << j) != 0 {
            OpKind::Zero
        } else {
            continue;
        };
        let len = block_len(manifest, plan.index, j);
        let offset = j * BLOCK_SIZE;
        match ops.last_mut() {
            Some(last) if last.kind == kind && last.buf_offset + last.len == offset => {
                last.len += len;
            }
            _ => ops.push(Op {
                kind,
                disk_offset: base + offset as u64,
                buf_offset: offset,
                len,
            }),
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::split::split_bytes;

    fn disk() -> Vec<u8> {
        // Segment 0: data, hole, data, data, rest holes; segment 1 all holes; segment 2 a short
        // tail of data.
        let mut d = vec![0u8; 2 * SEGMENT_SIZE + BLOCK_SIZE + 100];
        for j in [0usize, 2, 3] {
            d[j * BLOCK_SIZE] = 1 + j as u8;
        }
        d[2 * SEGMENT_SIZE + 5] = 9;
        d[2 * SEGMENT_SIZE + BLOCK_SIZE + 50] = 7;
        d
    }

    #[test]
    fn full_plans_write_runs_and_zero_the_rest() {
        let m = split_bytes(&disk());
        let (plans, ranges) = plan_full(&m, Holes::Zero);
        assert_eq!(ranges, vec![(SEGMENT_SIZE as u64, SEGMENT_SIZE as u64)]);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].fetch, 0b1101);
        let ops = ops_for(&m, &plans[0]);
        assert_eq!(ops[0].kind, OpKind::Write);
        assert_eq!((ops[0].disk_offset, ops[0].len), (0, BLOCK_SIZE));
        assert_eq!(ops[1].kind, OpKind::Zero);
        assert_eq!(ops[2].kind, OpKind::Write);
        assert_eq!(
            (ops[2].buf_offset, ops[2].len),
            (2 * BLOCK_SIZE, 2 * BLOCK_SIZE)
        );
        assert_eq!(ops[3].kind, OpKind::Zero);
        assert_eq!(ops[3].len, 60 * BLOCK_SIZE, "blocks 4..64 zeroed in one op");
        let tail = ops_for(&m, &plans[1]);
        assert_eq!(tail.len(), 1);
        assert_eq!(
            tail[0].len,
            BLOCK_SIZE + 100,
            "the short last block is written as is"
        );
        let (_, skipped) = plan_full(&m, Holes::Skip);
        assert!(skipped.is_empty());
    }

    /// Feeds `body` in pieces of `piece` bytes; then finish and verify.
    fn place(
        m: &Manifest,
        plan: &SegmentPlan,
        body: &[u8],
        piece: usize,
        buf: &mut AlignedBuf,
    ) -> Result<u64, String> {
        let mut placer = Placer::new(m, plan);
        for chunk in body.chunks(piece) {
            placer.feed(chunk, buf.as_mut_slice())?;
        }
        placer.finish()?;
        placer.verify(buf.as_slice())
    }

    #[test]
    fn frames_arriving_in_any_pieces_land_in_place_and_anything_else_is_refused() {
        let data = disk();
        let m = split_bytes(&data);
        let (plans, _) = plan_full(&m, Holes::Zero);
        let plan = SegmentPlan {
            fetch: 0b1100,
            ..plans[0]
        };
        let block = |j: usize| &data[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE];
        let mut body = Vec::new();
        kagami_images::wire::encode_frame(&mut body, &BlockId::of(block(2)), block(2));
        kagami_images::wire::encode_frame(&mut body, &BlockId::of(block(3)), block(3));
        for piece in [1, 7, 36, 1000, body.len()] {
            let mut buf = AlignedBuf::new(SEGMENT_SIZE);
            assert_eq!(
                place(&m, &plan, &body, piece, &mut buf),
                Ok(2),
                "pieces of {piece}"
            );
            assert_eq!(
                &buf.as_slice()[2 * BLOCK_SIZE..4 * BLOCK_SIZE],
                &data[2 * BLOCK_SIZE..4 * BLOCK_SIZE]
            );
        }
        let mut buf = AlignedBuf::new(SEGMENT_SIZE);
        // Valid frames, but in the wrong order: refused.
        let mut swapped = Vec::new();
        kagami_images::wire::encode_frame(&mut swapped, &BlockId::of(block(3)), block(3));
        kagami_images::wire::encode_frame(&mut swapped, &BlockId::of(block(2)), block(2));
        let e = place(&m, &plan, &swapped, 4096, &mut buf).expect_err("order");
        assert!(e.starts_with("block 2 (byte 131072) came back as"), "{e}");
        // A flipped byte: refused by its hash, naming the block.
        let mut corrupt = body.clone();
        corrupt[40] ^= 1;
        let e = place(&m, &plan, &corrupt, 4096, &mut buf).expect_err("corrupt");
        assert!(
            e.starts_with("block 2 (byte 131072) came back corrupt"),
            "{e}"
        );
        // Cut short, or one frame too many.
        let e = place(&m, &plan, &body[..body.len() - 1], 4096, &mut buf).expect_err("short");
        assert!(e.contains("cut short: 1 of 2 blocks"), "{e}");
        let mut long = body.clone();
        kagami_images::wire::encode_frame(&mut long, &BlockId::of(block(3)), block(3));
        let e = place(&m, &plan, &long, 4096, &mut buf).expect_err("long");
        assert!(e.contains("more than the 2 blocks"), "{e}");
    }
}
