//! VHDX as its logical disk: region table 1 names the BAT and metadata regions; the metadata
//! gives the block size, the logical sector size and the virtual size; the BAT interleaves
//! one sector-bitmap entry after every `chunk_ratio` payload entries.
//!
//! Payload states NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED read as zeroes (as in qemu: the
//! disk has no parent); FULLY_PRESENT blocks are read from their offset; PARTIALLY_PRESENT
//! needs a parent's sector bitmap and is refused. The log is never replayed: the inspector
//! refuses images with a pending log.

use super::super::vhdx::{
    BAT_REGION, FILE_PARAMETERS, Guid, HAS_PARENT, HEADER_SECTION, LOGICAL_SECTOR_SIZE,
    METADATA_REGION, METADATA_SIG, METADATA_TABLE_LEN, MIB, PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED,
    PAYLOAD_UNMAPPED_V095, PAYLOAD_ZERO, REGION_SIG, REGION_TABLE_LEN, REGION_TABLE_OFFSETS,
    VIRTUAL_DISK_SIZE, bat_geometry, check_block_size,
};
use super::super::{
    DiskFormat, DiskInfo, FormatError, Limits, ReadAt, check_metadata, le16, le32, le64, read_exact,
};
use super::{Locate, Logical, Mapped, Run, same_size};

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    // Region table 1 (qemu reads only this copy; the inspector checked both agree).
    let rt = read_exact(
        &r,
        REGION_TABLE_OFFSETS[0],
        REGION_TABLE_LEN,
        "VHDX region table 1",
    )?;
    if !rt.starts_with(REGION_SIG) {
        return Err(FormatError::Corrupt(
            "no VHDX region table at 192 KiB".into(),
        ));
    }
    let (mut bat_region, mut meta_region) = (None, None);
    for i in 0..le32(&rt, 8) as usize {
        let Some(e) = rt.get(16 + 32 * i..48 + 32 * i) else {
            return Err(FormatError::Corrupt(
                "the region table has more entries than fit".into(),
            ));
        };
        let region = (le64(e, 16), u64::from(le32(e, 24)));
        if e[..16] == BAT_REGION {
            bat_region = Some(region);
        } else if e[..16] == METADATA_REGION {
            meta_region = Some(region);
        }
    }
    let (Some((bat_offset, bat_region_len)), Some((meta_offset, meta_len))) =
        (bat_region, meta_region)
    else {
        return Err(FormatError::Corrupt(
            "the region table lacks the BAT or the metadata region".into(),
        ));
    };

    let table = read_exact(
        &r,
        meta_offset,
        METADATA_TABLE_LEN,
        "the VHDX metadata table",
    )?;
    if !table.starts_with(METADATA_SIG) {
        return Err(FormatError::Corrupt(format!(
            "no metadata table at offset {meta_offset}"
        )));
    }
    let count = usize::from(le16(&table, 10));
    // The metadata item `g`: at least `need` bytes, inside the metadata region.
    let item = |g: &Guid, what: &str, need: u32| -> Result<Vec<u8>, FormatError> {
        let e = (0..count)
            .filter_map(|i| table.get(32 + 32 * i..64 + 32 * i))
            .find(|e| e[..16] == g[..])
            .ok_or_else(|| FormatError::Corrupt(format!("the metadata has no {what} item")))?;
        let (offset, length) = (le32(e, 16), le32(e, 20));
        if length < need || u64::from(offset) + u64::from(need) > meta_len {
            return Err(FormatError::Corrupt(format!(
                "the {what} item ({length} bytes at {offset}) is short or outside its region"
            )));
        }
        read_exact(
            &r,
            meta_offset.saturating_add(u64::from(offset)),
            need as usize,
            "a VHDX metadata item",
        )
    };
    let params = item(&FILE_PARAMETERS, "file parameters", 8)?;
    let size = le64(&item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    let sector = le32(&item(&LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0);
    same_size(size, info)?;
    // A disk with a parent reads unallocated blocks from another file.
    if le32(&params, 4) & HAS_PARENT != 0 {
        return Err(FormatError::Differencing);
    }
    let block_size = le32(&params, 0);
    check_block_size(block_size)?;
    if sector != 512 && sector != 4096 {
        return Err(FormatError::Corrupt(format!(
            "logical sector size {sector} is neither 512 nor 4096"
        )));
    }
    let block_size = u64::from(block_size);
    let (chunk_ratio, _, entries) = bat_geometry(size, block_size, sector);
    let bat_bytes = entries.saturating_mul(8);
    check_metadata("VHDX BAT", bat_bytes, limits)?;
    if bat_bytes > bat_region_len {
        return Err(FormatError::Corrupt(format!(
            "the BAT needs {bat_bytes} bytes, its region has {bat_region_len}"
        )));
    }
    let bat = read_exact(&r, bat_offset, bat_bytes as usize, "the VHDX BAT")?
        .chunks_exact(8)
        .map(|e| le64(e, 0))
        .collect();
    Ok(Box::new(Mapped {
        r,
        size,
        data_end: file_size,
        map: Map {
            bat,
            block_size,
            chunk_ratio,
        },
    }))
}

struct Map {
    bat: Vec<u64>,
    block_size: u64,
    chunk_ratio: u64,
}

impl Locate for Map {
    fn locate(&mut self, _: &dyn ReadAt, pos: u64) -> Result<Run, FormatError> {
        let block = pos / self.block_size;
        let within = pos % self.block_size;
        let len = self.block_size - within;
        // One sector-bitmap entry follows every chunk_ratio payload entries.
        let index = block + block / self.chunk_ratio;
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .ok_or_else(|| FormatError::Corrupt(format!("block {block} is beyond the BAT")))?;
        match entry & 7 {
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Ok(Run::Zero { len }),
            PAYLOAD_FULLY_PRESENT => {
                // The offset is in MiB, in bits 20..63; blocks never sit in the header section
                // (file identifier, headers, region tables).
                let start = (entry >> 20)
                    .checked_mul(MIB)
                    .filter(|&s| s >= HEADER_SECTION)
                    .ok_or_else(|| {
                        FormatError::Corrupt(format!(
                            "BAT entry {index} points at {} MiB, outside the data area",
                            entry >> 20
                        ))
                    })?;
                let at = start.checked_add(within).ok_or_else(|| {
                    FormatError::Corrupt(format!("BAT entry {index} points past any file"))
                })?;
                Ok(Run::Data { at, len })
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(FormatError::Unsupported {
                format: DiskFormat::Vhdx,
                detail: format!(
                    "block {block} is partially present (its other sectors are in a parent disk)"
                ),
            }),
            other => Err(FormatError::Corrupt(format!(
                "BAT entry {index} has unknown state {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::super::tests_support::{
        assert_matches, check_conversions, check_image, convert, open_file, qemu_convert, qemu_raw,
        read_all, read_damaged, sample_raw, write,
    };
    use super::super::super::vhdx::tests::{meta_item, region, u64_at};
    use super::super::super::{DiskFormat, FormatError};
    use super::{BAT_REGION, LOGICAL_SECTOR_SIZE};

    #[test]
    fn vhdx_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_, disk) = check_conversions(
            dir.path(),
            DiskFormat::Vhdx,
            "vhdx",
            "vhdx",
            &[
                ("dynamic", &["-o", "subformat=dynamic"]),
                ("fixed", &["-o", "subformat=fixed"]),
                ("small-blocks", &["-o", "block_size=1M"]),
                ("large-blocks", &["-o", "block_size=32M"]),
            ],
        );
        // Fixed disks start with every block in state ZERO (qemu's block_state_zero); without
        // it every block is FULLY_PRESENT, holes included. (On a disk whose size is a whole
        // number of blocks: qemu makes the file end at the disk's end, and the inspector
        // refuses a present last block that the file does not hold whole.)
        let whole = &disk[..20 << 20];
        let raw = dir.path().join("whole.raw");
        write(&raw, whole);
        let image = convert(
            &raw,
            dir.path().join("fixed-present.vhdx"),
            "vhdx",
            &["-o", "subformat=fixed,block_state_zero=off,block_size=4M"],
        );
        check_image(&image, DiskFormat::Vhdx, "vhdx", whole);
    }

    /// A disk over 4 GiB has more than one chunk (with 512-byte sectors): the BAT holds a
    /// sector-bitmap entry after the first chunk's payload entries, which must be skipped.
    /// With 4096-byte sectors (which qemu cannot create: patched in) a chunk is 32 GiB.
    #[test]
    fn vhdx_reads_past_the_first_chunk() {
        let dir = tempfile::tempdir().expect("tmp");
        let raw = dir.path().join("big.raw");
        let size = (4u64 << 30) + (24 << 20);
        let file = std::fs::File::create(&raw).expect("create");
        file.set_len(size).expect("sparse");
        let marks: [(u64, &[u8]); 4] = [
            (0, b"first block"),
            ((4 << 30) - 5, b"across the chunk"),
            ((4 << 30) + (9 << 20) + 7, b"second chunk"),
            (size - 4, b"end!"),
        ];
        for (at, bytes) in marks {
            file.write_all_at(bytes, at).expect("write");
        }
        drop(file);
        for (name, opts, sector_4k) in [
            ("1M", "block_size=1M", false),
            ("32M", "block_size=32M", false),
            ("1M-4k-sectors", "block_size=1M", true),
        ] {
            let image = convert(
                &raw,
                dir.path().join(format!("{name}.vhdx")),
                "vhdx",
                &["-o", opts],
            );
            if sector_4k {
                let mut data = std::fs::read(&image).expect("read");
                to_4k_sectors(&mut data, 1 << 20, size);
                write(&image, &data);
            }
            // qemu reads only 512-byte-sector VHDX (it refuses the others).
            let back = (!sector_4k).then(|| {
                let back = dir.path().join(format!("{name}.raw"));
                qemu_convert(&image, "vhdx", &back, "raw", &[]);
                std::fs::File::open(&back).expect("open")
            });
            let (_, mut reader) = open_file(&image, DiskFormat::Vhdx);
            assert_eq!(reader.virtual_size(), size);
            for (at, bytes) in marks {
                // A window of 3 MiB around each mark, read in one call.
                let from = at.saturating_sub(1 << 20) / 512 * 512;
                let to = (at + (2 << 20)).min(size);
                let mut got = vec![0u8; (to - from) as usize];
                reader.read_logical(&mut got, from).expect("reads");
                let mut want = vec![0u8; got.len()];
                let lo = (at - from) as usize;
                want[lo..lo + bytes.len()].copy_from_slice(bytes);
                assert!(got == want, "{name}: around {at}");
                // qemu's reading agrees (checked on windows, not 4 GiB).
                if let Some(back) = &back {
                    back.read_exact_at(&mut want, from).expect("read");
                    assert!(
                        got == want,
                        "{name}: differs from qemu-img convert around {at}"
                    );
                }
            }
            std::fs::remove_file(&image).expect("remove");
        }
    }

    /// Rewrites a qemu-made VHDX with 512-byte sectors and blocks of `block` bytes to say
    /// 4096-byte sectors: the BAT loses the sector-bitmap entry after the first 4 GiB chunk.
    fn to_4k_sectors(data: &mut [u8], block: u64, size: u64) {
        let at = meta_item(data, &LOGICAL_SECTOR_SIZE);
        data[at..at + 4].copy_from_slice(&4096u32.to_le_bytes());
        let bat = region(data, &BAT_REGION);
        let ratio = usize::try_from((1u64 << 32) / block).expect("ratio");
        let blocks = usize::try_from(size.div_ceil(block)).expect("blocks");
        assert!(blocks > ratio, "more than one chunk");
        assert_eq!(u64_at(data, bat + 8 * ratio), 0, "the sector-bitmap entry");
        data.copy_within(
            bat + 8 * (ratio + 1)..bat + 8 * (blocks + 1),
            bat + 8 * ratio,
        );
        data[bat + 8 * blocks..bat + 8 * (blocks + 1)].fill(0);
    }

    /// ZERO and UNMAPPED blocks read as zeroes (as in qemu); a block pointed past the end of
    /// the file, into the header section, or partially present is an error, never a panic.
    #[test]
    fn vhdx_block_states_and_bad_bat() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let image = convert(
            &raw,
            dir.path().join("d.vhdx"),
            "vhdx",
            &["-o", "block_size=1M"],
        );
        let (info, _) = open_file(&image, DiskFormat::Vhdx);
        let data = std::fs::read(&image).expect("read");
        let bat = region(&data, &BAT_REGION);
        assert_eq!(u64_at(&data, bat) & 7, 6, "block 0 is present");
        assert_eq!(u64_at(&data, bat + 16) & 7, 6, "block 2 is present");

        let mut zeroed = data.clone();
        zeroed[bat] = (zeroed[bat] & !7) | 2; // ZERO
        zeroed[bat + 16] = (zeroed[bat + 16] & !7) | 3; // UNMAPPED
        let path = dir.path().join("zeroed.vhdx");
        write(&path, &zeroed);
        let (_, mut reader) = open_file(&path, DiskFormat::Vhdx);
        let got = read_all(&mut *reader).expect("reads");
        let mut want = disk.clone();
        want[..1 << 20].fill(0);
        want[2 << 20..3 << 20].fill(0);
        assert!(got == want, "ZERO and UNMAPPED blocks read as zeroes");
        assert!(got == qemu_raw(&path, "vhdx"), "as qemu reads them");

        let n = data.len() as u64;
        for (what, entry) in [
            ("past the end of the file", ((n >> 20) + 5) << 20 | 6),
            ("in the header section", 6),
            ("huge", !1u64),
            ("partially present", 7),
            ("unknown state", 4),
        ] {
            let mut bad = data.clone();
            bad[bat..bat + 8].copy_from_slice(&entry.to_le_bytes());
            assert_matches!(
                read_damaged(dir.path(), &bad, &info),
                Err(FormatError::Corrupt(_) | FormatError::Unsupported { .. }),
                "{what}"
            );
        }
    }
}
