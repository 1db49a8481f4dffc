//! The io_uring engine: every op of every submitted job goes into one ring, at most `depth` at
//! a time; short transfers are resubmitted for their remainder, and a zeroing the target
//! refuses steps down to the next method (see the parent module).
//!
//! Memory safety rests on one rule, kept by this type alone: a buffer whose address is in the
//! ring belongs to a job held in `slots` until the kernel has posted that op's completion.
//! Jobs leave only through `reap`, once all their ops are complete; on drop the ring is drained
//! first, and if it cannot be, the buffers are leaked rather than freed under the kernel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};

use super::{ALIGN, AlignedBuf, Engine, Files, Finished, Job, OpKind, ZEROES_CHUNK, ZeroStep};

#[derive(Debug)]
struct Slot {
    job: Job,
    pending: usize,
    error: Option<io::Error>,
}

/// One op's remaining work. A zeroing that fell back to writes keeps `kind: Zero`.
#[derive(Clone, Copy, Debug)]
struct Pending {
    slot: usize,
    kind: OpKind,
    disk_offset: u64,
    buf_offset: usize,
    len: usize,
    /// For `Zero`: the method this submission uses.
    step: ZeroStep,
}

pub struct Uring {
    ring: IoUring,
    files: Arc<Files>,
    depth: usize,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// Ops in the ring, by `user_data`.
    ops: Vec<Option<Pending>>,
    free_ops: Vec<usize>,
    /// Ops waiting for room in the ring.
    backlog: VecDeque<Pending>,
    in_ring: usize,
    /// Jobs submitted and not yet finished.
    jobs: usize,
    /// Finished jobs not yet reaped.
    finished: Vec<Finished>,
    zeroes: AlignedBuf,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("depth", &self.depth)
            .field("in_ring", &self.in_ring)
            .field("jobs", &self.jobs)
            .finish()
    }
}

impl Uring {
    /// A ring for `depth` ops in flight. Fails where the kernel refuses io_uring.
    pub fn new(files: Arc<Files>, depth: usize) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth.next_power_of_two() as u32)?;
        Ok(Uring {
            ring,
            files,
            depth,
            slots: Vec::new(),
            free_slots: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            backlog: VecDeque::new(),
            in_ring: 0,
            jobs: 0,
            finished: Vec::new(),
            zeroes: AlignedBuf::new(ZEROES_CHUNK),
        })
    }

    /// Moves backlog ops into the ring while there is room, then tells the kernel.
    fn pump(&mut self) -> io::Result<()> {
        while self.in_ring < self.depth {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            let entry = self.entry(&op)?;
            let key = match self.free_ops.pop() {
                Some(k) => {
                    self.ops[k] = Some(op);
                    k
                }
                None => {
                    self.ops.push(Some(op));
                    self.ops.len() - 1
                }
            };
            self.push(entry.user_data(key as u64))?;
            self.in_ring += 1;
        }
        self.ring.submit()?;
        Ok(())
    }

    #[expect(
        unsafe_code,
        reason = "io_uring needs raw buffer addresses; see the module docs for why they stay valid"
    )]
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: `entry` points into a buffer owned by a job in `self.slots` (or into
            // `self.zeroes`), which stays there, unmoved and alive, until this op's completion
            // is reaped; fallocate entries carry no address.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand what is there to the kernel and retry.
            self.ring.submit()?;
        }
    }

    /// The ring entry for `op`'s next submission.
    fn entry(&mut self, op: &Pending) -> io::Result<squeue::Entry> {
        let len32 = |len: usize| u32::try_from(len).map_err(|_| io::Error::other("op too long"));
        Ok(match op.kind {
            OpKind::Write => {
                let fd = types::Fd(
                    self.files
                        .for_transfer(op.disk_offset, op.buf_offset, op.len)
                        .as_raw_fd(),
                );
                let buf = self.buffer(op)?;
                opcode::Write::new(fd, buf.as_ptr(), len32(op.len)?)
                    .offset(op.disk_offset)
                    .build()
            }
            OpKind::Read => {
                let fd = types::Fd(
                    self.files
                        .for_transfer(op.disk_offset, op.buf_offset, op.len)
                        .as_raw_fd(),
                );
                let ptr = self.buffer_mut(op)?.as_mut_ptr();
                opcode::Read::new(fd, ptr, len32(op.len)?)
                    .offset(op.disk_offset)
                    .build()
            }
            OpKind::Zero => match op.step.flags() {
                Some(flags) => {
                    let fd = types::Fd(self.files.buffered.as_raw_fd());
                    opcode::Fallocate::new(fd, op.len as u64)
                        .offset(op.disk_offset)
                        .mode(flags.bits())
                        .build()
                }
                None => {
                    let n = op.len.min(self.zeroes.len());
                    let fd = types::Fd(self.files.for_transfer(op.disk_offset, 0, n).as_raw_fd());
                    opcode::Write::new(fd, self.zeroes.as_slice().as_ptr(), len32(n)?)
                        .offset(op.disk_offset)
                        .build()
                }
            },
        })
    }

    fn buffer(&self, op: &Pending) -> io::Result<&[u8]> {
        self.slots[op.slot]
            .as_ref()
            .and_then(|s| s.job.buf.as_ref())
            .and_then(|b| b.as_slice().get(op.buf_offset..op.buf_offset + op.len))
            .ok_or_else(|| io::Error::other("an op lies outside its job's buffer"))
    }

    fn buffer_mut(&mut self, op: &Pending) -> io::Result<&mut [u8]> {
        self.slots[op.slot]
            .as_mut()
            .and_then(|s| s.job.buf.as_mut())
            .and_then(|b| {
                b.as_mut_slice()
                    .get_mut(op.buf_offset..op.buf_offset + op.len)
            })
            .ok_or_else(|| io::Error::other("an op lies outside its job's buffer"))
    }

    /// Handles one completion: done, resubmit the remainder, step down a zeroing, or fail.
    fn complete(&mut self, key: usize, result: i32) {
        let Some(mut op) = self.ops.get_mut(key).and_then(Option::take) else {
            return;
        };
        self.free_ops.push(key);
        self.in_ring -= 1;
        let outcome: Result<usize, io::Error> = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as usize)
        };
        match outcome {
            Err(e)
                if op.kind == OpKind::Zero
                    && op.step != ZeroStep::WriteZeroes
                    && ZeroStep::is_refusal(-result) =>
            {
                drop(e);
                op.step = self.files.zero_refused(op.step);
                self.backlog.push_back(op);
                return;
            }
            Err(e) => return self.finish_op(op.slot, Some(e)),
            Ok(n) => {
                let done = match (op.kind, op.step.flags()) {
                    (OpKind::Zero, Some(_)) => op.len,
                    _ => n,
                };
                if done == 0 {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the target ended at byte {}", op.disk_offset),
                    );
                    return self.finish_op(op.slot, Some(e));
                }
                if done < op.len {
                    op.disk_offset += done as u64;
                    if op.kind != OpKind::Zero {
                        op.buf_offset += done;
                    }
                    op.len -= done;
                    self.backlog.push_back(op);
                    return;
                }
            }
        }
        self.finish_op(op.slot, None);
    }

    fn finish_op(&mut self, slot: usize, error: Option<io::Error>) {
        let Some(s) = self.slots[slot].as_mut() else {
            return;
        };
        s.pending -= 1;
        if s.error.is_none() {
            s.error = error;
        }
        if s.pending == 0
            && let Some(s) = self.slots[slot].take()
        {
            self.free_slots.push(slot);
            self.jobs -= 1;
            let result = s.error.map_or(Ok(()), Err);
            self.finished.push((s.job, result));
        }
    }
}

impl Engine for Uring {
    fn submit(&mut self, job: Job) -> io::Result<()> {
        let ops = job.ops.clone();
        let pending = ops.len();
        let slot = Slot {
            job,
            pending,
            error: None,
        };
        let index = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.jobs += 1;
        if pending == 0 {
            if let Some(s) = self.slots[index].take() {
                self.free_slots.push(index);
                self.jobs -= 1;
                self.finished.push((s.job, Ok(())));
            }
            return Ok(());
        }
        let step = self.files.zero_method();
        for op in ops {
            self.backlog.push_back(Pending {
                slot: index,
                kind: op.kind,
                disk_offset: op.disk_offset,
                buf_offset: op.buf_offset,
                len: op.len,
                step,
            });
        }
        self.pump()
    }

    fn reap(&mut self, wait: bool) -> io::Result<Vec<Finished>> {
        loop {
            if self.finished.is_empty() && wait && self.in_ring > 0 {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (key, result) in done {
                self.complete(key as usize, result);
            }
            self.pump()?;
            if !self.finished.is_empty() || !wait || self.in_ring == 0 {
                return Ok(std::mem::take(&mut self.finished));
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.jobs + self.finished.len()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.backlog.clear();
        while self.in_ring > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                // The kernel may still use these buffers: leak them rather than free them.
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(std::mem::replace(&mut self.zeroes, AlignedBuf::new(0)));
                return;
            }
            let n = self.ring.completion().count();
            self.in_ring = self.in_ring.saturating_sub(n);
        }
    }
}

const _: () = assert!(ZEROES_CHUNK.is_multiple_of(ALIGN));
