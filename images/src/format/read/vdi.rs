//! VDI as its logical disk: one little-endian u32 per virtual block in the block map, either
//! an index into the data area (blocks stored back to back from `offData`) or free/zero.
//! Normal (dynamic) and fixed images read the same way; per-block extra data is refused.

use super::super::{
    DiskFormat, DiskInfo, FormatError, Limits, ReadAt, check_metadata, le32, le64, read_exact,
};
use super::Logical;
use super::vhd::{Run, read_runs, same_size};

const SIGNATURE: u32 = 0xBEDA_107F;
/// Pre-header (64 bytes of text, signature, version) plus VDIHEADER1.
const HEADER_END: usize = 0x48 + 0x180;

// Header fields (absolute offsets).
const SIGNATURE_AT: usize = 0x40;
const VERSION: usize = 0x44;
const IMAGE_TYPE: usize = 0x4C;
const OFF_BLOCKS: usize = 0x154;
const OFF_DATA: usize = 0x158;
const DISK_SIZE: usize = 0x170;
const BLOCK_SIZE: usize = 0x178;
const BLOCK_EXTRA: usize = 0x17C;
const BLOCKS: usize = 0x180;

const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;

/// Never written: reads as zeroes (qemu's VDI_UNALLOCATED).
const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Discarded or explicitly zero: reads as zeroes (qemu's VDI_DISCARDED).
const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

const MIN_BLOCK: u32 = 512;
const MAX_BLOCK: u32 = 256 << 20;

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let h = read_exact(&r, 0, HEADER_END, "the VDI header")?;
    if le32(&h, SIGNATURE_AT) != SIGNATURE {
        return Err(FormatError::Corrupt(
            "no VDI signature at offset 0x40".into(),
        ));
    }
    let version = le32(&h, VERSION);
    // The field offsets below are those of the 1.x header.
    if version >> 16 != 1 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vdi,
            detail: format!("header version {}.{}", version >> 16, version & 0xFFFF),
        });
    }
    match le32(&h, IMAGE_TYPE) {
        TYPE_NORMAL | TYPE_FIXED => {}
        TYPE_UNDO | TYPE_DIFF => return Err(FormatError::Differencing),
        other => return Err(FormatError::Corrupt(format!("unknown image type {other}"))),
    }
    let size = le64(&h, DISK_SIZE);
    same_size(size, info)?;
    let block_size = le32(&h, BLOCK_SIZE);
    // Blocks are found by division; a zero or absurd size must not get there.
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )));
    }
    let block_extra = le32(&h, BLOCK_EXTRA);
    // Extra data would shift every block's data; qemu refuses it too.
    if block_extra != 0 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vdi,
            detail: format!("{block_extra} bytes of extra data per block"),
        });
    }
    let block_size = u64::from(block_size);
    let blocks = le32(&h, BLOCKS);
    let map_bytes = u64::from(blocks) * 4;
    check_metadata("VDI block map", map_bytes, limits)?;
    if u64::from(blocks) * block_size < size {
        return Err(FormatError::Corrupt(format!(
            "{blocks} blocks of {block_size} bytes do not cover the disk size {size}"
        )));
    }
    let off_blocks = u64::from(le32(&h, OFF_BLOCKS));
    let off_data = u64::from(le32(&h, OFF_DATA));
    if off_blocks + map_bytes > file_size || off_data > file_size {
        return Err(FormatError::Corrupt(format!(
            "the block map ({off_blocks}, {map_bytes} bytes) or the data area ({off_data}) lies \
             past the end of the file ({file_size} bytes)"
        )));
    }
    let map = read_exact(&r, off_blocks, map_bytes as usize, "the VDI block map")?
        .chunks_exact(4)
        .map(|e| le32(e, 0))
        .collect();
    Ok(Box::new(Vdi {
        r,
        size,
        file_size,
        map: Map {
            map,
            block_size,
            off_data,
        },
    }))
}

struct Vdi<R> {
    r: R,
    size: u64,
    file_size: u64,
    map: Map,
}

struct Map {
    map: Vec<u32>,
    block_size: u64,
    off_data: u64,
}

impl Map {
    fn locate(&self, pos: u64) -> Result<Run, FormatError> {
        let block = pos / self.block_size;
        let within = pos % self.block_size;
        let len = self.block_size - within;
        let entry = usize::try_from(block)
            .ok()
            .and_then(|i| self.map.get(i))
            .copied()
            .ok_or_else(|| {
                FormatError::Corrupt(format!("block {block} is beyond the block map"))
            })?;
        if entry == BLOCK_FREE || entry == BLOCK_ZERO {
            return Ok(Run::Zero { len });
        }
        // u32 index times a block of at most 256 MiB, plus a u32 offset: no overflow.
        let at = self.off_data + u64::from(entry) * self.block_size + within;
        Ok(Run::Data { at, len })
    }
}

impl<R: ReadAt + Send> Logical for Vdi<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        let map = &self.map;
        read_runs(&self.r, self.file_size, self.size, buf, offset, |_, pos| {
            map.locate(pos)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{DiskFormat, FormatError};
    use super::super::vhd::testing::{
        check_image, convert_to, open_file, qemu_raw, read_all, read_damaged, sample_raw,
    };
    use super::OFF_BLOCKS;

    #[test]
    fn vdi_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        for (name, opts) in [("dynamic", vec![]), ("static", vec!["-o", "static=on"])] {
            let image = dir.path().join(format!("{name}.vdi"));
            convert_to(&raw, &image, "vdi", &opts);
            check_image(&image, DiskFormat::Vdi, "vdi", &disk);
        }
    }

    /// A zero (discarded) block reads as zeroes, as in qemu; a block index pointing past the
    /// end of the file is an error, never a panic.
    #[test]
    fn vdi_zero_blocks_and_bad_block_map() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let image = dir.path().join("d.vdi");
        convert_to(&raw, &image, "vdi", &[]);
        let (info, _) = open_file(&image, DiskFormat::Vdi);
        let data = std::fs::read(&image).expect("read");
        let map =
            u32::from_le_bytes(data[OFF_BLOCKS..OFF_BLOCKS + 4].try_into().expect("4")) as usize;
        // qemu's VDI blocks are 1 MiB; block 2 holds data.
        assert_ne!(data[map + 8..map + 12], [0xFF; 4], "block 2 holds data");

        let mut zeroed = data.clone();
        zeroed[map + 8..map + 12].copy_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
        let path = dir.path().join("zeroed.vdi");
        std::fs::write(&path, &zeroed).expect("write");
        let (_, mut reader) = open_file(&path, DiskFormat::Vdi);
        let got = read_all(&mut *reader).expect("reads");
        let mut want = disk.clone();
        want[2 << 20..3 << 20].fill(0);
        assert!(got == want, "a zero block reads as zeroes");
        assert!(got == qemu_raw(&path, "vdi"), "as qemu reads it");

        for (what, entry) in [
            ("past the end of the file", 10_000u32),
            ("the last index before free", 0xFFFF_FFFD),
        ] {
            let mut bad = data.clone();
            bad[map + 8..map + 12].copy_from_slice(&entry.to_le_bytes());
            let got = read_damaged(dir.path(), &bad, &info);
            assert!(
                matches!(got, Err(FormatError::Corrupt(_))),
                "{what}: {:?}",
                got.map(|_| ())
            );
        }
        // A file cut inside its data area (by more than the last block, which may lie
        // beyond the disk's end).
        let got = read_damaged(dir.path(), &data[..data.len() - (2 << 20)], &info);
        assert!(
            matches!(got, Err(FormatError::Corrupt(_))),
            "{:?}",
            got.map(|_| ())
        );
    }
}
