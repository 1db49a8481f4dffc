//! VMDK `streamOptimized` export: deflate-compressed grains behind grain markers, each grain
//! table written after its grains, then the grain directory, a footer and an end-of-stream
//! marker — a file that can be produced front to back without knowing compressed sizes ahead.
//! The header's grain directory offset is "at end"; the footer (1024 bytes before the end)
//! carries the real one, as VMware's own stream images do.
//!
//! Compression runs on every core ([`crate::split::parallel_map`]) at zlib's fastest level:
//! qemu-img compresses streamOptimized on one thread.

use flate2::Compression;
use flate2::write::ZlibEncoder;

use super::super::vmdk::{COMPRESSED, GD_AT_END, MAGIC, SECTOR};
use super::{BLOCK, DataMap, Export, Piece};
use crate::split::parallel_map;

const GRAIN_SECTORS: u64 = BLOCK / SECTOR;
const GTES: u64 = 512;
const DESCRIPTOR_SECTORS: u64 = 2;
const FLAGS: u32 = 1 | COMPRESSED | (1 << 17); // newline detection, compressed grains, markers
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

pub(super) struct StreamOptimized {
    capacity: u64,
    data: DataMap,
    /// Bytes emitted so far: grain and table positions are sector offsets from it.
    pos: u64,
    /// Grain table being filled, and its number.
    table: u64,
    gt: Vec<u32>,
    /// Sector of each grain table written (0: none).
    gd: Vec<u32>,
    next_block: usize,
    stage: Stage,
}

#[derive(PartialEq, Eq)]
enum Stage {
    Head,
    Grains,
    Tail,
    Done,
}

impl StreamOptimized {
    pub(super) fn new(size: u64, data: DataMap) -> Self {
        let tables = (data.len() as u64).div_ceil(GTES) as usize;
        StreamOptimized {
            capacity: size.div_ceil(SECTOR),
            data,
            pos: 0,
            table: 0,
            gt: vec![0; GTES as usize],
            gd: vec![0; tables.max(1)],
            next_block: 0,
            stage: Stage::Head,
        }
    }

    fn header(&self, gd_offset: u64) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&FLAGS.to_le_bytes());
        h[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&DESCRIPTOR_SECTORS.to_le_bytes());
        h[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
        h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
        h[64..72].copy_from_slice(&(1 + DESCRIPTOR_SECTORS).to_le_bytes());
        h[73] = b'\n';
        h[74] = b' ';
        h[75] = b'\r';
        h[76] = b'\n';
        h[77..79].copy_from_slice(&1u16.to_le_bytes()); // deflate
        h
    }

    fn descriptor(&self) -> Vec<u8> {
        let cylinders = (self.capacity / (16 * 63)).clamp(1, 65535);
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
             # Extent description\nRW {} SPARSE \"disk.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"0\"\n",
            self.capacity
        );
        let mut d = text.into_bytes();
        d.resize((DESCRIPTOR_SECTORS * SECTOR) as usize, 0);
        d
    }

    /// A 512-byte metadata marker announcing `sectors` sectors of metadata of `kind`.
    fn marker(sectors: u64, kind: u32) -> Vec<u8> {
        let mut m = vec![0u8; SECTOR as usize];
        m[0..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    }

    /// Emits `bytes` (already sector-padded) and advances the position.
    fn emit(&mut self, bytes: Vec<u8>) -> Piece {
        self.pos += bytes.len() as u64;
        Piece::Meta(bytes)
    }

    /// The grain table just filled, behind its marker; records where it went.
    fn flush_table(&mut self) -> Vec<u8> {
        let mut out = Self::marker(GTES * 4 / SECTOR, MARKER_GT);
        let sector = (self.pos + out.len() as u64) / SECTOR;
        if let Some(slot) = self.gd.get_mut(self.table as usize) {
            *slot = sector as u32;
        }
        for e in &self.gt {
            out.extend_from_slice(&e.to_le_bytes());
        }
        self.gt.iter_mut().for_each(|e| *e = 0);
        out
    }
}

impl Export for StreamOptimized {
    fn output_len(&self) -> Option<u64> {
        None // compressed sizes are known only as the data goes by
    }

    fn next_piece(&mut self) -> Option<Piece> {
        match self.stage {
            Stage::Head => {
                self.stage = Stage::Grains;
                let mut head = self.header(GD_AT_END);
                head.extend_from_slice(&self.descriptor());
                Some(self.emit(head))
            }
            Stage::Grains => loop {
                // The next run: data blocks of the current grain table only, up to 64 of them.
                let table_end = ((self.table + 1) * GTES) as usize;
                let run = self.data.run(self.next_block, table_end, 64);
                if let Some(&last) = run.last() {
                    self.next_block = last as usize + 1;
                    return Some(Piece::Blocks(run));
                }
                // This table is done: write it if it maps anything, then move on (a loop, not
                // recursion: a terabyte of holes is tens of thousands of empty tables).
                let had_data = self.gt.iter().any(|e| *e != 0);
                let table = if had_data {
                    self.flush_table()
                } else {
                    Vec::new()
                };
                self.table += 1;
                self.next_block = table_end;
                if self.next_block >= self.data.len() {
                    self.stage = Stage::Tail;
                }
                if had_data {
                    return Some(self.emit(table));
                }
                if self.stage == Stage::Tail {
                    return self.next_piece();
                }
            },
            Stage::Tail => {
                self.stage = Stage::Done;
                let gd_bytes = (self.gd.len() * 4).next_multiple_of(SECTOR as usize);
                let mut out = Self::marker(gd_bytes as u64 / SECTOR, MARKER_GD);
                let gd_sector = (self.pos + out.len() as u64) / SECTOR;
                for e in &self.gd {
                    out.extend_from_slice(&e.to_le_bytes());
                }
                out.resize(SECTOR as usize + gd_bytes, 0);
                out.extend_from_slice(&Self::marker(1, MARKER_FOOTER));
                out.extend_from_slice(&self.header(gd_sector));
                out.extend_from_slice(&Self::marker(0, MARKER_EOS));
                Some(self.emit(out))
            }
            Stage::Done => None,
        }
    }

    fn encode(&mut self, indices: &[u64], data: Vec<u8>) -> Vec<u8> {
        let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
        let compressed = parallel_map(&blocks, |b| {
            let mut z = ZlibEncoder::new(Vec::with_capacity(b.len() / 2), Compression::fast());
            // Writing to a Vec cannot fail.
            let _ = std::io::Write::write_all(&mut z, b);
            z.finish().unwrap_or_default()
        });
        let mut out = Vec::with_capacity(compressed.iter().map(|c| c.len() + 512).sum());
        for (&index, z) in indices.iter().zip(&compressed) {
            let sector = (self.pos + out.len() as u64) / SECTOR;
            if let Some(slot) = self.gt.get_mut((index % GTES) as usize) {
                *slot = sector as u32;
            }
            out.extend_from_slice(&(index * GRAIN_SECTORS).to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(z);
            out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
        }
        self.pos += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests_support::{qemu_compare, qemu_img, write};
    use super::super::qcow2::tests::materialise;
    use crate::format::{DiskFormat, Limits, inspect, read};

    #[test]
    fn qemu_and_our_reader_see_the_same_disk() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, size, stretches) in [
            (
                "small",
                700_000usize,
                vec![(0usize, 200_000usize), (600_000, 100_000)],
            ),
            (
                "tables",
                80 << 20,
                vec![
                    (1 << 20, 3 << 20),
                    (33 << 20, 1 << 20),
                    ((80 << 20) - 4096, 4096),
                ],
            ),
        ] {
            let mut disk = vec![0u8; size];
            for (i, (at, len)) in stretches.iter().enumerate() {
                for (j, b) in disk[*at..at + len].iter_mut().enumerate() {
                    *b = ((j * 7 + i) % 253) as u8 | 1;
                }
            }
            let raw = dir.path().join(format!("{name}.raw"));
            write(&raw, &disk);
            let v = dir.path().join(format!("{name}.vmdk"));
            materialise(DiskFormat::Vmdk, &disk, &v);
            qemu_img(&["check", "-q", "-f", "vmdk", v.to_str().expect("p")]);
            qemu_compare(&raw, &v, "vmdk");
            let f = std::fs::File::open(&v).expect("open");
            let info = inspect(&f, DiskFormat::Vmdk, &Limits::default()).expect("inspects");
            let mut r = read::open(f, &info, &Limits::default()).expect("opens");
            let mut out = vec![0u8; size];
            r.read_logical(&mut out, 0).expect("reads");
            assert!(out[..size] == disk[..], "{name}");
        }
    }
}

#[cfg(test)]
mod limits {
    use super::super::{DataMap, Piece, export};
    use crate::format::DiskFormat;

    /// A terabyte-class sparse disk: tens of thousands of empty grain tables, walked in a loop.
    #[test]
    fn huge_holes_do_not_recurse_and_oversized_exports_are_refused() {
        let blocks = 1usize << 22; // 256 GiB of 64 KiB blocks
        let mut data = DataMap::new(blocks);
        data.set(blocks - 1);
        let mut e = export(DiskFormat::Vmdk, (blocks as u64) << 16, data).expect("exportable");
        let mut pieces = 0;
        while let Some(p) = e.next_piece() {
            if let Piece::Blocks(ids) = p {
                let _ = e.encode(&ids, vec![1u8; ids.len() << 16]);
            }
            pieces += 1;
        }
        assert!(pieces < 10, "{pieces} pieces");
        assert!(export(DiskFormat::Vhd, 3 << 40, DataMap::new(16)).is_err());
        let all = |n| (0..n).map(|_| true).collect::<DataMap>();
        assert!(export(DiskFormat::Vmdk, 3 << 40, all(3 << 24)).is_err());
        assert!(export(DiskFormat::Vhdx, 1 << 20, all(16)).is_err());
    }
}
