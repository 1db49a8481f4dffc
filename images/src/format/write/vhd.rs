//! VHD dynamic export (big-endian throughout): footer copy, dynamic header, BAT, then each
//! 2 MiB block that holds any data as a sector bitmap plus the block, then the footer. Blocks
//! without data stay unallocated. The size is known before any data is read.
//!
//! Disk size: readers disagree on whether a VHD's size is its CHS geometry (Virtual PC, qemu for
//! most creators) or the footer's current size (Hyper-V). Like `qemu-img create -f vpc`, the
//! exported disk is rounded *up* to a whole CHS geometry, so both readings give the same disk:
//! the image's bytes followed, at most, by a few zero sectors.

use super::super::vhd::{COOKIE, D_CHECKSUM, DYN_COOKIE, F_CHECKSUM, SECTOR, checksum};
use super::{BLOCK, DataMap, Export, Piece};

const VHD_BLOCK: u64 = 2 << 20;
const PER_VHD_BLOCK: u64 = VHD_BLOCK / BLOCK;
/// One bitmap sector covers a 2 MiB block's 4096 sectors.
const BITMAP: u64 = SECTOR;
const HEADER_AT: u64 = SECTOR;
const BAT_AT: u64 = HEADER_AT + 1024;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01).
const VHD_EPOCH: u64 = 946_684_800;

pub(super) struct DynamicVhd {
    size: u64,
    cyls: u16,
    heads: u8,
    spt: u8,
    /// The footer (identical at both ends: one id, one timestamp).
    footer: Vec<u8>,
    /// Kagami blocks in the image (the VHD may be a little longer: CHS rounding).
    image_blocks: u64,
    /// For each VHD block: whether it holds data.
    allocated: Vec<bool>,
    bat_bytes: u64,
    /// The next VHD block to consider.
    next: usize,
    /// Pieces of the current block still to go (bitmap, data, padding past the image's end).
    queue: std::collections::VecDeque<Piece>,
    stage: Stage,
}

enum Stage {
    Head,
    Block,
    Footer,
    Done,
}

/// CHS geometry per the VHD specification (rounds down); `None` above the CHS maximum.
fn geometry(total: u64) -> (u16, u8, u8) {
    let total = total.min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    ((cth / heads) as u16, heads as u8, spt as u8)
}

impl DynamicVhd {
    pub(super) fn new(size: u64, data: DataMap) -> Self {
        let image_blocks = data.len() as u64;
        let wanted = size.div_ceil(SECTOR);
        // Round up to a whole geometry, as qemu-img does (bounded: geometry steps are small).
        let (mut cyls, mut heads, mut spt) = geometry(wanted);
        let mut total = wanted;
        for _ in 0..100_000 {
            if cyls as u64 * heads as u64 * spt as u64 >= wanted {
                break;
            }
            total += 1;
            (cyls, heads, spt) = geometry(total);
        }
        let chs = cyls as u64 * heads as u64 * spt as u64 * SECTOR;
        // At the CHS maximum, every reader uses the current size instead.
        let size = if chs >= size {
            chs
        } else {
            size.next_multiple_of(SECTOR)
        };
        let blocks = size.div_ceil(VHD_BLOCK) as usize;
        let allocated = (0..blocks)
            .map(|b| {
                let first = b * PER_VHD_BLOCK as usize;
                data.any_in(first, first + PER_VHD_BLOCK as usize)
            })
            .collect();
        let bat_bytes = (blocks as u64 * 4).next_multiple_of(SECTOR);
        let mut vhd = DynamicVhd {
            size,
            cyls,
            heads,
            spt,
            footer: Vec::new(),
            image_blocks,
            allocated,
            bat_bytes,
            next: 0,
            queue: Default::default(),
            stage: Stage::Head,
        };
        vhd.footer = vhd.make_footer();
        vhd
    }

    fn make_footer(&self) -> Vec<u8> {
        let mut f = vec![0u8; SECTOR as usize];
        f[0..8].copy_from_slice(COOKIE);
        f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit always set
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&HEADER_AT.to_be_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        f[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
        f[28..32].copy_from_slice(b"kgmi");
        f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        f[56..58].copy_from_slice(&self.cyls.to_be_bytes());
        f[58] = self.heads;
        f[59] = self.spt;
        f[60..64].copy_from_slice(&3u32.to_be_bytes()); // dynamic
        f[68..84].copy_from_slice(&uuid::Uuid::new_v4().into_bytes());
        let sum = checksum(&f, F_CHECKSUM);
        f[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        f
    }

    fn dynamic_header(&self) -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        h[0..8].copy_from_slice(DYN_COOKIE);
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&BAT_AT.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(self.allocated.len() as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(VHD_BLOCK as u32).to_be_bytes());
        let sum = checksum(&h, D_CHECKSUM);
        h[D_CHECKSUM..D_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        h
    }

    fn bat(&self) -> Vec<u8> {
        let mut bat = vec![0xffu8; self.bat_bytes as usize];
        let mut at = BAT_AT + self.bat_bytes;
        for (i, used) in self.allocated.iter().enumerate() {
            if *used {
                bat[i * 4..i * 4 + 4].copy_from_slice(&((at / SECTOR) as u32).to_be_bytes());
                at += BITMAP + VHD_BLOCK;
            }
        }
        bat
    }
}

impl Export for DynamicVhd {
    fn output_len(&self) -> Option<u64> {
        let used = self.allocated.iter().filter(|a| **a).count() as u64;
        Some(BAT_AT + self.bat_bytes + used * (BITMAP + VHD_BLOCK) + SECTOR)
    }

    fn next_piece(&mut self) -> Option<Piece> {
        match self.stage {
            Stage::Head => {
                self.stage = Stage::Block;
                let mut head = self.footer.clone();
                head.extend_from_slice(&self.dynamic_header());
                head.extend_from_slice(&self.bat());
                Some(Piece::Meta(head))
            }
            Stage::Block => {
                if let Some(piece) = self.queue.pop_front() {
                    return Some(piece);
                }
                let Some(b) = (self.next..self.allocated.len()).find(|b| self.allocated[*b]) else {
                    self.stage = Stage::Footer;
                    return self.next_piece();
                };
                self.next = b + 1;
                // The bitmap (every sector present), the block's 32 guest blocks, and zeroes
                // for any part of the VHD block past the end of the image.
                let first = b as u64 * PER_VHD_BLOCK;
                let end = (first + PER_VHD_BLOCK).min(self.image_blocks);
                self.queue.push_back(Piece::Blocks((first..end).collect()));
                let short = first + PER_VHD_BLOCK - end;
                if short > 0 {
                    self.queue
                        .push_back(Piece::Meta(vec![0; (short * BLOCK) as usize]));
                }
                Some(Piece::Meta(vec![0xff; BITMAP as usize]))
            }
            Stage::Footer => {
                self.stage = Stage::Done;
                Some(Piece::Meta(self.footer.clone()))
            }
            Stage::Done => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests_support::{qemu_compare, write};
    use super::super::qcow2::tests::materialise;
    use crate::format::{DiskFormat, Limits, inspect};

    #[test]
    fn qemu_checks_and_compares_equal() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, size) in [("odd", (21 << 20) + 3 * 512), ("round", 64 << 20)] {
            let mut disk = vec![0u8; size];
            disk[..1 << 20].fill(0x11);
            disk[(5 << 20) + 100..(7 << 20)].fill(0x22);
            let last = size - 4096;
            disk[last..].fill(0x33);
            let raw = dir.path().join(format!("{name}.raw"));
            write(&raw, &disk);
            let v = dir.path().join(format!("{name}.vhd"));
            materialise(DiskFormat::Vhd, &disk, &v);
            // (qemu-img check does not support vpc; compare reads every sector through qemu.)
            qemu_compare(&raw, &v, "vpc");
            let f = std::fs::File::open(&v).expect("open");
            let info = inspect(&f, DiskFormat::Vhd, &Limits::default()).expect("inspects");
            assert!(
                info.virtual_size >= size as u64 && info.virtual_size < size as u64 + (8 << 20),
                "{name}: {}",
                info.virtual_size
            );
        }
    }
}
