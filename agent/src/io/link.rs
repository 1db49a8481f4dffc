//! The pipeline between an async coordinator and the I/O thread: a pool of aligned 4 MiB
//! segment buffers (their number bounds the agent's memory), the channels to and from the
//! engine's thread, and `scan` — pipelined direct reads of a disk's segments, hashed on the
//! blocking pool — which the differential write, its verification and capture share.

use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use kagami_images::BlockId;
use kagami_images::manifest::{BLOCK_SIZE, SEGMENT_SIZE};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::{AlignedBuf, Files, Finished, Job, Op, OpKind};

/// The coordinator's side of the I/O thread: jobs go in, finished jobs come back, and the
/// pool of aligned segment buffers bounds how many are out.
pub struct Link {
    pub jobs: mpsc::Sender<Job>,
    pub done: mpsc::UnboundedReceiver<Finished>,
    pub pool: Pool,
}

/// Starts the I/O thread for `files` with `buffers` segment buffers.
pub fn start_io(
    files: Arc<Files>,
    engine: super::Choice,
    queue_depth: usize,
    threads: usize,
    buffers: usize,
) -> anyhow::Result<(
    Link,
    &'static str,
    std::thread::JoinHandle<std::io::Result<()>>,
)> {
    let engine = super::engine(files, engine, queue_depth, threads)?;
    let name = engine.name();
    let (jobs_tx, jobs_rx) = mpsc::channel(queue_depth.max(4));
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("kagami-io".into())
        .spawn(move || super::serve(engine, jobs_rx, done_tx))?;
    let link = Link {
        jobs: jobs_tx,
        done: done_rx,
        pool: Pool::new(buffers),
    };
    Ok((link, name, thread))
}

/// Reusable aligned segment buffers; their number bounds the agent's memory.
#[derive(Clone)]
pub struct Pool {
    free: Arc<Mutex<Vec<AlignedBuf>>>,
    available: Arc<Semaphore>,
}

impl Pool {
    pub fn new(n: usize) -> Self {
        Pool {
            free: Arc::new(Mutex::new(
                (0..n).map(|_| AlignedBuf::new(SEGMENT_SIZE)).collect(),
            )),
            available: Arc::new(Semaphore::new(n)),
        }
    }

    pub async fn take(&self) -> anyhow::Result<AlignedBuf> {
        self.available.acquire().await?.forget();
        self.pop()
    }

    pub fn try_take(&self) -> Option<AlignedBuf> {
        self.available.try_acquire().ok()?.forget();
        self.pop().ok()
    }

    fn pop(&self) -> anyhow::Result<AlignedBuf> {
        self.free
            .lock()
            .map_err(|_| anyhow!("buffer pool poisoned"))?
            .pop()
            .ok_or_else(|| anyhow!("buffer pool empty"))
    }

    pub fn put(&self, buf: AlignedBuf) {
        if let Ok(mut free) = self.free.lock() {
            free.push(buf);
            self.available.add_permits(1);
        }
    }
}

/// Reads segments `indices` of a `size`-byte disk (direct reads, as many in flight as there
/// are buffers), hashes their blocks on the blocking pool, and calls `each` with every
/// segment's block ids (holes for zero blocks) and bytes, in completion order.
pub async fn scan(
    link: &mut Link,
    size: u64,
    indices: Vec<usize>,
    mut each: impl FnMut(usize, Vec<BlockId>, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut next = indices.into_iter().peekable();
    let mut reading = 0usize;
    let mut hashing: JoinSet<(usize, Vec<BlockId>, AlignedBuf, usize)> = JoinSet::new();
    loop {
        while let Some(&index) = next.peek() {
            let Some(buf) = link.pool.try_take() else {
                break;
            };
            next.next();
            let start = index as u64 * SEGMENT_SIZE as u64;
            let len = (size - start).min(SEGMENT_SIZE as u64) as usize;
            let job = Job {
                tag: index as u64,
                buf: Some(buf),
                ops: vec![Op {
                    kind: OpKind::Read,
                    disk_offset: index as u64 * SEGMENT_SIZE as u64,
                    buf_offset: 0,
                    len,
                }],
            };
            link.jobs
                .send(job)
                .await
                .map_err(|_| anyhow!("the I/O thread stopped"))?;
            reading += 1;
        }
        if reading == 0 && hashing.is_empty() && next.peek().is_none() {
            return Ok(());
        }
        tokio::select! {
            finished = link.done.recv(), if reading > 0 => {
                let (job, result) = finished.ok_or_else(|| anyhow!("the I/O thread stopped"))?;
                reading -= 1;
                let index = job.tag as usize;
                result.with_context(|| format!(
                    "reading segment {index} (bytes {}…) of the disk",
                    index as u64 * SEGMENT_SIZE as u64
                ))?;
                let buf = job.buf.ok_or_else(|| anyhow!("a read came back without its buffer"))?;
                let len = job.ops.first().map_or(0, |op| op.len);
                hashing.spawn_blocking(move || {
                    let blocks: Vec<&[u8]> = buf.as_slice()[..len].chunks(BLOCK_SIZE).collect();
                    let ids = BlockId::of_many(&blocks);
                    (index, ids, buf, len)
                });
            }
            Some(hashed) = hashing.join_next(), if !hashing.is_empty() => {
                let (index, ids, buf, len) = hashed?;
                let outcome = each(index, ids, &buf.as_slice()[..len]);
                link.pool.put(buf);
                outcome?;
            }
        }
    }
}
