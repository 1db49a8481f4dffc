//! VHDX as its logical disk: region table 1 names the BAT and metadata regions; the metadata
//! gives the block size, the logical sector size and the virtual size; the BAT interleaves
//! one sector-bitmap entry after every `chunk_ratio` payload entries.
//!
//! Payload states NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED read as zeroes (as in qemu: the
//! disk has no parent); FULLY_PRESENT blocks are read from their offset; PARTIALLY_PRESENT
//! needs a parent's sector bitmap and is refused. The log is never replayed: the inspector
//! refuses images with a pending log.

use super::super::{
    DiskFormat, DiskInfo, FormatError, Limits, ReadAt, check_metadata, le16, le32, le64, read_exact,
};
use super::Logical;
use super::vhd::{Run, read_runs, same_size};

const MIB: u64 = 1 << 20;
/// Region table 1 (qemu reads only this copy; the inspector checked both agree).
const REGION_TABLE_OFFSET: u64 = 192 << 10;
const REGION_TABLE_LEN: usize = 64 << 10;
const REGION_SIG: &[u8] = b"regi";
const METADATA_TABLE_LEN: usize = 64 << 10;
const METADATA_SIG: &[u8] = b"metadata";
/// The header section (file identifier, headers, region tables): no block lives there.
const HEADER_SECTION: u64 = MIB;
const MIN_BLOCK: u32 = 1 << 20;
const MAX_BLOCK: u32 = 256 << 20;
const HAS_PARENT: u32 = 2;

// BAT entry states (qemu's vhdx.h; 5 is UNMAPPED in spec draft 0.95, which qemu also reads
// as zeroes).
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_UNMAPPED_V095: u64 = 5;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

type Guid = [u8; 16];

/// A GUID as stored on disk: the first three fields little-endian, the last eight bytes as is.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const BAT_REGION: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let rt = read_exact(
        &r,
        REGION_TABLE_OFFSET,
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
    // Blocks and chunks are found by division: zero or absurd sizes must not get there.
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    if sector != 512 && sector != 4096 {
        return Err(FormatError::Corrupt(format!(
            "logical sector size {sector} is neither 512 nor 4096"
        )));
    }
    let block_size = u64::from(block_size);
    let chunk_ratio = ((1u64 << 23) * u64::from(sector)) / block_size;
    let data_blocks = size.div_ceil(block_size);
    let entries = data_blocks + data_blocks.saturating_sub(1) / chunk_ratio;
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
    Ok(Box::new(Vhdx {
        r,
        size,
        file_size,
        map: Map {
            bat,
            block_size,
            chunk_ratio,
        },
    }))
}

struct Vhdx<R> {
    r: R,
    size: u64,
    file_size: u64,
    map: Map,
}

struct Map {
    bat: Vec<u64>,
    block_size: u64,
    chunk_ratio: u64,
}

impl Map {
    fn locate(&self, pos: u64) -> Result<Run, FormatError> {
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
                // The offset is in MiB, in bits 20..63; blocks never sit in the header section.
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

impl<R: ReadAt + Send> Logical for Vhdx<R> {
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
    use std::os::unix::fs::FileExt;

    use super::super::super::tests_support::qemu_img;
    use super::super::super::{DiskFormat, FormatError};
    use super::super::vhd::testing::{
        check_image, convert_to, open_file, qemu_raw, read_all, read_damaged, sample_raw,
    };
    use super::{BAT_REGION, Guid, LOGICAL_SECTOR_SIZE, METADATA_REGION};

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Offset of the region with this GUID, from region table 1.
    fn region(data: &[u8], g: &Guid) -> usize {
        let rt = 192 << 10;
        let n = u32::from_le_bytes(data[rt + 8..rt + 12].try_into().expect("4")) as usize;
        (0..n)
            .map(|i| rt + 16 + 32 * i)
            .find(|&e| data[e..e + 16] == g[..])
            .map(|e| usize::try_from(u64_at(data, e + 16)).expect("offset"))
            .expect("region present")
    }

    #[test]
    fn vhdx_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        for (name, opts) in [
            ("dynamic", "subformat=dynamic"),
            ("fixed", "subformat=fixed"),
            ("small-blocks", "block_size=1M"),
            ("large-blocks", "block_size=32M"),
        ] {
            let image = dir.path().join(format!("{name}.vhdx"));
            convert_to(&raw, &image, "vhdx", &["-o", opts]);
            check_image(&image, DiskFormat::Vhdx, "vhdx", &disk);
        }
        // Fixed disks start with every block in state ZERO (qemu's block_state_zero); without
        // it every block is FULLY_PRESENT, holes included. (On a disk whose size is a whole
        // number of blocks: qemu makes the file end at the disk's end, and the inspector
        // refuses a present last block that the file does not hold whole.)
        let whole = &disk[..20 << 20];
        let raw = dir.path().join("whole.raw");
        std::fs::write(&raw, whole).expect("write");
        let image = dir.path().join("fixed-present.vhdx");
        convert_to(
            &raw,
            &image,
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
            let image = dir.path().join(format!("{name}.vhdx"));
            convert_to(&raw, &image, "vhdx", &["-o", opts]);
            if sector_4k {
                let mut data = std::fs::read(&image).expect("read");
                to_4k_sectors(&mut data, 1 << 20, size);
                std::fs::write(&image, &data).expect("write");
            }
            // qemu reads only 512-byte-sector VHDX (it refuses the others).
            let back = (!sector_4k).then(|| {
                let back = dir.path().join(format!("{name}.raw"));
                qemu_img(&[
                    "convert",
                    "-q",
                    "-f",
                    "vhdx",
                    "-O",
                    "raw",
                    image.to_str().expect("p"),
                    back.to_str().expect("p"),
                ]);
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
        let meta = region(data, &METADATA_REGION);
        let count = usize::from(u16::from_le_bytes([data[meta + 10], data[meta + 11]]));
        let entry = (0..count)
            .map(|i| meta + 32 + 32 * i)
            .find(|&e| data[e..e + 16] == LOGICAL_SECTOR_SIZE[..])
            .expect("sector size item");
        let at =
            meta + u32::from_le_bytes(data[entry + 16..entry + 20].try_into().expect("4")) as usize;
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
        let image = dir.path().join("d.vhdx");
        convert_to(&raw, &image, "vhdx", &["-o", "block_size=1M"]);
        let (info, _) = open_file(&image, DiskFormat::Vhdx);
        let data = std::fs::read(&image).expect("read");
        let bat = region(&data, &BAT_REGION);
        assert_eq!(u64_at(&data, bat) & 7, 6, "block 0 is present");
        assert_eq!(u64_at(&data, bat + 16) & 7, 6, "block 2 is present");

        let mut zeroed = data.clone();
        zeroed[bat] = (zeroed[bat] & !7) | 2; // ZERO
        zeroed[bat + 16] = (zeroed[bat + 16] & !7) | 3; // UNMAPPED
        let path = dir.path().join("zeroed.vhdx");
        std::fs::write(&path, &zeroed).expect("write");
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
            let got = read_damaged(dir.path(), &bad, &info);
            assert!(
                matches!(
                    got,
                    Err(FormatError::Corrupt(_) | FormatError::Unsupported { .. })
                ),
                "{what}: {:?}",
                got.map(|_| ())
            );
        }
    }
}
