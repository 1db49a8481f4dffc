//! qcow2 v3 export with 64 KiB clusters (one cluster per Kagami block). Layout, all computed
//! before any data is read:
//!
//! ```text
//! cluster 0        header (+ end of extensions)
//! L1 table         one entry per 512 MiB of disk
//! refcount table   pointing at the refcount blocks
//! refcount blocks  16-bit refcounts, 1 for every cluster of the file
//! L2 tables        only for 512 MiB regions that hold data
//! data clusters    the data blocks, in guest order
//! ```
//! Every cluster is referenced once, so the COPIED flag is set on every L1/L2 entry, and
//! `qemu-img check` finds no leaks and no errors.

use super::super::qcow2::MAGIC;
use super::{BLOCK, DataMap, Export, Piece};

const CLUSTER: u64 = BLOCK;
const L2_ENTRIES: u64 = CLUSTER / 8;
/// refcount_order 4: 16-bit refcounts.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
/// Data blocks per emitted run (one segment's worth).
const RUN: usize = 64;

pub(super) struct Qcow2Export {
    size: u64,
    data: DataMap,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_clusters: u64,
    /// The 512 MiB regions that hold data, in order.
    regions: Vec<u64>,
    data_blocks: u64,
    /// Data blocks in the regions whose L2 tables were already emitted.
    emitted_data: u64,
    /// Which piece comes next.
    stage: Stage,
}

enum Stage {
    Head,
    Refcounts(u64),
    L2(usize),
    Data(usize),
    Done,
}

impl Qcow2Export {
    pub(super) fn new(size: u64, data: DataMap) -> Self {
        let blocks = data.len() as u64;
        let l1_entries = blocks.div_ceil(L2_ENTRIES).max(1);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        let regions: Vec<u64> = (0..l1_entries)
            .filter(|r| data.any_in((r * L2_ENTRIES) as usize, ((r + 1) * L2_ENTRIES) as usize))
            .collect();
        let data_blocks = data.count();
        // Refcount blocks count themselves and the table: iterate to the fixed point.
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let clusters = 1 + l1_clusters + rt + rb + regions.len() as u64 + data_blocks;
            let rb2 = clusters.div_ceil(REFCOUNTS_PER_BLOCK);
            let rt2 = (rb2 * 8).div_ceil(CLUSTER);
            if (rt2, rb2) == (rt, rb) {
                break;
            }
            (rt, rb) = (rt2, rb2);
        }
        Qcow2Export {
            size,
            data,
            l1_clusters,
            rt_clusters: rt,
            rb_clusters: rb,
            regions,
            data_blocks,
            emitted_data: 0,
            stage: Stage::Head,
        }
    }

    fn l1_offset(&self) -> u64 {
        CLUSTER
    }
    fn rt_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * CLUSTER
    }
    fn rb_offset(&self) -> u64 {
        self.rt_offset() + self.rt_clusters * CLUSTER
    }
    fn l2_offset(&self) -> u64 {
        self.rb_offset() + self.rb_clusters * CLUSTER
    }
    fn data_offset(&self) -> u64 {
        self.l2_offset() + self.regions.len() as u64 * CLUSTER
    }
    fn clusters(&self) -> u64 {
        self.data_offset() / CLUSTER + self.data_blocks
    }

    /// Header, L1 table and refcount table (the refcount blocks follow one cluster at a time,
    /// so memory stays one cluster whatever the disk's size).
    fn head(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.rb_offset() as usize];
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, MAGIC);
        put(4, &3u32.to_be_bytes());
        put(20, &16u32.to_be_bytes()); // cluster_bits: 64 KiB
        // qemu reads the size in whole 512-byte sectors; a disk whose size is not a multiple of
        // 512 (only hand-made raw files are) is exported with its last sector zero-padded.
        put(24, &self.size.next_multiple_of(512).to_be_bytes());
        let l1_entries = (self.data.len() as u64).div_ceil(L2_ENTRIES).max(1);
        put(36, &(l1_entries as u32).to_be_bytes());
        put(40, &self.l1_offset().to_be_bytes());
        put(48, &self.rt_offset().to_be_bytes());
        put(56, &(self.rt_clusters as u32).to_be_bytes());
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit
        put(100, &104u32.to_be_bytes()); // header_length; bytes 104..112 stay zero: end of extensions
        for (rank, region) in self.regions.iter().enumerate() {
            let l2 = self.l2_offset() + rank as u64 * CLUSTER;
            put(
                (self.l1_offset() + region * 8) as usize,
                &(l2 | COPIED).to_be_bytes(),
            );
        }
        for i in 0..self.rb_clusters {
            put(
                (self.rt_offset() + i * 8) as usize,
                &(self.rb_offset() + i * CLUSTER).to_be_bytes(),
            );
        }
        out
    }

    /// Refcount block `i`: a 1 for every cluster of the file it covers.
    fn refcount_block(&self, i: u64) -> Vec<u8> {
        let mut out = vec![0u8; CLUSTER as usize];
        let first = i * REFCOUNTS_PER_BLOCK;
        let count = self
            .clusters()
            .saturating_sub(first)
            .min(REFCOUNTS_PER_BLOCK) as usize;
        for c in 0..count {
            out[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        out
    }

    /// The L2 table of `region`, whose first data block is data block number `next_data`.
    fn l2(&self, region: u64, mut next_data: u64) -> Vec<u8> {
        let mut out = vec![0u8; CLUSTER as usize];
        let start = region * L2_ENTRIES;
        for i in 0..L2_ENTRIES {
            if self.data.get((start + i) as usize) {
                let host = self.data_offset() + next_data * CLUSTER;
                out[(i * 8) as usize..(i * 8 + 8) as usize]
                    .copy_from_slice(&(host | COPIED).to_be_bytes());
                next_data += 1;
            }
        }
        out
    }
}

impl Export for Qcow2Export {
    fn output_len(&self) -> Option<u64> {
        Some(self.clusters() * CLUSTER)
    }

    fn next_piece(&mut self) -> Option<Piece> {
        match self.stage {
            Stage::Head => {
                self.stage = Stage::Refcounts(0);
                Some(Piece::Meta(self.head()))
            }
            Stage::Refcounts(i) => {
                self.stage = if i + 1 < self.rb_clusters {
                    Stage::Refcounts(i + 1)
                } else {
                    Stage::L2(0)
                };
                Some(Piece::Meta(self.refcount_block(i)))
            }
            Stage::L2(rank) => match self.regions.get(rank).copied() {
                Some(region) => {
                    self.stage = Stage::L2(rank + 1);
                    let table = self.l2(region, self.emitted_data);
                    let start = (region * L2_ENTRIES) as usize;
                    self.emitted_data += self.data.count_range(start, start + L2_ENTRIES as usize);
                    Some(Piece::Meta(table))
                }
                None => {
                    self.stage = Stage::Data(0);
                    self.next_piece()
                }
            },
            Stage::Data(from) => {
                let run = self.data.run(from, self.data.len(), RUN);
                match run.last() {
                    Some(&last) => {
                        self.stage = Stage::Data(last as usize + 1);
                        Some(Piece::Blocks(run))
                    }
                    None => {
                        self.stage = Stage::Done;
                        None
                    }
                }
            }
            Stage::Done => None,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::super::tests_support::{qemu_compare, qemu_img, write};
    use super::super::{BLOCK, DataMap, Piece, export};
    use crate::format::DiskFormat;
    use crate::split::split_bytes;

    /// Writes an export to a file the way the server streams it.
    pub(crate) fn materialise(format: DiskFormat, disk: &[u8], path: &std::path::Path) -> u64 {
        let manifest = split_bytes(disk);
        let data: DataMap = manifest.blocks().map(|b| !b.id.is_hole()).collect();
        let mut e = export(format, disk.len() as u64, data).expect("format");
        let declared = e.output_len();
        let mut out = Vec::new();
        while let Some(piece) = e.next_piece() {
            match piece {
                Piece::Meta(bytes) => out.extend_from_slice(&bytes),
                Piece::Blocks(ids) => {
                    let mut data = Vec::new();
                    for &i in &ids {
                        let start = (i * BLOCK) as usize;
                        let end = (start + BLOCK as usize).min(disk.len());
                        let mut block = disk[start..end].to_vec();
                        block.resize(BLOCK as usize, 0);
                        data.extend_from_slice(&block);
                    }
                    out.extend_from_slice(&e.encode(&ids, data));
                }
            }
        }
        if let Some(len) = declared {
            assert_eq!(len, out.len() as u64, "declared length");
        }
        write(path, &out);
        out.len() as u64
    }

    #[test]
    fn qemu_checks_and_compares_equal() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, size, data) in [
            (
                "small",
                10 * BLOCK as usize + 100,
                vec![(0usize, 3 * BLOCK as usize), (5 * BLOCK as usize, 10)],
            ),
            (
                "sparse-big",
                1200 << 20,
                vec![(100 << 20, 5 << 20), ((1100 << 20) + 7, 70_000)],
            ),
            ("empty", 8 << 20, vec![]),
        ] {
            let mut disk = vec![0u8; size];
            for (i, (at, len)) in data.iter().enumerate() {
                for (j, b) in disk[*at..at + len].iter_mut().enumerate() {
                    *b = (i + j % 251) as u8 | 1;
                }
            }
            let raw = dir.path().join(format!("{name}.raw"));
            write(&raw, &disk);
            let q = dir.path().join(format!("{name}.qcow2"));
            let len = materialise(DiskFormat::Qcow2, &disk, &q);
            qemu_img(&["check", "-q", "-f", "qcow2", q.to_str().expect("p")]);
            qemu_compare(&raw, &q, "qcow2");
            // Holes stay holes: the file holds little more than the data.
            let data_bytes: usize = data.iter().map(|(_, l)| *l).sum();
            assert!(
                len < data_bytes as u64 + 16 * BLOCK + 2 * BLOCK * data.len() as u64,
                "{name}: {len} bytes"
            );
            // And it reads back through our own inspector and reader.
            let f = std::fs::File::open(&q).expect("open");
            crate::format::inspect(&f, DiskFormat::Qcow2, &Default::default()).expect("inspects");
        }
    }
}
