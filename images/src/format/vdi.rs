//! VDI (VirtualBox Disk Image), header version 1.x, normal (dynamic) and fixed images only.
//!
//! Layout (all fields little-endian): a 64-byte text pre-header, the signature 0xBEDA107F at
//! 0x40, the version at 0x44, then the v1 header (VirtualBox's VDIHEADER1 / VDIHEADER1PLUS)
//! from 0x48. The block map (one u32 per virtual block: an index into the data area, or
//! free/zero) sits at `offBlocks`; allocated blocks follow each other from `offData`.

use super::{
    DiskFormat, FormatError, Limits, ReadAt, check_metadata, check_size, le32, le64, read_exact,
    read_some,
};

const SIGNATURE: u32 = 0xBEDA_107F;
const SIGNATURE_AT: u64 = 0x40;
/// Pre-header (64 bytes of text, signature, version) plus VDIHEADER1, the smallest v1 header.
pub(super) const HEADER_END: usize = 0x48 + 0x180;

// Header fields (absolute offsets).
const VERSION: usize = 0x44;
const HEADER_SIZE: usize = 0x48;
const IMAGE_TYPE: usize = 0x4C;
pub(super) const OFF_BLOCKS: usize = 0x154;
pub(super) const OFF_DATA: usize = 0x158;
pub(super) const DISK_SIZE: usize = 0x170;
const BLOCK_SIZE: usize = 0x178;
const BLOCK_EXTRA: usize = 0x17C;
pub(super) const BLOCKS: usize = 0x180;
const BLOCKS_ALLOCATED: usize = 0x184;
const UUID_LINKAGE: usize = 0x1A8;
const UUID_PARENT_MODIFY: usize = 0x1B8;

const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;

/// Never written: reads as zeroes (qemu's VDI_UNALLOCATED).
pub(super) const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Discarded or explicitly zero: reads as zeroes (qemu's VDI_DISCARDED).
pub(super) const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

/// Smallest block size accepted (one sector).
const MIN_BLOCK: u32 = 512;
/// Largest block size accepted; VirtualBox and qemu use 1 MiB, nothing real goes near this.
const MAX_BLOCK: u32 = 256 << 20;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    // The signature after the 64-byte text pre-header is what identifies a VDI.
    let b = read_some(r, SIGNATURE_AT, 4)?;
    Ok(b.len() == 4 && le32(&b, 0) == SIGNATURE)
}

pub(super) fn inspect(r: &dyn ReadAt, limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    let h = read_exact(r, 0, HEADER_END, "VDI header")?;
    // inspect() runs only after probe(); the signature is re-checked so this function stands
    // on its own.
    let version = check_version(&h)?;
    let header_size = le32(&h, HEADER_SIZE);
    // A v1 header shorter than VDIHEADER1 would leave the fields below undefined.
    if u64::from(header_size) < (HEADER_END - 0x48) as u64 {
        return Err(FormatError::Corrupt(format!(
            "header size {header_size} is smaller than a v1 header (384)"
        )));
    }

    let image_type = check_type(&h)?;
    // A parent UUID links this image to another one it reads through to.
    for at in [UUID_LINKAGE, UUID_PARENT_MODIFY] {
        if h.get(at..at + 16)
            .is_some_and(|u| u.iter().any(|&b| b != 0))
        {
            return Err(FormatError::Differencing);
        }
    }

    let disk_size = le64(&h, DISK_SIZE);
    // The size callers will see must be within limits before anything is sized from it.
    check_size(disk_size, limits)?;
    // VirtualBox refuses an empty disk; a zero size means a damaged header.
    if disk_size == 0 {
        return Err(FormatError::Corrupt("disk size is 0".into()));
    }
    let block_size = check_blocks(&h)?;
    let blocks = le32(&h, BLOCKS);
    let allocated = le32(&h, BLOCKS_ALLOCATED);
    let bmap_bytes = u64::from(blocks) * 4;
    // The block map is read whole; its size must be bounded before it is allocated.
    check_metadata("VDI block map", bmap_bytes, limits)?;
    // The block map must cover the whole disk, or reads past its end index beyond it.
    if u64::from(blocks) * u64::from(block_size) < disk_size {
        return Err(FormatError::Corrupt(format!(
            "{blocks} blocks of {block_size} bytes do not cover the disk size {disk_size}"
        )));
    }
    // More allocated blocks than blocks means the counters are damaged.
    if allocated > blocks {
        return Err(FormatError::Corrupt(format!(
            "{allocated} blocks allocated out of {blocks}"
        )));
    }

    let off_blocks = u64::from(le32(&h, OFF_BLOCKS));
    let off_data = u64::from(le32(&h, OFF_DATA));
    let bmap_end = off_blocks + bmap_bytes;
    // The block map must follow the header, not overlap it.
    if off_blocks < HEADER_END as u64 || off_blocks < 0x48 + u64::from(header_size) {
        return Err(FormatError::Corrupt(format!(
            "block map offset {off_blocks} overlaps the header"
        )));
    }
    // The data area must follow the block map, or block writes would rewrite the map.
    if off_data < bmap_end {
        return Err(FormatError::Corrupt(format!(
            "data offset {off_data} overlaps the block map ({off_blocks}..{bmap_end})"
        )));
    }
    // Both must lie inside the file.
    if off_data > file_size {
        return Err(FormatError::Corrupt(format!(
            "data offset {off_data} is beyond the file ({file_size} bytes)"
        )));
    }
    let data_end = off_data + u64::from(allocated) * u64::from(block_size);
    // Allocated blocks are stored whole; a shorter file lost some of them.
    if data_end > file_size {
        return Err(FormatError::Truncated(format!(
            "{allocated} allocated blocks need {data_end} bytes, the file has {file_size}"
        )));
    }

    let bmap_len = usize::try_from(bmap_bytes).map_err(|_| FormatError::MetadataTooLarge {
        what: "VDI block map",
        size: bmap_bytes,
        limit: limits.max_metadata_bytes,
    })?;
    let bmap = read_exact(r, off_blocks, bmap_len, "VDI block map")?;
    let mut seen = vec![0u64; (allocated as usize).div_ceil(64)];
    for (i, e) in bmap.chunks_exact(4).enumerate() {
        let index = le32(e, 0);
        if index == BLOCK_FREE || index == BLOCK_ZERO {
            continue;
        }
        // An index past the allocated count points outside the data area.
        if index >= allocated {
            return Err(FormatError::Corrupt(format!(
                "block {i} maps to data block {index}, only {allocated} are allocated"
            )));
        }
        // Two virtual blocks sharing one data block would let a write to one change the other.
        let (word, bit) = ((index / 64) as usize, index % 64);
        match seen.get_mut(word) {
            Some(w) if *w & (1 << bit) == 0 => *w |= 1 << bit,
            _ => {
                return Err(FormatError::Corrupt(format!(
                    "data block {index} is mapped twice"
                )));
            }
        }
    }

    let kind = if image_type == TYPE_FIXED {
        "fixed"
    } else {
        "dynamic"
    };
    let mut findings = vec![format!("vdi {kind}, block size {block_size}")];
    if version != 0x0001_0001 {
        findings.push(format!(
            "header version {}.{}",
            version >> 16,
            version & 0xFFFF
        ));
    }
    findings.push(format!("{allocated} of {blocks} blocks allocated"));
    Ok((disk_size, findings))
}

/// The header's version, if it carries the VDI signature and its layout is the 1.x one the
/// field offsets here describe (0.x is laid out differently).
pub(super) fn check_version(h: &[u8]) -> Result<u32, FormatError> {
    if le32(h, SIGNATURE_AT as usize) != SIGNATURE {
        return Err(FormatError::Corrupt(
            "no VDI signature at offset 0x40".into(),
        ));
    }
    let version = le32(h, VERSION);
    if version >> 16 != 1 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vdi,
            detail: format!("header version {}.{}", version >> 16, version & 0xFFFF),
        });
    }
    Ok(version)
}

/// The image type, if it is a normal (dynamic) or fixed image.
pub(super) fn check_type(h: &[u8]) -> Result<u32, FormatError> {
    match le32(h, IMAGE_TYPE) {
        t @ (TYPE_NORMAL | TYPE_FIXED) => Ok(t),
        // Undo and differencing images hold only changes against a parent image.
        TYPE_UNDO | TYPE_DIFF => Err(FormatError::Differencing),
        // Any other type is undefined.
        other => Err(FormatError::Corrupt(format!("unknown image type {other}"))),
    }
}

/// The block size, if blocks can be found with it: a power of two within bounds (blocks are
/// found by shifting and division, so a zero or absurd size is a damaged header) and no
/// per-block extra data (it would shift every block's data; nothing writes it and qemu
/// refuses it).
pub(super) fn check_blocks(h: &[u8]) -> Result<u32, FormatError> {
    let block_size = le32(h, BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )));
    }
    let block_extra = le32(h, BLOCK_EXTRA);
    if block_extra != 0 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vdi,
            detail: format!("{block_extra} bytes of extra data per block"),
        });
    }
    Ok(block_size)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::tests_support::{
        assert_matches, create as qemu_create, flips_never_panic, have_qemu,
    };
    use super::super::{DiskFormat, DiskInfo, FormatError, Limits, inspect};
    use super::{
        BLOCKS, DISK_SIZE, IMAGE_TYPE, OFF_BLOCKS, OFF_DATA, UUID_LINKAGE, UUID_PARENT_MODIFY,
    };

    /// Creates a 64 MiB vdi image with data written in blocks 1 and 5.
    fn create(dir: &Path, name: &str, fixed: bool) -> PathBuf {
        let static_opt = if fixed { "static=on" } else { "static=off" };
        let writes = ["write -P 0xab 1M 64k", "write -P 0xcd 5M 64k"];
        qemu_create(dir, name, "vdi", &["-o", static_opt], "64M", &writes)
    }

    fn check(data: &[u8]) -> Result<DiskInfo, FormatError> {
        inspect(&data, DiskFormat::Vdi, &Limits::default())
    }

    fn dynamic() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "d.vdi", false);
        let data = std::fs::read(path).expect("read");
        (dir, data)
    }

    fn put32(data: &mut [u8], at: usize, v: u32) {
        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(data: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
    }

    #[test]
    fn accepts_dynamic_and_fixed() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, fixed, kind) in [
            ("d.vdi", false, "vdi dynamic"),
            ("f.vdi", true, "vdi fixed"),
        ] {
            let path = create(dir.path(), name, fixed);
            let file = std::fs::File::open(&path).expect("open");
            let info = inspect(&file, DiskFormat::Vdi, &Limits::default()).expect("accepted");
            assert_eq!(info.virtual_size, 64 << 20, "{name}");
            assert!(
                info.findings[0].starts_with(kind),
                "{name}: {:?}",
                info.findings
            );
        }
    }

    #[test]
    fn refuses_differencing() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        for t in [3, 4] {
            let mut bad = data.clone();
            put32(&mut bad, IMAGE_TYPE, t);
            assert_matches!(check(&bad), Err(FormatError::Differencing), "type {t}");
        }
        for at in [UUID_LINKAGE, UUID_PARENT_MODIFY] {
            let mut bad = data.clone();
            bad[at + 3] = 0x42;
            assert_matches!(
                check(&bad),
                Err(FormatError::Differencing),
                "uuid at {at:#x}"
            );
        }
        let mut bad = data.clone();
        put32(&mut bad, IMAGE_TYPE, 9);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_huge_virtual_size() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        data[DISK_SIZE..DISK_SIZE + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert_matches!(check(&data), Err(FormatError::TooLarge { .. }));
    }

    #[test]
    fn refuses_block_map_over_limit() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let limits = Limits {
            max_metadata_bytes: 128,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Vdi, &limits);
        assert_matches!(got, Err(FormatError::MetadataTooLarge { .. }));
        let mut bad = data.clone();
        put32(&mut bad, BLOCKS, 0x4000_0000);
        assert_matches!(check(&bad), Err(FormatError::MetadataTooLarge { .. }));
    }

    #[test]
    fn refuses_inconsistent_header() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let cases: [(&str, usize, u32); 9] = [
            ("header size too small", 0x48, 100),
            ("block size not a power of two", 0x178, 3 << 20),
            ("block size zero", 0x178, 0),
            ("too few blocks", BLOCKS, 10),
            ("more allocated than blocks", 0x184, 65),
            ("block map over the header", OFF_BLOCKS, 0x100),
            ("data over the block map", OFF_DATA, 600),
            ("data beyond the file", OFF_DATA, 0x7000_0000),
            ("disk size zero", DISK_SIZE, 0),
        ];
        for (what, at, v) in cases {
            let mut bad = data.clone();
            put32(&mut bad, at, v);
            if at == DISK_SIZE {
                put32(&mut bad, at + 4, 0);
            }
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "{what}");
        }
        let mut bad = data.clone();
        put32(&mut bad, 0x17C, 512);
        assert_matches!(check(&bad), Err(FormatError::Unsupported { .. }));
        let mut bad = data.clone();
        put32(&mut bad, 0x44, 0x0000_0002);
        assert_matches!(check(&bad), Err(FormatError::Unsupported { .. }));
    }

    #[test]
    fn refuses_bad_block_map() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let bmap = get32(&data, OFF_BLOCKS) as usize;
        assert_eq!(get32(&data, bmap + 4), 0, "qemu-io allocated block 1 first");
        assert_eq!(
            get32(&data, bmap + 20),
            1,
            "qemu-io allocated block 5 second"
        );
        // An index past the allocated blocks.
        let mut bad = data.clone();
        put32(&mut bad, bmap + 8, 2);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // Two virtual blocks sharing one data block.
        let mut bad = data.clone();
        put32(&mut bad, bmap + 20, 0);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_truncated() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        for cut in [
            0x44,
            0x100,
            0x1C7,
            0x200,
            0x300,
            0x400,
            0x401,
            1 << 20,
            data.len() - 1,
        ] {
            assert_matches!(
                check(&data[..cut]),
                Err(FormatError::Truncated(_) | FormatError::Corrupt(_)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn never_panics_on_prefixes_or_flips() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let n = data.len();
        flips_never_panic(
            &data,
            DiskFormat::Vdi,
            (0..4096.min(n)).chain((4096..n).step_by(4093)),
            0x0123_4567_89AB_CDEF,
            5000,
            // Mostly the numeric header fields and the block map.
            |r| {
                if r.is_multiple_of(4) {
                    0x40 + r / 4 % 0x10
                } else {
                    0x150 + r / 4 % 0x1B0
                }
            },
            |_, _| {},
        );
    }
}
