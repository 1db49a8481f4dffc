//! VDI as its logical disk: one little-endian u32 per virtual block in the block map, either
//! an index into the data area (blocks stored back to back from `offData`) or free/zero.
//! Normal (dynamic) and fixed images read the same way; per-block extra data is refused.

use super::super::vdi::{
    BLOCK_FREE, BLOCK_ZERO, BLOCKS, DISK_SIZE, HEADER_END, OFF_BLOCKS, OFF_DATA, check_blocks,
    check_type, check_version,
};
use super::super::{DiskInfo, FormatError, Limits, ReadAt, check_metadata, le32, le64, read_exact};
use super::{Locate, Logical, Mapped, Run, same_size};

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let h = read_exact(&r, 0, HEADER_END, "the VDI header")?;
    // The field offsets below are those of the 1.x header.
    check_version(&h)?;
    check_type(&h)?;
    let size = le64(&h, DISK_SIZE);
    same_size(size, info)?;
    let block_size = u64::from(check_blocks(&h)?);
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
    Ok(Box::new(Mapped {
        r,
        size,
        data_end: file_size,
        map: Map {
            map,
            block_size,
            off_data,
        },
    }))
}

struct Map {
    map: Vec<u32>,
    block_size: u64,
    off_data: u64,
}

impl Locate for Map {
    fn locate(&mut self, _: &dyn ReadAt, pos: u64) -> Result<Run, FormatError> {
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

#[cfg(test)]
mod tests {
    use super::super::super::tests_support::{
        assert_matches, check_conversions, convert, open_file, qemu_raw, read_all, read_damaged,
        sample_raw, write,
    };
    use super::super::super::{DiskFormat, FormatError};
    use super::OFF_BLOCKS;

    #[test]
    fn vdi_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let cases: [(&str, &[&str]); 2] = [("dynamic", &[]), ("static", &["-o", "static=on"])];
        check_conversions(dir.path(), DiskFormat::Vdi, "vdi", "vdi", &cases);
    }

    /// A zero (discarded) block reads as zeroes, as in qemu; a block index pointing past the
    /// end of the file is an error, never a panic.
    #[test]
    fn vdi_zero_blocks_and_bad_block_map() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let image = convert(&raw, dir.path().join("d.vdi"), "vdi", &[]);
        let (info, _) = open_file(&image, DiskFormat::Vdi);
        let data = std::fs::read(&image).expect("read");
        let map =
            u32::from_le_bytes(data[OFF_BLOCKS..OFF_BLOCKS + 4].try_into().expect("4")) as usize;
        // qemu's VDI blocks are 1 MiB; block 2 holds data.
        assert_ne!(data[map + 8..map + 12], [0xFF; 4], "block 2 holds data");

        let mut zeroed = data.clone();
        zeroed[map + 8..map + 12].copy_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
        let path = dir.path().join("zeroed.vdi");
        write(&path, &zeroed);
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
            assert_matches!(
                read_damaged(dir.path(), &bad, &info),
                Err(FormatError::Corrupt(_)),
                "{what}"
            );
        }
        // A file cut inside its data area (by more than the last block, which may lie
        // beyond the disk's end).
        assert_matches!(
            read_damaged(dir.path(), &data[..data.len() - (2 << 20)], &info),
            Err(FormatError::Corrupt(_))
        );
    }
}
