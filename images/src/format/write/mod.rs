//! Exporting a manifest as an image file, streamed, with no temporary file: a writer knows from
//! the manifest alone which blocks hold data, so it lays out every table up front and emits the
//! file front to back as [`Piece`]s — metadata it generates, and runs of guest blocks the caller
//! reads from the store. Holes stay holes: a hole block is never allocated in the output.

mod qcow2;
mod vhd;
mod vmdk;

use super::DiskFormat;
use crate::BLOCK_SIZE;

/// One piece of an export, in file order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes the writer generated (headers, tables).
    Meta(Vec<u8>),
    /// These guest blocks, in order, each written as a full 64 KiB: a hole as zeroes and a
    /// short last block padded with zeroes.
    Blocks(Vec<u64>),
}

/// An export in progress: ask [`Export::next_piece`] what comes next; when it is
/// [`Piece::Blocks`], read those blocks (64 KiB each, zero-padded) and pass them to
/// [`Export::encode`], which returns the bytes to write for them.
pub trait Export: Send {
    /// The output's length, when the format allows knowing it before the data is read.
    fn output_len(&self) -> Option<u64>;
    /// The next piece, or `None` at the end.
    fn next_piece(&mut self) -> Option<Piece>;
    /// The output for the blocks of the last `Piece::Blocks` (verbatim unless the format
    /// compresses).
    fn encode(&mut self, _indices: &[u64], data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// Which blocks of a disk hold data: one bit per 64 KiB block (a 16 TiB disk takes 32 MiB,
/// not the 256 MiB a `Vec<bool>` would), with word-at-a-time counting and skipping of holes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataMap {
    words: Vec<u64>,
    len: usize,
}

impl DataMap {
    /// `len` blocks, none holding data.
    pub fn new(len: usize) -> Self {
        DataMap {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Block `i` holds data (ignored past the end).
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether block `i` holds data (false past the end).
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// The number of blocks, data or not.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Data blocks among `start..end` (clamped to the map).
    pub fn count_range(&self, start: usize, end: usize) -> u64 {
        let end = end.min(self.len);
        let mut count = 0u64;
        let mut i = start;
        while i < end {
            let word = self.words[i / 64] >> (i % 64);
            let take = (64 - i % 64).min(end - i);
            let mask = if take == 64 {
                u64::MAX
            } else {
                (1 << take) - 1
            };
            count += (word & mask).count_ones() as u64;
            i += take;
        }
        count
    }

    /// All data blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether any of `start..end` holds data.
    pub fn any_in(&self, start: usize, end: usize) -> bool {
        self.next_set(start).is_some_and(|i| i < end)
    }

    /// The first data block at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut w = from / 64;
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// Up to `max` data blocks from `from` on, below `end`, in order.
    pub fn run(&self, from: usize, end: usize, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max.min(64));
        let mut at = from;
        while out.len() < max {
            match self.next_set(at) {
                Some(i) if i < end => {
                    out.push(i as u64);
                    at = i + 1;
                }
                _ => break,
            }
        }
        out
    }
}

impl FromIterator<bool> for DataMap {
    fn from_iter<I: IntoIterator<Item = bool>>(iter: I) -> Self {
        let mut map = DataMap::default();
        for (i, data) in iter.into_iter().enumerate() {
            if i % 64 == 0 {
                map.words.push(0);
            }
            if data {
                map.words[i / 64] |= 1 << (i % 64);
            }
            map.len = i + 1;
        }
        map
    }
}

/// VHD and VMDK address their files in 32-bit sector numbers: 2 TiB.
const MAX_SECTOR_ADDRESSED: u64 = (u32::MAX as u64) * 512;

/// Starts an export of a disk of `virtual_size` bytes whose block `i` holds data iff
/// `data.get(i)`, or says why the format cannot carry it.
pub fn export(
    format: DiskFormat,
    virtual_size: u64,
    data: DataMap,
) -> Result<Box<dyn Export>, String> {
    // Worst case for VMDK: incompressible grains, each with a marker sector, plus tables.
    let data_bytes = data.count() * (BLOCK + 512);
    match format {
        DiskFormat::Qcow2 => Ok(Box::new(qcow2::Qcow2Export::new(virtual_size, data))),
        DiskFormat::Vmdk
            if data_bytes + data.len() as u64 / 128 + (1 << 20) > MAX_SECTOR_ADDRESSED =>
        {
            Err("a streamOptimized VMDK addresses at most 2 TiB of file; export as qcow2".into())
        }
        DiskFormat::Vmdk => Ok(Box::new(vmdk::StreamOptimized::new(virtual_size, data))),
        // The VHD format's own limit is 2040 GiB.
        DiskFormat::Vhd if virtual_size > 2040 << 30 => {
            Err("a VHD holds at most 2040 GiB; export as qcow2 or vmdk".into())
        }
        DiskFormat::Vhd => Ok(Box::new(vhd::DynamicVhd::new(virtual_size, data))),
        other => Err(format!(
            "export as {other} is not available yet; use raw, qcow2, vmdk or vhd"
        )),
    }
}

/// Bytes per exported block.
pub const BLOCK: u64 = BLOCK_SIZE as u64;

#[cfg(test)]
mod data_map {
    use super::DataMap;

    #[test]
    fn bits_count_skip_and_run_like_the_bools_they_replace() {
        let bools: Vec<bool> = (0..1000)
            .map(|i| i % 7 == 0 || (300..420).contains(&i))
            .collect();
        let map: DataMap = bools.iter().copied().collect();
        assert_eq!(map.len(), 1000);
        for (i, b) in bools.iter().enumerate() {
            assert_eq!(map.get(i), *b, "{i}");
        }
        assert!(!map.get(1000) && !map.get(usize::MAX));
        assert_eq!(map.count(), bools.iter().filter(|b| **b).count() as u64);
        for (start, end) in [
            (0, 1000),
            (1, 64),
            (63, 65),
            (299, 421),
            (500, 2000),
            (7, 7),
        ] {
            let want = bools[start.min(1000)..end.min(1000)]
                .iter()
                .filter(|b| **b)
                .count() as u64;
            assert_eq!(map.count_range(start, end), want, "{start}..{end}");
            assert_eq!(map.any_in(start, end), want > 0, "{start}..{end}");
        }
        for from in [0, 1, 8, 299, 420, 421, 995, 999] {
            let want = (from..1000).find(|i| bools[*i]);
            assert_eq!(map.next_set(from), want, "{from}");
        }
        let run = map.run(290, 1000, 64);
        let want: Vec<u64> = (290..1000)
            .filter(|i| bools[*i])
            .take(64)
            .map(|i| i as u64)
            .collect();
        assert_eq!(run, want);
        assert_eq!(map.run(0, 10, 64), vec![0, 7]);
        let mut built = DataMap::new(1000);
        (0..1000).filter(|i| bools[*i]).for_each(|i| built.set(i));
        assert_eq!(built, map);
        let empty = DataMap::new(130);
        assert_eq!((empty.next_set(0), empty.count()), (None, 0));
    }
}
