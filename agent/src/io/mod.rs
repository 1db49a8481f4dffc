//! Disk I/O for the agent: batches ("jobs") of reads, writes and zeroings against one target,
//! run by an engine that keeps many of them in flight.
//!
//! Two engines do the same work: [`uring::Uring`] (io_uring, the default) and [`Threads`]
//! (a pool of threads calling `pread`/`pwrite`/`fallocate`), chosen at run time when io_uring is
//! unavailable (an old kernel, a seccomp filter, `io_uring_disabled`). Both own a job's buffer
//! from `submit` until the job comes back from `reap`, so a buffer the kernel is using can never
//! be touched or freed by anyone else.
//!
//! Zeroing a range, in order of preference (the first the target accepts is kept for the run):
//! `fallocate(PUNCH_HOLE)` — a sparse file's hole, or on a block device a zero-out that unmaps
//! and is guaranteed to read back as zeroes; `fallocate(ZERO_RANGE)` — the kernel writes or
//! offloads zeroes; and last, writing zeroes ourselves.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use nix::fcntl::{FallocateFlags, fallocate};

pub mod link;
pub mod uring;

/// Alignment of buffers, offsets and lengths for `O_DIRECT` (a 4 KiB-sector disk's needs).
pub const ALIGN: usize = 4096;

/// A heap buffer whose usable part starts on an [`ALIGN`] boundary. Its memory never moves
/// while the buffer lives, wherever the value itself is moved.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// What an [`Op`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Disk → buffer.
    Read,
    /// Buffer → disk.
    Write,
    /// Make the disk range read back as zeroes (no buffer).
    Zero,
}

/// One transfer: `len` bytes at `disk_offset`, to or from `buf_offset` in the job's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub disk_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// A batch of ops sharing one buffer, tagged by its submitter (a segment index, typically).
#[derive(Debug)]
pub struct Job {
    pub tag: u64,
    pub buf: Option<AlignedBuf>,
    pub ops: Vec<Op>,
}

/// A job handed back by an engine, with the first error any of its ops met.
pub type Finished = (Job, io::Result<()>);

/// A running I/O engine.
pub trait Engine: Send {
    /// Starts every op of `job`. The engine owns the job until [`Engine::reap`] returns it.
    fn submit(&mut self, job: Job) -> io::Result<()>;
    /// Jobs that finished; with `wait`, blocks until at least one has (if any is in flight).
    fn reap(&mut self, wait: bool) -> io::Result<Vec<Finished>>;
    /// Jobs submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// A short name for logs ("io_uring", "threads").
    fn name(&self) -> &'static str;
}

/// The target's two descriptors: `direct` (`O_DIRECT`, when the file system allows it) for
/// aligned transfers, `buffered` for an unaligned tail (and everything, without `O_DIRECT`).
#[derive(Debug)]
pub struct Files {
    pub direct: Option<File>,
    pub buffered: File,
    zero: ZeroMethod,
}

impl Files {
    pub fn new(direct: Option<File>, buffered: File) -> Self {
        Files {
            direct,
            buffered,
            zero: ZeroMethod::default(),
        }
    }

    /// The descriptor for a transfer: `O_DIRECT` when offset, buffer position and length are
    /// all aligned (buffers themselves always are), the page cache otherwise.
    pub fn for_transfer(&self, disk_offset: u64, buf_offset: usize, len: usize) -> &File {
        let aligned = disk_offset.is_multiple_of(ALIGN as u64)
            && buf_offset.is_multiple_of(ALIGN)
            && len.is_multiple_of(ALIGN);
        match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.buffered,
        }
    }

    /// How zeroing is done now (it only ever steps down, see the module docs).
    pub fn zero_method(&self) -> ZeroStep {
        self.zero.get()
    }

    /// Records that `failed` is refused by this target; returns the next method to try.
    pub fn zero_refused(&self, failed: ZeroStep) -> ZeroStep {
        self.zero.step_down(failed)
    }

    /// Flushes everything written so far to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            direct.sync_data()?;
        }
        self.buffered.sync_data()
    }
}

/// A way of zeroing a range; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ZeroStep {
    PunchHole = 0,
    ZeroRange = 1,
    WriteZeroes = 2,
}

impl ZeroStep {
    pub fn flags(self) -> Option<FallocateFlags> {
        match self {
            ZeroStep::PunchHole => {
                Some(FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE)
            }
            ZeroStep::ZeroRange => {
                Some(FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE)
            }
            ZeroStep::WriteZeroes => None,
        }
    }

    /// Whether an error from this method means "not supported here" (so the next one is
    /// tried) rather than a real failure.
    pub fn is_refusal(errno: i32) -> bool {
        matches!(
            nix::errno::Errno::from_raw(errno),
            nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL | nix::errno::Errno::ENODEV
        )
    }
}

#[derive(Debug, Default)]
struct ZeroMethod(AtomicU8);

impl ZeroMethod {
    fn get(&self) -> ZeroStep {
        match self.0.load(Ordering::Relaxed) {
            0 => ZeroStep::PunchHole,
            1 => ZeroStep::ZeroRange,
            _ => ZeroStep::WriteZeroes,
        }
    }

    fn step_down(&self, failed: ZeroStep) -> ZeroStep {
        let next = (failed as u8 + 1).min(ZeroStep::WriteZeroes as u8);
        let now = self.0.fetch_max(next, Ordering::Relaxed).max(next);
        let step = self.get();
        if now == next {
            tracing::info!(
                "zeroing with {failed:?} is refused by the target; using {step:?} from now on"
            );
        }
        step
    }
}

/// Bytes of zeroes written at a time when the target cannot zero a range itself.
pub const ZEROES_CHUNK: usize = 1 << 20;

/// Which engine to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// io_uring, or the thread pool where the kernel refuses io_uring.
    Auto,
    /// io_uring only: fail where it is refused.
    IoUring,
    /// The thread pool with pread/pwrite (for comparison, or a kernel whose io_uring misbehaves).
    Threads,
}

/// Opens the engine for `files`: io_uring with `depth` ops in flight, or a pool of `threads`
/// threads — chosen, or (with `Auto`) taken when the kernel refuses io_uring, as the log says.
pub fn engine(
    files: Arc<Files>,
    choice: Choice,
    depth: usize,
    threads: usize,
) -> io::Result<Box<dyn Engine>> {
    if choice == Choice::Threads {
        return Ok(Box::new(Threads::new(files, threads)));
    }
    match uring::Uring::new(files.clone(), depth) {
        Ok(ring) => Ok(Box::new(ring)),
        Err(e) if choice == Choice::Auto => {
            tracing::warn!(
                "io_uring is unavailable ({e}); writing with {threads} threads and pwrite instead"
            );
            Ok(Box::new(Threads::new(files, threads)))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("io_uring is unavailable: {e}"),
        )),
    }
}

/// The fallback engine: `threads` workers, each running whole jobs with positioned syscalls.
#[derive(Debug)]
pub struct Threads {
    work: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Finished>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Threads {
    pub fn new(files: Arc<Files>, threads: usize) -> Self {
        let (work, queue) = mpsc::channel::<Job>();
        let (finished, done) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..threads.max(1))
            .map(|_| {
                let (queue, finished, files) = (queue.clone(), finished.clone(), files.clone());
                std::thread::spawn(move || {
                    let zeroes = AlignedBuf::new(ZEROES_CHUNK);
                    loop {
                        let next = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        let Ok(mut job) = next else { return };
                        let result = run_job(&files, &mut job, &zeroes);
                        if finished.send((job, result)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Threads {
            work: Some(work),
            done,
            workers,
            in_flight: 0,
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.work = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Engine for Threads {
    fn submit(&mut self, job: Job) -> io::Result<()> {
        let work = self
            .work
            .as_ref()
            .ok_or_else(|| io::Error::other("engine stopped"))?;
        work.send(job)
            .map_err(|_| io::Error::other("the I/O threads stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn reap(&mut self, wait: bool) -> io::Result<Vec<Finished>> {
        let mut out = Vec::new();
        if wait && self.in_flight > 0 {
            out.push(
                self.done
                    .recv()
                    .map_err(|_| io::Error::other("the I/O threads stopped"))?,
            );
        }
        out.extend(self.done.try_iter());
        self.in_flight -= out.len();
        Ok(out)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

/// Runs a job's ops one after the other with positioned syscalls.
fn run_job(files: &Files, job: &mut Job, zeroes: &AlignedBuf) -> io::Result<()> {
    for op in job.ops.clone() {
        let file = files.for_transfer(op.disk_offset, op.buf_offset, op.len);
        match op.kind {
            OpKind::Read => {
                let buf = buffer_mut(job, &op)?;
                file.read_exact_at(buf, op.disk_offset)?;
            }
            OpKind::Write => {
                let buf = buffer(job, &op)?;
                file.write_all_at(buf, op.disk_offset)?;
            }
            OpKind::Zero => zero_range(files, op.disk_offset, op.len as u64, zeroes)?,
        }
    }
    Ok(())
}

fn buffer<'a>(job: &'a Job, op: &Op) -> io::Result<&'a [u8]> {
    job.buf
        .as_ref()
        .and_then(|b| b.as_slice().get(op.buf_offset..op.buf_offset + op.len))
        .ok_or_else(|| io::Error::other("an op lies outside its job's buffer"))
}

fn buffer_mut<'a>(job: &'a mut Job, op: &Op) -> io::Result<&'a mut [u8]> {
    job.buf
        .as_mut()
        .and_then(|b| {
            b.as_mut_slice()
                .get_mut(op.buf_offset..op.buf_offset + op.len)
        })
        .ok_or_else(|| io::Error::other("an op lies outside its job's buffer"))
}

/// Zeroes a range synchronously, stepping down the methods as the target refuses them.
pub fn zero_range(files: &Files, offset: u64, len: u64, zeroes: &AlignedBuf) -> io::Result<()> {
    loop {
        let step = files.zero_method();
        let Some(flags) = step.flags() else { break };
        let fd = files.buffered.as_fd();
        match fallocate(fd, flags, offset as i64, len as i64) {
            Ok(()) => return Ok(()),
            Err(e) if ZeroStep::is_refusal(e as i32) => {
                files.zero_refused(step);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        files
            .for_transfer(offset + done, 0, n)
            .write_all_at(&zeroes.as_slice()[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Runs `engine` on its own thread: jobs come in on `jobs`, finished ones go out on `done`.
/// Ends when `jobs` is closed and nothing is in flight, or at the first engine failure.
pub fn serve(
    mut engine: Box<dyn Engine>,
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    done: tokio::sync::mpsc::UnboundedSender<Finished>,
) -> io::Result<()> {
    let mut open = true;
    loop {
        while open {
            match jobs.try_recv() {
                Ok(job) => engine.submit(job)?,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if engine.in_flight() == 0 {
            if !open {
                return Ok(());
            }
            match jobs.blocking_recv() {
                Some(job) => engine.submit(job)?,
                None => open = false,
            }
            continue;
        }
        for finished in engine.reap(true)? {
            if done.send(finished).is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(len: u64) -> (tempfile::NamedTempFile, Arc<Files>) {
        let file = tempfile::NamedTempFile::new().expect("tmp");
        file.as_file().set_len(len).expect("len");
        let buffered = File::options()
            .read(true)
            .write(true)
            .open(file.path())
            .expect("open");
        let direct = crate::disk::open_direct(file.path()).ok();
        (file, Arc::new(Files::new(direct, buffered)))
    }

    /// Both engines: write two aligned runs and an unaligned tail, zero a range, read back.
    fn exercise(mut engine: Box<dyn Engine>, path: &std::path::Path) {
        let mut buf = AlignedBuf::new(3 * ALIGN);
        buf.as_mut_slice().fill(0xab);
        engine
            .submit(Job {
                tag: 7,
                buf: Some(buf),
                ops: vec![
                    Op {
                        kind: OpKind::Write,
                        disk_offset: 0,
                        buf_offset: 0,
                        len: 2 * ALIGN,
                    },
                    Op {
                        kind: OpKind::Write,
                        disk_offset: 10 * ALIGN as u64,
                        buf_offset: 2 * ALIGN,
                        len: 100,
                    },
                ],
            })
            .expect("submit");
        let mut finished = Vec::new();
        while finished.is_empty() {
            finished = engine.reap(true).expect("reap");
        }
        assert_eq!(finished[0].0.tag, 7);
        assert!(finished[0].1.is_ok(), "{:?}", finished[0].1);
        engine
            .submit(Job {
                tag: 8,
                buf: None,
                ops: vec![Op {
                    kind: OpKind::Zero,
                    disk_offset: ALIGN as u64,
                    buf_offset: 0,
                    len: ALIGN,
                }],
            })
            .expect("submit");
        let done = engine.reap(true).expect("reap");
        assert!(done[0].1.is_ok(), "{:?}", done[0].1);
        let mut back = AlignedBuf::new(11 * ALIGN);
        back.as_mut_slice().fill(0x55);
        engine
            .submit(Job {
                tag: 9,
                buf: Some(back),
                ops: vec![Op {
                    kind: OpKind::Read,
                    disk_offset: 0,
                    buf_offset: 0,
                    len: 11 * ALIGN,
                }],
            })
            .expect("submit");
        let (job, result) = engine.reap(true).expect("reap").pop().expect("one");
        result.expect("read");
        let data = job.buf.expect("buf");
        let data = data.as_slice();
        assert!(data[..ALIGN].iter().all(|&b| b == 0xab));
        assert!(data[ALIGN..2 * ALIGN].iter().all(|&b| b == 0));
        assert!(data[2 * ALIGN..10 * ALIGN].iter().all(|&b| b == 0));
        assert!(
            data[10 * ALIGN..10 * ALIGN + 100]
                .iter()
                .all(|&b| b == 0xab)
        );
        assert!(data[10 * ALIGN + 100..].iter().all(|&b| b == 0));
        let on_disk = std::fs::read(path).expect("read");
        assert_eq!(&on_disk[..11 * ALIGN], data);
    }

    #[test]
    fn io_uring_engine_reads_writes_and_zeroes() {
        let (file, files) = target(16 * ALIGN as u64);
        match uring::Uring::new(files, 8) {
            Ok(ring) => exercise(Box::new(ring), file.path()),
            Err(e) => eprintln!("io_uring unavailable here, skipped: {e}"),
        }
    }

    #[test]
    fn thread_engine_reads_writes_and_zeroes() {
        let (file, files) = target(16 * ALIGN as u64);
        exercise(Box::new(Threads::new(files, 2)), file.path());
    }

    #[test]
    fn zeroing_steps_down_and_never_up() {
        let z = ZeroMethod::default();
        assert_eq!(z.get(), ZeroStep::PunchHole);
        assert_eq!(z.step_down(ZeroStep::PunchHole), ZeroStep::ZeroRange);
        assert_eq!(z.step_down(ZeroStep::PunchHole), ZeroStep::ZeroRange);
        assert_eq!(z.step_down(ZeroStep::ZeroRange), ZeroStep::WriteZeroes);
        assert_eq!(z.step_down(ZeroStep::PunchHole), ZeroStep::WriteZeroes);
    }
}
