//! The splitter: turns a byte stream into blocks and a manifest with bounded memory.
//!
//! Data arrives in 4 MiB segments; the 64 blocks of a segment are hashed in parallel on every
//! core (rayon), holes are detected without hashing, and the caller sees each segment's bytes and
//! ids once — to store new blocks, or to compare against a disk — before the next is read. Memory
//! is one segment buffer plus the growing list of ids (32 bytes per 64 KiB).

use std::io::{self, Read};

use crate::manifest::{BLOCK_SIZE, BlockId, Manifest, ManifestError, SEGMENT_SIZE, Segment};

/// Names each 64 KiB block of `data` (a segment, at most 4 MiB), on every core: one run of
/// blocks per core, each run hashed several blocks at once ([`BlockId::of_many`]).
pub fn hash_blocks(data: &[u8]) -> Vec<BlockId> {
    let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
    let cores = cores();
    let runs: Vec<&[&[u8]]> = blocks.chunks(blocks.len().div_ceil(cores).max(1)).collect();
    parallel_map(&runs, |run| BlockId::of_many(run))
        .into_iter()
        .flatten()
        .collect()
}

/// The cores this process may use, asked once: `available_parallelism` reads the cgroup's CPU
/// quota files on every call (three opens and reads), and ingest asks per 4 MiB segment.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Maps `items` on all cores: the slice is cut into one run per core, each mapped on a scoped
/// thread (the caller's thread takes the first). Chosen over a work-stealing pool because these
/// batches are small and uniform (64 blocks of 64 KiB): idle pool threads spinning between
/// segments cost more CPU than one thread spawn per run does.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let cores = cores();
    if cores < 2 || items.len() < 2 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(cores);
    let f = &f;
    std::thread::scope(|scope| {
        let mut runs = items.chunks(per);
        let first = runs.next().unwrap_or_default();
        let others: Vec<_> = runs
            .map(|run| scope.spawn(move || run.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.iter().map(f).collect();
        for handle in others {
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Accumulates segments in disk order into a [`Manifest`].
#[derive(Debug, Default)]
pub struct ManifestBuilder {
    segments: Vec<Segment>,
    size: u64,
    /// Set once a short segment has been pushed: it must be the last one.
    ended: bool,
}

impl ManifestBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes the next segment of the disk and records it. Every segment but the last must be a
    /// full 4 MiB. Returns the segment so the caller can store or compare its blocks.
    pub fn push(&mut self, data: &[u8]) -> Result<&Segment, ManifestError> {
        self.check(data.len())?;
        self.record(data.len(), hash_blocks(data))
    }

    /// Records the next segment from ids already computed (see [`hash_blocks`]) for `len` bytes.
    pub fn push_ids(&mut self, len: usize, ids: Vec<BlockId>) -> Result<&Segment, ManifestError> {
        self.check(len)?;
        if ids.len() != len.div_ceil(BLOCK_SIZE) {
            return Err(ManifestError::SegmentLength {
                index: self.segments.len(),
                expected: len.div_ceil(BLOCK_SIZE),
                got: ids.len(),
            });
        }
        self.record(len, ids)
    }

    fn check(&self, len: usize) -> Result<(), ManifestError> {
        if self.ended || len > SEGMENT_SIZE || len == 0 {
            return Err(ManifestError::SegmentLength {
                index: self.segments.len(),
                expected: SEGMENT_SIZE / BLOCK_SIZE,
                got: len.div_ceil(BLOCK_SIZE),
            });
        }
        Ok(())
    }

    fn record(&mut self, len: usize, ids: Vec<BlockId>) -> Result<&Segment, ManifestError> {
        self.ended = len < SEGMENT_SIZE;
        self.size += len as u64;
        self.segments.push(Segment::new(ids));
        Ok(self.segments.last().expect("just pushed"))
    }

    /// Bytes pushed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> Manifest {
        Manifest::new(self.size, self.segments)
            .expect("the builder only accepts well-formed segments")
    }
}

/// Reads `reader` to its end in 4 MiB segments, calling `each(offset, bytes, segment)` for every
/// segment before reading the next, and returns the manifest.
pub fn split_reader<R: Read>(
    mut reader: R,
    mut each: impl FnMut(u64, &[u8], &Segment) -> io::Result<()>,
) -> io::Result<Manifest> {
    let mut buf = vec![0u8; SEGMENT_SIZE];
    let mut builder = ManifestBuilder::new();
    loop {
        let n = read_full(&mut reader, &mut buf)?;
        if n == 0 {
            break;
        }
        let offset = builder.size();
        let segment = builder.push(&buf[..n]).map_err(io::Error::other)?;
        each(offset, &buf[..n], segment)?;
        if n < SEGMENT_SIZE {
            break;
        }
    }
    Ok(builder.finish())
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
pub fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The manifest of an in-memory disk (tests and small inputs).
pub fn split_bytes(data: &[u8]) -> Manifest {
    split_reader(data, |_, _, _| Ok(())).expect("reading from memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_and_builder_agree_whatever_the_read_sizes() {
        // A reader that returns odd-sized pieces must give the same manifest as one big slice.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(12_345);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data: Vec<u8> = (0..SEGMENT_SIZE * 2 + 777)
            .map(|i| (i / 1000) as u8)
            .collect();
        let mut offsets = Vec::new();
        let a = split_reader(Dribble(&data), |off, bytes, _| {
            offsets.push((off, bytes.len()));
            Ok(())
        })
        .expect("splits");
        assert_eq!(a, split_bytes(&data));
        assert_eq!(
            offsets,
            vec![
                (0, SEGMENT_SIZE),
                (SEGMENT_SIZE as u64, SEGMENT_SIZE),
                (2 * SEGMENT_SIZE as u64, 777)
            ]
        );
    }

    #[test]
    fn nothing_after_a_short_segment() {
        let mut b = ManifestBuilder::new();
        b.push(&[1u8; 100]).expect("short last segment is fine");
        assert!(b.push(&[1u8; 100]).is_err());
    }

    #[test]
    fn empty_input_is_an_empty_manifest() {
        let m = split_bytes(&[]);
        assert_eq!(m.virtual_size(), 0);
        assert!(m.segments().is_empty());
    }
}
