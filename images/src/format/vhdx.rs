//! VHDX (Microsoft Hyper-V virtual hard disk v2): fixed and dynamic disks only.
//!
//! Layout (all fields little-endian): the file identifier "vhdxfile" at 0; two 4 KiB headers
//! at 64 KiB and 128 KiB (the valid one with the higher sequence number is current); two
//! copies of a 64 KiB region table at 192 KiB and 256 KiB naming the BAT and metadata regions;
//! the metadata region starts with a 64 KiB table of items (virtual size, block size, ...).
//! Headers and region tables carry a CRC-32C over their whole extent, checksum field zeroed.

use super::{
    DiskFormat, FormatError, Limits, ReadAt, check_metadata, check_size, le16, le32, le64,
    read_exact, read_some,
};

const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
const FILE_ID: &[u8] = b"vhdxfile";
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: usize = 4 << 10;
const HEADER_SIG: &[u8] = b"head";
pub(super) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(super) const REGION_TABLE_LEN: usize = 64 << 10;
pub(super) const REGION_SIG: &[u8] = b"regi";
const MAX_REGION_ENTRIES: u32 = 2047;
pub(super) const METADATA_TABLE_LEN: usize = 64 << 10;
pub(super) const METADATA_SIG: &[u8] = b"metadata";
const MAX_METADATA_ENTRIES: u16 = 2047;
/// The header section (file identifier, headers, region tables) is the first 1 MiB.
pub(super) const HEADER_SECTION: u64 = MIB;
/// The spec's largest virtual disk.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
const MIN_BLOCK: u32 = 1 << 20;
const MAX_BLOCK: u32 = 256 << 20;

// Header fields.
const H_SEQUENCE: usize = 8;
const H_LOG_GUID: usize = 48;
const H_VERSION: usize = 66;
const H_LOG_LENGTH: usize = 68;
const H_LOG_OFFSET: usize = 72;

// File Parameters flags.
const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub(super) const HAS_PARENT: u32 = 2;
// Metadata entry flags.
const IS_REQUIRED: u32 = 4;

// BAT entry states (qemu's vhdx.h).
pub(super) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(super) const PAYLOAD_UNDEFINED: u64 = 1;
pub(super) const PAYLOAD_ZERO: u64 = 2;
pub(super) const PAYLOAD_UNMAPPED: u64 = 3;
/// UNMAPPED in spec draft 0.95: the reader reads it as zeroes, as qemu does (the inspector
/// refuses states 4 and 5 as undefined).
pub(super) const PAYLOAD_UNMAPPED_V095: u64 = 5;
pub(super) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(super) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const SB_NOT_PRESENT: u64 = 0;

pub(super) type Guid = [u8; 16];

/// A GUID as stored on disk: the first three fields little-endian, the last eight bytes as is.
pub(super) const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

pub(super) const BAT_REGION: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(super) const METADATA_REGION: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
pub(super) const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(super) const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE_83_DATA: Guid = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(super) const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: Guid = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    // Every VHDX starts with its file type identifier.
    Ok(read_some(r, 0, FILE_ID.len())? == FILE_ID)
}

struct Region {
    guid: Guid,
    offset: u64,
    length: u64,
    required: bool,
}

struct MetaItem {
    guid: Guid,
    offset: u32,
    length: u32,
    required: bool,
}

pub(super) fn inspect(r: &dyn ReadAt, limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    let mut findings = Vec::new();

    // --- Headers: the valid one with the higher sequence number is current.
    let h1 = read_exact(r, HEADER_OFFSETS[0], HEADER_LEN, "VHDX header 1")?;
    let h2 = read_exact(r, HEADER_OFFSETS[1], HEADER_LEN, "VHDX header 2")?;
    // A header is usable only with its signature and an intact CRC (a torn update leaves the
    // other copy current).
    let valid = |h: &[u8]| h.starts_with(HEADER_SIG) && crc_ok(h);
    let header = match (valid(&h1), valid(&h2)) {
        (false, false) => {
            return Err(FormatError::Corrupt(
                "neither VHDX header is valid (signature or CRC-32C)".into(),
            ));
        }
        (true, false) => h1,
        (false, true) => {
            findings.push("header 1 is invalid; header 2 is current".into());
            h2
        }
        (true, true) => {
            let (s1, s2) = (le64(&h1, H_SEQUENCE), le64(&h2, H_SEQUENCE));
            // Equal sequence numbers leave the current header undefined unless both say the
            // same thing (Disk2vhd writes identical copies).
            if s1 == s2 && h1 != h2 {
                return Err(FormatError::Corrupt(format!(
                    "both headers claim sequence number {s1} but differ"
                )));
            }
            if s2 > s1 { h2 } else { h1 }
        }
    };
    let version = le16(&header, H_VERSION);
    // Only version 1 is specified; another version may lay the file out differently.
    if version != 1 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vhdx,
            detail: format!("header version {version}"),
        });
    }
    // A non-zero log GUID means the log may hold metadata writes not yet applied: what we
    // would inspect is not what a reader sees after replaying it.
    if header
        .get(H_LOG_GUID..H_LOG_GUID + 16)
        .is_some_and(|g| g.iter().any(|&b| b != 0))
    {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vhdx,
            detail:
                "the log holds unapplied writes (not closed cleanly); open it once with Hyper-V or \
                     run qemu-img check -r all first"
                    .into(),
        });
    }
    let log_offset = le64(&header, H_LOG_OFFSET);
    let log_length = u64::from(le32(&header, H_LOG_LENGTH));
    let log_end = checked_end(log_offset, log_length, "log")?;
    if log_length != 0 {
        // The log is allocated in 1 MiB units after the header section, inside the file.
        if !log_offset.is_multiple_of(MIB)
            || !log_length.is_multiple_of(MIB)
            || log_offset < HEADER_SECTION
            || log_end > file_size
        {
            return Err(FormatError::Corrupt(format!(
                "log {log_offset}..{log_end} is misaligned or outside the file ({file_size} bytes)"
            )));
        }
    }

    // --- Region table: where the BAT and metadata live.
    let rt1 = read_exact(
        r,
        REGION_TABLE_OFFSETS[0],
        REGION_TABLE_LEN,
        "VHDX region table 1",
    )?;
    let rt2 = read_exact(
        r,
        REGION_TABLE_OFFSETS[1],
        REGION_TABLE_LEN,
        "VHDX region table 2",
    )?;
    // qemu reads only the first copy; it must be intact.
    if !(rt1.starts_with(REGION_SIG) && crc_ok(&rt1)) {
        return Err(FormatError::Corrupt(
            "region table 1 is invalid (signature or CRC-32C)".into(),
        ));
    }
    if rt2.starts_with(REGION_SIG) && crc_ok(&rt2) {
        // A reader falling back to the second copy must find the same regions.
        if rt1 != rt2 {
            return Err(FormatError::Corrupt(
                "the two region tables are valid but differ".into(),
            ));
        }
    } else {
        findings.push("region table 2 is invalid; region table 1 is used".into());
    }
    let count = le32(&rt1, 8);
    // The spec caps the table at 2047 entries (what fits in 64 KiB).
    if count > MAX_REGION_ENTRIES {
        return Err(FormatError::Corrupt(format!(
            "region table has {count} entries (at most {MAX_REGION_ENTRIES})"
        )));
    }
    let mut regions: Vec<Region> = Vec::new();
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let e = rt1
            .get(at..at + 32)
            .ok_or_else(|| FormatError::Corrupt("region table entry out of range".into()))?;
        let region = Region {
            guid: guid_at(e, 0),
            offset: le64(e, 16),
            length: u64::from(le32(e, 24)),
            required: le32(e, 28) & 1 != 0,
        };
        let end = checked_end(region.offset, region.length, "region")?;
        // Regions are 1 MiB-aligned, non-empty, after the header section and inside the file.
        if !region.offset.is_multiple_of(MIB)
            || !region.length.is_multiple_of(MIB)
            || region.length == 0
            || region.offset < HEADER_SECTION
            || end > file_size
        {
            return Err(FormatError::Corrupt(format!(
                "region {} at {}..{end} is misaligned, empty or outside the file ({file_size} bytes)",
                fmt_guid(&region.guid),
                region.offset
            )));
        }
        // A region listed twice is ambiguous: readers may pick either.
        if regions.iter().any(|r| r.guid == region.guid) {
            return Err(FormatError::Corrupt(format!(
                "region {} is listed twice",
                fmt_guid(&region.guid)
            )));
        }
        // A required region we do not know changes how the file must be read.
        if region.required && region.guid != BAT_REGION && region.guid != METADATA_REGION {
            return Err(FormatError::Unsupported {
                format: DiskFormat::Vhdx,
                detail: format!("unknown required region {}", fmt_guid(&region.guid)),
            });
        }
        regions.push(region);
    }
    let find = |g: &Guid, what: &str| {
        regions
            .iter()
            .find(|r| r.guid == *g)
            .map(|r| (r.offset, r.length))
            .ok_or_else(|| FormatError::Corrupt(format!("no {what} region")))
    };
    // Both regions are mandatory: without them there is no size and no block map.
    let (bat_offset, bat_region_len) = find(&BAT_REGION, "BAT")?;
    let (meta_offset, meta_len) = find(&METADATA_REGION, "metadata")?;
    // Fixed structures (header section, log, regions) must not overlap one another.
    let mut fixed: Vec<(u64, u64, String)> = vec![(0, HEADER_SECTION, "the header section".into())];
    if log_length != 0 {
        fixed.push((log_offset, log_end, "the log".into()));
    }
    for region in &regions {
        fixed.push((
            region.offset,
            region.offset + region.length,
            format!("region {}", fmt_guid(&region.guid)),
        ));
    }
    check_fixed_disjoint(&mut fixed)?;

    // --- Metadata table.
    let table = read_exact(r, meta_offset, METADATA_TABLE_LEN, "VHDX metadata table")?;
    // A wrong signature means the region does not hold a metadata table.
    if !table.starts_with(METADATA_SIG) {
        return Err(FormatError::Corrupt(format!(
            "no metadata table signature at offset {meta_offset}"
        )));
    }
    let count = le16(&table, 10);
    // The spec caps the table at 2047 entries (what fits in 64 KiB).
    if count > MAX_METADATA_ENTRIES {
        return Err(FormatError::Corrupt(format!(
            "metadata table has {count} entries (at most {MAX_METADATA_ENTRIES})"
        )));
    }
    let mut items: Vec<MetaItem> = Vec::new();
    for i in 0..usize::from(count) {
        let at = 32 + 32 * i;
        let e = table
            .get(at..at + 32)
            .ok_or_else(|| FormatError::Corrupt("metadata entry out of range".into()))?;
        let item = MetaItem {
            guid: guid_at(e, 0),
            offset: le32(e, 16),
            length: le32(e, 20),
            required: le32(e, 24) & IS_REQUIRED != 0,
        };
        // A parent locator names the parent file a differencing disk reads through to.
        if item.guid == PARENT_LOCATOR {
            return Err(FormatError::Differencing);
        }
        if item.length != 0 {
            let end = u64::from(item.offset) + u64::from(item.length);
            // Item data lies after the table and inside the metadata region.
            if u64::from(item.offset) < METADATA_TABLE_LEN as u64 || end > meta_len {
                return Err(FormatError::Corrupt(format!(
                    "metadata item {} at {}..{end} is outside the metadata region (64 KiB..{meta_len})",
                    fmt_guid(&item.guid),
                    item.offset
                )));
            }
        }
        // An item listed twice is ambiguous: readers may pick either.
        if items.iter().any(|m| m.guid == item.guid) {
            return Err(FormatError::Corrupt(format!(
                "metadata item {} is listed twice",
                fmt_guid(&item.guid)
            )));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
        ];
        // A required item we cannot interpret may change what the disk means.
        if item.required && !known.contains(&item.guid) {
            return Err(FormatError::Unsupported {
                format: DiskFormat::Vhdx,
                detail: format!("unknown required metadata item {}", fmt_guid(&item.guid)),
            });
        }
        items.push(item);
    }
    let read_item = |g: &Guid, what: &'static str, need: usize| -> Result<Vec<u8>, FormatError> {
        let item = items
            .iter()
            .find(|m| m.guid == *g)
            .ok_or_else(|| FormatError::Corrupt(format!("the metadata has no {what} item")))?;
        // A short item would make us read the neighbouring item's bytes as this one.
        if u64::from(item.length) < need as u64 {
            return Err(FormatError::Corrupt(format!(
                "the {what} item is {} bytes, needs {need}",
                item.length
            )));
        }
        read_exact(
            r,
            meta_offset.saturating_add(u64::from(item.offset)),
            need,
            what,
        )
    };

    let params = read_item(&FILE_PARAMETERS, "file parameters", 8)?;
    let flags = le32(&params, 4);
    // A disk with a parent reads unallocated blocks from another file.
    if flags & HAS_PARENT != 0 {
        return Err(FormatError::Differencing);
    }
    let virtual_size = le64(&read_item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    // The size callers will see must be within limits before anything is sized from it.
    check_size(virtual_size, limits)?;
    // The spec caps virtual disks at 64 TiB; more is a damaged or hostile header.
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(FormatError::Corrupt(format!(
            "virtual size {virtual_size} exceeds the format's 64 TiB"
        )));
    }
    let block_size = le32(&params, 0);
    check_block_size(block_size)?;
    let logical_sector = le32(
        &read_item(&LOGICAL_SECTOR_SIZE, "logical sector size", 4)?,
        0,
    );
    // Only 512 and 4096 are specified; the sector size also sets the BAT's chunk ratio.
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(FormatError::Corrupt(format!(
            "logical sector size {logical_sector} is neither 512 nor 4096"
        )));
    }
    // The disk is addressed in logical sectors; a partial sector means a damaged header.
    if !virtual_size.is_multiple_of(u64::from(logical_sector)) {
        return Err(FormatError::Corrupt(format!(
            "virtual size {virtual_size} is not a multiple of the logical sector size {logical_sector}"
        )));
    }
    if items.iter().any(|m| m.guid == PHYSICAL_SECTOR_SIZE) {
        let physical = le32(
            &read_item(&PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?,
            0,
        );
        // Only 512 and 4096 are specified.
        if physical != 512 && physical != 4096 {
            return Err(FormatError::Corrupt(format!(
                "physical sector size {physical} is neither 512 nor 4096"
            )));
        }
    }

    // --- BAT: payload entries interleaved with one sector-bitmap entry per chunk.
    let (chunk_ratio, data_blocks, entries) =
        bat_geometry(virtual_size, u64::from(block_size), logical_sector);
    let bat_bytes = entries.saturating_mul(8);
    // The BAT is read whole; its size must be bounded before it is allocated.
    check_metadata("VHDX BAT", bat_bytes, limits)?;
    // A BAT region too small for the disk would make readers index past it.
    if bat_bytes > bat_region_len {
        return Err(FormatError::Corrupt(format!(
            "the BAT needs {bat_bytes} bytes for {virtual_size} bytes of disk, its region has {bat_region_len}"
        )));
    }
    let bat_len = usize::try_from(bat_bytes).map_err(|_| FormatError::MetadataTooLarge {
        what: "VHDX BAT",
        size: bat_bytes,
        limit: limits.max_metadata_bytes,
    })?;
    let bat = read_exact(r, bat_offset, bat_len, "VHDX BAT")?;
    let mut starts = Vec::new();
    for (i, e) in bat.chunks_exact(8).enumerate() {
        let e = le64(e, 0);
        let state = e & 7;
        let offset = (e >> 20).checked_mul(MIB);
        let is_bitmap = (i as u64 + 1).is_multiple_of(chunk_ratio + 1);
        if is_bitmap {
            // Sector bitmaps exist only in differencing disks, which we have ruled out.
            if state != SB_NOT_PRESENT {
                return Err(FormatError::Corrupt(format!(
                    "sector bitmap entry {i} is present in a disk without parent"
                )));
            }
            continue;
        }
        match state {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
            PAYLOAD_FULLY_PRESENT => {
                // A present block must lie inside the file, or reads go past its end. Only the
                // part inside the disk counts: qemu ends a fixed image at the disk's last byte.
                let payload = i as u64 - i as u64 / (chunk_ratio + 1);
                let needed = u64::from(block_size).min(
                    virtual_size.saturating_sub(payload.saturating_mul(u64::from(block_size))),
                );
                let end = offset.and_then(|o| o.checked_add(needed));
                match (offset, end) {
                    (Some(start), Some(end)) if end <= file_size => starts.push(start),
                    _ => {
                        return Err(FormatError::Corrupt(format!(
                            "BAT entry {i}: the block at offset {} ({block_size} bytes) reaches beyond the \
                             file ({file_size} bytes)",
                            (e >> 20).saturating_mul(MIB)
                        )));
                    }
                }
            }
            // Partially present blocks read the rest from a parent; only differencing disks.
            PAYLOAD_PARTIALLY_PRESENT => {
                return Err(FormatError::Corrupt(format!(
                    "BAT entry {i} is partially present in a disk without parent"
                )));
            }
            // States 4 and 5 are undefined.
            other => {
                return Err(FormatError::Corrupt(format!(
                    "BAT entry {i} has unknown state {other}"
                )));
            }
        }
    }
    let allocated = starts.len();
    // Blocks overlapping metadata or each other would let guest writes rewrite the BAT,
    // the metadata or another block.
    check_blocks_disjoint(&mut starts, u64::from(block_size), &fixed)?;

    let kind = if flags & LEAVE_BLOCKS_ALLOCATED != 0 {
        "fixed"
    } else {
        "dynamic"
    };
    findings.insert(
        0,
        format!("vhdx {kind}, block size {block_size}, logical sector size {logical_sector}"),
    );
    findings.push(format!("{allocated} of {data_blocks} blocks allocated"));
    Ok((virtual_size, findings))
}

/// Refuses a block size the spec does not allow (powers of two from 1 MiB to 256 MiB): blocks
/// and chunks are found by shifting and division, so a zero or absurd size must not get there.
pub(super) fn check_block_size(block_size: u32) -> Result<(), FormatError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    Ok(())
}

/// The BAT of a disk of `virtual_size` bytes: its chunk ratio (one sector-bitmap entry follows
/// every `chunk_ratio` payload entries), its payload block count and its entry count.
pub(super) fn bat_geometry(
    virtual_size: u64,
    block_size: u64,
    logical_sector: u32,
) -> (u64, u64, u64) {
    let chunk_ratio = ((1u64 << 23) * u64::from(logical_sector)) / block_size;
    let data_blocks = virtual_size.div_ceil(block_size);
    let entries = data_blocks + data_blocks.saturating_sub(1) / chunk_ratio;
    (chunk_ratio, data_blocks, entries)
}

/// `offset + length`, or a Corrupt error naming `what` when it overflows.
fn checked_end(offset: u64, length: u64, what: &str) -> Result<u64, FormatError> {
    offset
        .checked_add(length)
        .ok_or_else(|| FormatError::Corrupt(format!("{what} at offset {offset} overflows")))
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    if let Some(s) = b.get(at..at + 16) {
        g.copy_from_slice(s);
    }
    g
}

/// The usual text form of an on-disk (mixed-endian) GUID.
fn fmt_guid(g: &Guid) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Fails if two of the fixed structures overlap.
fn check_fixed_disjoint(fixed: &mut [(u64, u64, String)]) -> Result<(), FormatError> {
    fixed.sort_unstable_by_key(|f| f.0);
    for w in fixed.windows(2) {
        if let [a, b] = w
            && b.0 < a.1
        {
            return Err(FormatError::Corrupt(format!(
                "{} ({}..{}) overlaps {} ({}..{})",
                a.2, a.0, a.1, b.2, b.0, b.1
            )));
        }
    }
    Ok(())
}

/// Fails if two blocks (each `span` bytes from its start) overlap each other or one of the
/// sorted, disjoint `fixed` ranges.
fn check_blocks_disjoint(
    starts: &mut [u64],
    span: u64,
    fixed: &[(u64, u64, String)],
) -> Result<(), FormatError> {
    starts.sort_unstable();
    for w in starts.windows(2) {
        if let [a, b] = w
            && *b < a.saturating_add(span)
        {
            return Err(FormatError::Corrupt(format!(
                "the data blocks at offsets {a} and {b} overlap"
            )));
        }
    }
    for (from, to, what) in fixed {
        // The first block that ends after this range starts is the only one that can overlap it.
        let i = starts.partition_point(|&s| s.saturating_add(span) <= *from);
        if let Some(&s) = starts.get(i)
            && s < *to
        {
            return Err(FormatError::Corrupt(format!(
                "the data block at offset {s} overlaps {what} ({from}..{to})"
            )));
        }
    }
    Ok(())
}

/// Whether a header or region table's CRC-32C (stored at offset 4, computed with that field
/// zeroed) matches.
fn crc_ok(b: &[u8]) -> bool {
    let (Some(head), Some(stored), Some(tail)) = (b.get(..4), b.get(4..8), b.get(8..)) else {
        return false;
    };
    let crc = !crc32c_update(crc32c_update(crc32c_update(!0, head), &[0; 4]), tail);
    stored == crc.to_le_bytes()
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// Feeds `data` into a running (pre-inverted) CRC-32C state.
fn crc32c_update(mut state: u32, data: &[u8]) -> u32 {
    for &b in data {
        state = CRC32C_TABLE[((state ^ u32::from(b)) & 0xFF) as usize] ^ (state >> 8);
    }
    state
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::{Path, PathBuf};

    use super::super::tests_support::{
        Patch, assert_matches, create as qemu_create, flips_never_panic, have_qemu,
    };
    use super::super::{DiskFormat, DiskInfo, FormatError, Limits, inspect};
    use super::{
        FILE_PARAMETERS, Guid, PAGE_83_DATA, PARENT_LOCATOR, VIRTUAL_DISK_SIZE, crc32c_update, guid,
    };

    /// Creates a 64 MiB vhdx image with some data written at 1 MiB.
    fn create(dir: &Path, name: &str, subformat: &str) -> PathBuf {
        let opts = format!("subformat={subformat}");
        let write = "write -P 0xab 1M 64k";
        qemu_create(dir, name, "vhdx", &["-o", &opts], "64M", &[write])
    }

    fn check(data: &[u8]) -> Result<DiskInfo, FormatError> {
        inspect(&data, DiskFormat::Vhdx, &Limits::default())
    }

    fn dynamic() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "d.vhdx", "dynamic");
        let data = std::fs::read(path).expect("read");
        (dir, data)
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Recomputes the CRC-32C of the structure of `len` bytes at `at`.
    fn fix_crc(data: &mut [u8], at: usize, len: usize) {
        data[at + 4..at + 8].fill(0);
        let crc = !crc32c_update(!0, &data[at..at + len]);
        data[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Patches both headers and fixes their CRCs.
    fn patch_headers(data: &mut [u8], f: impl Fn(&mut [u8])) {
        for at in [64 << 10, 128 << 10] {
            f(&mut data[at..at + 4096]);
            fix_crc(data, at, 4096);
        }
    }

    /// Patches both region tables and fixes their CRCs.
    fn patch_regions(data: &mut [u8], f: impl Fn(&mut [u8])) {
        for at in [192 << 10, 256 << 10] {
            f(&mut data[at..at + (64 << 10)]);
            fix_crc(data, at, 64 << 10);
        }
    }

    /// Offset of the region with this GUID, from region table 1.
    pub(crate) fn region(data: &[u8], g: &Guid) -> usize {
        let rt = 192 << 10;
        let n = u32_at(data, rt + 8) as usize;
        (0..n)
            .map(|i| rt + 16 + 32 * i)
            .find(|&e| data[e..e + 16] == g[..])
            .map(|e| usize::try_from(u64_at(data, e + 16)).expect("offset"))
            .expect("region present")
    }

    const METADATA: Guid = super::METADATA_REGION;
    const BAT: Guid = super::BAT_REGION;

    /// The offset of the metadata table entry for this item.
    fn meta_entry(data: &[u8], g: &Guid) -> usize {
        let m = region(data, &METADATA);
        let n = usize::from(u16::from_le_bytes([data[m + 10], data[m + 11]]));
        (0..n)
            .map(|i| m + 32 + 32 * i)
            .find(|&e| data[e..e + 16] == g[..])
            .expect("item present")
    }

    /// The offset of this metadata item's data.
    pub(crate) fn meta_item(data: &[u8], g: &Guid) -> usize {
        region(data, &METADATA) + u32_at(data, meta_entry(data, g) + 16) as usize
    }

    #[test]
    fn crc32c_known_answer() {
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn accepts_dynamic_and_fixed() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, sub) in [("d.vhdx", "dynamic"), ("f.vhdx", "fixed")] {
            let path = create(dir.path(), name, sub);
            let file = std::fs::File::open(&path).expect("open");
            let info = inspect(&file, DiskFormat::Vhdx, &Limits::default()).expect("accepted");
            assert_eq!(info.virtual_size, 64 << 20, "{name}");
            assert!(
                info.findings[0].starts_with(&format!("vhdx {sub}")),
                "{name}: {:?}",
                info.findings
            );
        }
    }

    #[test]
    fn refuses_has_parent() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        let at = meta_item(&data, &FILE_PARAMETERS);
        data[at + 4] |= 2;
        assert_matches!(check(&data), Err(FormatError::Differencing));
    }

    #[test]
    fn refuses_parent_locator_item() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        let e = meta_entry(&data, &PAGE_83_DATA);
        data[e..e + 16].copy_from_slice(&PARENT_LOCATOR);
        assert_matches!(check(&data), Err(FormatError::Differencing));
    }

    #[test]
    fn refuses_unknown_required_item() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let unknown = guid(0x1234_5678, 0x9ABC, 0xDEF0, [1, 2, 3, 4, 5, 6, 7, 8]);
        let e = meta_entry(&data, &PAGE_83_DATA);
        let mut bad = data.clone();
        bad[e..e + 16].copy_from_slice(&unknown);
        assert_matches!(check(&bad), Err(FormatError::Unsupported { .. }));
        // The same item, not marked required, is ignored.
        bad[e + 24] &= !4;
        assert!(check(&bad).is_ok(), "{:?}", check(&bad));
    }

    #[test]
    fn refuses_huge_virtual_size() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        let at = meta_item(&data, &VIRTUAL_DISK_SIZE);
        data[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert_matches!(check(&data), Err(FormatError::TooLarge { .. }));
        // Past the format's own limit, with a limit that would allow it.
        data[at..at + 8].copy_from_slice(&(128u64 << 40).to_le_bytes());
        let limits = Limits {
            max_virtual_size: u64::MAX,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Vhdx, &limits);
        assert_matches!(got, Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_bat_too_small_or_over_limit() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        // 1 TiB in 8 MiB blocks needs a little more than the 1 MiB BAT region qemu made.
        let mut bad = data.clone();
        let at = meta_item(&bad, &VIRTUAL_DISK_SIZE);
        bad[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        let limits = Limits {
            max_metadata_bytes: 32,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Vhdx, &limits);
        assert_matches!(got, Err(FormatError::MetadataTooLarge { .. }));
    }

    #[test]
    fn refuses_bad_params() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let params = meta_item(&data, &FILE_PARAMETERS);
        for block in [0u32, 3 << 20, 512 << 10, 512 << 20] {
            let mut bad = data.clone();
            bad[params..params + 4].copy_from_slice(&block.to_le_bytes());
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "block {block}");
        }
        let sector = meta_item(&data, &super::LOGICAL_SECTOR_SIZE);
        let mut bad = data.clone();
        bad[sector..sector + 4].copy_from_slice(&1024u32.to_le_bytes());
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // An item whose data lies outside the metadata region.
        let e = meta_entry(&data, &VIRTUAL_DISK_SIZE);
        let mut bad = data.clone();
        bad[e + 16..e + 20].copy_from_slice(&(2u32 << 20).to_le_bytes());
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn header_and_region_checksums() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        // One damaged header: the other one is used.
        for at in [(64 << 10) + 100, (128 << 10) + 100] {
            let mut one = data.clone();
            one[at] ^= 0xFF;
            assert!(check(&one).is_ok(), "{:?}", check(&one));
        }
        let mut both = data.clone();
        both[(64 << 10) + 100] ^= 0xFF;
        both[(128 << 10) + 100] ^= 0xFF;
        assert_matches!(check(&both), Err(FormatError::Corrupt(_)));
        // Equal sequence numbers with different contents.
        let mut same = data.clone();
        patch_headers(&mut same, |h| h[8..16].copy_from_slice(&7u64.to_le_bytes()));
        same[(64 << 10) + 16] ^= 1;
        fix_crc(&mut same, 64 << 10, 4096);
        assert_matches!(check(&same), Err(FormatError::Corrupt(_)));
        // A damaged first region table.
        let mut bad = data.clone();
        bad[(192 << 10) + 40] ^= 1;
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // Two valid region tables that differ.
        let mut bad = data.clone();
        bad[(256 << 10) + 60000] ^= 1;
        fix_crc(&mut bad, 256 << 10, 64 << 10);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_pending_log() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        patch_headers(&mut data, |h| h[48] = 1);
        assert_matches!(check(&data), Err(FormatError::Unsupported { .. }));
    }

    #[test]
    fn refuses_bad_regions() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let n = data.len() as u64;
        let cases: [(&str, Patch); 5] = [
            (
                "beyond the file",
                Box::new(move |rt| rt[32..40].copy_from_slice(&(n + (1 << 20)).to_le_bytes())),
            ),
            (
                "misaligned",
                Box::new(|rt| rt[32..40].copy_from_slice(&((2 << 20) + 4096u64).to_le_bytes())),
            ),
            (
                "in the header section",
                Box::new(|rt| rt[32..40].copy_from_slice(&0u64.to_le_bytes())),
            ),
            (
                "overlapping",
                Box::new(|rt| rt[64..72].copy_from_slice(&(2u64 << 20).to_le_bytes())),
            ),
            (
                "too many entries",
                Box::new(|rt| rt[8..12].copy_from_slice(&5000u32.to_le_bytes())),
            ),
        ];
        for (what, f) in cases {
            let mut bad = data.clone();
            patch_regions(&mut bad, f);
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "{what}");
        }
        // An unknown region marked required.
        let mut bad = data.clone();
        patch_regions(&mut bad, |rt| {
            rt[8] = 3;
            rt[80..96].copy_from_slice(&guid(1, 2, 3, [4; 8]));
            rt[96..104].copy_from_slice(&(4u64 << 20).to_le_bytes());
            rt[104..108].copy_from_slice(&(1u32 << 20).to_le_bytes());
            rt[108] = 1;
        });
        assert_matches!(check(&bad), Err(FormatError::Unsupported { .. }));
    }

    #[test]
    fn refuses_bad_bat_entries() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let bat = region(&data, &BAT);
        let first = u64_at(&data, bat);
        assert_eq!(first & 7, 6, "qemu-io allocated block 0");
        let n = data.len() as u64;
        for (what, entry, index) in [
            ("beyond the file", (n >> 20 << 20) | 6, 0),
            ("over the metadata", (3 << 20) | 6, 0),
            ("shared", first, 1),
            ("partially present", 7, 2),
            ("unknown state", 4, 3),
        ] {
            let mut bad = data.clone();
            bad[bat + 8 * index..bat + 8 * index + 8].copy_from_slice(&entry.to_le_bytes());
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "{what}");
        }
    }

    #[test]
    fn refuses_truncated() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        for cut in [
            8,
            100,
            70_000,
            140_000,
            200_000,
            300_000,
            1 << 20,
            (3 << 20) + 100,
            9 << 20,
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
        let meta = region(&data, &METADATA);
        let bat = region(&data, &BAT);
        flips_never_panic(
            &data,
            DiskFormat::Vhdx,
            (0..2048).chain((2048..n).step_by(4093)),
            0x2545_F491_4F6C_DD1D,
            1500,
            |r| match r % 5 {
                0 => (64 << 10) + r / 5 % 128,
                1 => (128 << 10) + r / 5 % 128,
                2 => (192 << 10) + r / 5 % 256,
                3 => meta + r / 5 % 256,
                _ => bat + r / 5 % 128,
            },
            // Half the time, make the CRCs right so the flip reaches deeper checks.
            |i, bad| {
                if i.is_multiple_of(2) {
                    fix_crc(bad, 64 << 10, 4096);
                    fix_crc(bad, 128 << 10, 4096);
                    let rt = bad[192 << 10..256 << 10].to_vec();
                    bad[256 << 10..320 << 10].copy_from_slice(&rt);
                    fix_crc(bad, 192 << 10, 64 << 10);
                    fix_crc(bad, 256 << 10, 64 << 10);
                }
            },
        );
    }
}

#[cfg(test)]
mod partial_last_block {
    use super::super::tests_support::create;
    use super::super::{DiskFormat, Limits, inspect};

    /// qemu ends a fixed VHDX at the disk's last byte, inside the last block.
    #[test]
    fn a_fixed_image_whose_size_is_not_a_whole_number_of_blocks_is_accepted() {
        let dir = tempfile::tempdir().expect("tmp");
        let opts = ["-o", "subformat=fixed,block_state_zero=off,block_size=8M"];
        let p = create(dir.path(), "fixed.vhdx", "vhdx", &opts, "20M", &[]);
        let info = inspect(
            &std::fs::File::open(&p).expect("open"),
            DiskFormat::Vhdx,
            &Limits::default(),
        )
        .expect("accepted");
        assert_eq!(info.virtual_size, 20 << 20);
    }
}
