//! VHD (Microsoft Virtual Hard Disk, qemu's "vpc"): fixed and dynamic disks only.
//!
//! Layout (all fields big-endian): a 512-byte footer at the very end of the file (cookie
//! "conectix"). Dynamic disks also start with a copy of that footer, carry a 1024-byte dynamic
//! header ("cxsparse") at the footer's data offset, and a block allocation table (BAT) of u32
//! sector numbers, each pointing at a sector bitmap followed by one data block.

use super::{
    DiskFormat, FormatError, Limits, ReadAt, be16, be32, be64, check_metadata, check_size,
    read_exact, read_some,
};

pub(super) const FOOTER_LEN: usize = 512;
pub(super) const COOKIE: &[u8] = b"conectix";
pub(super) const DYN_HEADER_LEN: usize = 1024;
pub(super) const DYN_COOKIE: &[u8] = b"cxsparse";
pub(super) const SECTOR: u64 = 512;
pub(super) const UNALLOCATED: u32 = 0xFFFF_FFFF;

pub(super) const DISK_FIXED: u32 = 2;
pub(super) const DISK_DYNAMIC: u32 = 3;
pub(super) const DISK_DIFFERENCING: u32 = 4;

/// Smallest block size accepted (qemu's lower bound: one sector).
const MIN_BLOCK: u32 = 512;
/// Largest block size accepted; the spec's default is 2 MiB, nothing real goes near this.
const MAX_BLOCK: u32 = 256 << 20;

// Footer fields.
const F_VERSION: usize = 12;
pub(super) const F_DATA_OFFSET: usize = 16;
const F_CREATOR_APP: usize = 28;
pub(super) const F_CURRENT_SIZE: usize = 48;
const F_CYLINDERS: usize = 56;
const F_HEADS: usize = 58;
const F_SECTORS: usize = 59;
pub(super) const F_DISK_TYPE: usize = 60;
pub(super) const F_CHECKSUM: usize = 64;

// Dynamic header fields.
pub(super) const D_TABLE_OFFSET: usize = 16;
const D_VERSION: usize = 24;
pub(super) const D_MAX_ENTRIES: usize = 28;
pub(super) const D_BLOCK_SIZE: usize = 32;
pub(super) const D_CHECKSUM: usize = 36;
const D_LOCATORS: usize = 576;
const LOCATOR_LEN: usize = 24;
const LOCATOR_COUNT: usize = 8;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    // Dynamic disks start with a copy of the footer (this is all qemu probes for).
    if read_some(r, 0, COOKIE.len())? == COOKIE {
        return Ok(true);
    }
    // Fixed disks carry the footer only at the end; qemu would open them as raw, but a VHD
    // uploaded as raw would boot with a 512-byte footer glued to the disk, so we still name it.
    let size = r.size()?;
    let Some(at) = size.checked_sub(FOOTER_LEN as u64) else {
        return Ok(false);
    };
    Ok(read_some(r, at, COOKIE.len())? == COOKIE)
}

/// Whether `head`, a file's first 512 bytes, is a dynamic disk's copy of its footer: what a
/// reader goes by ([`crate::format::read`], like qemu), and what the checks of a file still
/// arriving go by, as the footer itself comes last. [`inspect`] of the whole file insists that
/// the footer at the end agrees with it on everything a reader uses.
pub(super) fn leads_with_dynamic_footer(head: &[u8]) -> bool {
    head.starts_with(COOKIE) && be32(head, F_DISK_TYPE) == DISK_DYNAMIC
}

/// Checks a VHD. `whole`: the file is all there; without it, a dynamic disk is checked by the
/// footer copy at its start (the end may not have arrived), a fixed one still by its footer.
pub(super) fn inspect(
    r: &dyn ReadAt,
    limits: &Limits,
    whole: bool,
) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    // Even the smallest VHD is a whole footer; anything shorter was cut.
    let Some(footer_at) = file_size.checked_sub(FOOTER_LEN as u64) else {
        return Err(FormatError::Truncated(format!(
            "a VHD needs a 512-byte footer, the file has {file_size} bytes"
        )));
    };
    let head = read_exact(r, 0, FOOTER_LEN, "VHD footer copy")?;
    let footer = if !whole && footer_at != 0 && leads_with_dynamic_footer(&head) {
        head.clone()
    } else {
        read_exact(r, footer_at, FOOTER_LEN, "VHD footer")?
    };
    let head_is_copy = head.starts_with(COOKIE);
    // The footer is written last: a file whose tail lacks it was cut short or never finished.
    if !footer.starts_with(COOKIE) {
        return Err(FormatError::Truncated(
            "the footer at the end of the file is missing (only the copy at offset 0 is present)"
                .into(),
        ));
    }
    check_footer(&footer, "footer")?;
    if head_is_copy && footer_at != 0 {
        // Readers differ on which copy they trust (qemu uses the one at offset 0): both must
        // be intact and describe the same disk, or the image means two different things.
        check_footer(&head, "footer copy at offset 0")?;
        for (at, len, what) in [
            (F_DATA_OFFSET, 8, "data offset"),
            (F_CURRENT_SIZE, 8, "current size"),
            (F_CYLINDERS, 4, "geometry"),
            (F_DISK_TYPE, 4, "disk type"),
            // Reported in the findings, which must not depend on which copy was read.
            (F_CREATOR_APP, 4, "creator application"),
        ] {
            if head.get(at..at + len) != footer.get(at..at + len) {
                return Err(FormatError::Corrupt(format!(
                    "the footer copy at offset 0 disagrees on the {what}"
                )));
            }
        }
    }

    let disk_type = be32(&footer, F_DISK_TYPE);
    // A differencing disk reads through to a parent file named inside the image.
    if disk_type == DISK_DIFFERENCING {
        return Err(FormatError::Differencing);
    }
    // Only fixed and dynamic disks have a layout we know how to check.
    if disk_type != DISK_FIXED && disk_type != DISK_DYNAMIC {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vhd,
            detail: format!("disk type {disk_type}"),
        });
    }

    let current_size = be64(&footer, F_CURRENT_SIZE);
    // The size callers will see must be within limits before anything is sized from it.
    check_size(current_size, limits)?;
    // The disk is addressed in 512-byte sectors; a partial sector means a damaged footer.
    if !current_size.is_multiple_of(SECTOR) {
        return Err(FormatError::Corrupt(format!(
            "current size {current_size} is not a multiple of 512"
        )));
    }

    let mut findings = Vec::new();
    let creator = printable(
        footer
            .get(F_CREATOR_APP..F_CREATOR_APP + 4)
            .unwrap_or_default(),
    );
    findings.push(format!("creator application '{creator}'"));
    // qemu and Virtual PC size some VHDs by CHS geometry rather than current size; the larger
    // of the two is what a reader may address, so it must be within limits as well.
    let chs_size = u64::from(be16(&footer, F_CYLINDERS))
        * u64::from(footer.get(F_HEADS).copied().unwrap_or(0))
        * u64::from(footer.get(F_SECTORS).copied().unwrap_or(0))
        * SECTOR;
    if chs_size > current_size {
        check_size(chs_size, limits)?;
        findings.push(format!(
            "CHS geometry describes {chs_size} bytes, more than the current size {current_size}"
        ));
    }

    if disk_type == DISK_FIXED {
        // A fixed disk's data is the first current_size bytes; a shorter file lost some of it.
        if footer_at < current_size {
            return Err(FormatError::Truncated(format!(
                "the fixed disk needs {current_size} data bytes before its footer, the file has {footer_at}"
            )));
        }
        findings.insert(0, "vhd fixed".into());
        return Ok((current_size, findings));
    }

    // Dynamic disks must start with the footer copy (the spec's layout; qemu refuses without it).
    if !head_is_copy {
        return Err(FormatError::Corrupt(
            "a dynamic disk must start with a copy of its footer".into(),
        ));
    }
    let data_offset = be64(&footer, F_DATA_OFFSET);
    let dyn_end = data_offset
        .checked_add(DYN_HEADER_LEN as u64)
        .ok_or_else(|| {
            FormatError::Corrupt(format!("dynamic header offset {data_offset} overflows"))
        })?;
    // The dynamic header must sit between the footer copy and the footer, inside the file.
    if data_offset < FOOTER_LEN as u64 || dyn_end > footer_at {
        return Err(FormatError::Corrupt(format!(
            "dynamic header offset {data_offset} is outside the file's data area (512..{footer_at})"
        )));
    }
    let dh = read_exact(r, data_offset, DYN_HEADER_LEN, "VHD dynamic header")?;
    // A wrong cookie means the data offset points at something that is not a dynamic header.
    if !dh.starts_with(DYN_COOKIE) {
        return Err(FormatError::Corrupt(format!(
            "no dynamic header (\"cxsparse\") at offset {data_offset}"
        )));
    }
    // A bad checksum means the header was damaged or hand-edited; its offsets cannot be trusted.
    let stored = be32(&dh, D_CHECKSUM);
    let computed = checksum(&dh, D_CHECKSUM);
    if stored != computed {
        return Err(FormatError::Corrupt(format!(
            "dynamic header checksum 0x{stored:08x} does not match 0x{computed:08x}"
        )));
    }
    let version = be32(&dh, D_VERSION);
    // Only header version 1.x is specified; another major version may change the layout.
    if version >> 16 != 1 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vhd,
            detail: format!("dynamic header version 0x{version:08x}"),
        });
    }
    // Any parent locator names a file outside this image: only differencing disks have them.
    for i in 0..LOCATOR_COUNT {
        if be32(&dh, D_LOCATORS + i * LOCATOR_LEN) != 0 {
            return Err(FormatError::Differencing);
        }
    }

    let block_size = be32(&dh, D_BLOCK_SIZE);
    check_block_size(block_size)?;
    let entries = be32(&dh, D_MAX_ENTRIES);
    let bat_bytes = u64::from(entries) * 4;
    // The BAT is read whole; its size must be bounded before it is allocated.
    check_metadata("VHD block allocation table", bat_bytes, limits)?;
    // The table must map the whole virtual disk, or reads past its end index beyond it.
    if u64::from(entries) * u64::from(block_size) < current_size {
        return Err(FormatError::Corrupt(format!(
            "{entries} blocks of {block_size} bytes do not cover the virtual size {current_size}"
        )));
    }
    let table_offset = be64(&dh, D_TABLE_OFFSET);
    let bat_end = table_offset
        .checked_add(bat_bytes)
        .ok_or_else(|| FormatError::Corrupt(format!("BAT offset {table_offset} overflows")))?;
    // The BAT must lie inside the file, before the footer.
    if bat_end > footer_at {
        return Err(FormatError::Corrupt(format!(
            "the BAT ({table_offset}..{bat_end}) reaches beyond the data area (which ends at {footer_at})"
        )));
    }
    let mut fixed = [
        (0, FOOTER_LEN as u64, "the footer copy"),
        (data_offset, dyn_end, "the dynamic header"),
        (table_offset, bat_end, "the BAT"),
        (footer_at, file_size, "the footer"),
    ];
    // The BAT overlapping the footers or the dynamic header would be read as (and written
    // over) them.
    check_disjoint(&mut [], 0, &mut fixed)?;
    let bat_len = usize::try_from(bat_bytes).map_err(|_| FormatError::MetadataTooLarge {
        what: "VHD block allocation table",
        size: bat_bytes,
        limit: limits.max_metadata_bytes,
    })?;
    let bat = read_exact(r, table_offset, bat_len, "VHD block allocation table")?;

    // Each block is a sector bitmap then the data.
    let span = bitmap_len(u64::from(block_size)) + u64::from(block_size);
    let mut starts = Vec::new();
    for (i, e) in bat.chunks_exact(4).enumerate() {
        let sector = be32(e, 0);
        if sector == UNALLOCATED {
            continue;
        }
        let start = u64::from(sector) * SECTOR;
        // A block past the footer would be read from (or written over) the footer or nothing.
        if start.saturating_add(span) > footer_at {
            return Err(FormatError::Corrupt(format!(
                "block {i} at offset {start} ({span} bytes) reaches beyond the data area (which ends at {footer_at})"
            )));
        }
        starts.push(start);
    }
    let allocated = starts.len();
    // Blocks overlapping metadata or each other would let guest writes rewrite the BAT or
    // another block.
    check_disjoint(&mut starts, span, &mut fixed)?;

    findings.insert(0, format!("vhd dynamic, block size {block_size}"));
    findings.push(format!("{allocated} of {entries} blocks allocated"));
    Ok((current_size, findings))
}

/// Refuses a block size that is not a power of two within bounds: blocks are found by shifting
/// and division, so a zero or absurd size is a damaged header.
pub(super) fn check_block_size(block_size: u32) -> Result<(), FormatError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )));
    }
    Ok(())
}

/// The length of a block's sector bitmap: one bit per sector, padded to whole sectors.
pub(super) fn bitmap_len(block_size: u64) -> u64 {
    block_size.div_ceil(SECTOR * 8).next_multiple_of(SECTOR)
}

/// Checks a footer's checksum and version.
fn check_footer(f: &[u8], what: &str) -> Result<(), FormatError> {
    // A bad checksum means the footer was damaged or hand-edited; none of it can be trusted.
    let stored = be32(f, F_CHECKSUM);
    let computed = checksum(f, F_CHECKSUM);
    if stored != computed {
        return Err(FormatError::Corrupt(format!(
            "{what} checksum 0x{stored:08x} does not match 0x{computed:08x}"
        )));
    }
    let version = be32(f, F_VERSION);
    // Only format version 1.x is specified; another major version may change the layout.
    if version >> 16 != 1 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vhd,
            detail: format!("format version 0x{version:08x}"),
        });
    }
    Ok(())
}

/// One's complement of the byte sum, the checksum field itself left out.
pub(super) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// A four-character code as text, non-printable bytes shown as '?'.
fn printable(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '?'
            }
        })
        .collect()
}

/// Fails if two blocks (each `span` bytes from its start) overlap, or a block overlaps one of
/// the `fixed` metadata ranges, or two metadata ranges overlap.
fn check_disjoint(
    starts: &mut [u64],
    span: u64,
    fixed: &mut [(u64, u64, &str)],
) -> Result<(), FormatError> {
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
    for (from, to, what) in fixed.iter() {
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::super::tests_support::{
        Patch, assert_matches, create as qemu_create, flips_never_panic, have_qemu,
    };
    use super::super::{DiskFormat, DiskInfo, FormatError, Limits, inspect};
    use super::{D_CHECKSUM, D_LOCATORS, F_CHECKSUM, checksum};

    /// Creates a 64 MiB vpc image with some data written at 1 MiB.
    fn create(dir: &Path, name: &str, subformat: &str) -> PathBuf {
        let opts = format!("subformat={subformat}");
        let write = "write -P 0xab 1M 64k";
        qemu_create(dir, name, "vpc", &["-o", &opts], "64M", &[write])
    }

    fn qemu_size(path: &Path) -> u64 {
        let out = Command::new("qemu-img")
            .args([
                "info",
                "-f",
                "vpc",
                "--output=json",
                path.to_str().expect("utf-8 path"),
            ])
            .output()
            .expect("spawn");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["virtual-size"].as_u64().expect("virtual-size")
    }

    fn check(data: &[u8]) -> Result<DiskInfo, FormatError> {
        inspect(&data, DiskFormat::Vhd, &Limits::default())
    }

    fn dynamic() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "d.vhd", "dynamic");
        let data = std::fs::read(path).expect("read");
        (dir, data)
    }

    /// Applies `f` to the footer and (if present) its copy at 0, then fixes both checksums.
    fn patch_footers(data: &mut [u8], f: impl Fn(&mut [u8])) {
        let n = data.len();
        let has_copy = data.starts_with(b"conectix");
        for range in [Some(n - 512..n), has_copy.then_some(0..512)]
            .into_iter()
            .flatten()
        {
            let footer = &mut data[range];
            f(footer);
            let c = checksum(footer, F_CHECKSUM);
            footer[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&c.to_be_bytes());
        }
    }

    fn dyn_offset(data: &[u8]) -> usize {
        usize::try_from(u64::from_be_bytes(
            data[16..24].try_into().expect("8 bytes"),
        ))
        .expect("offset")
    }

    /// Applies `f` to the dynamic header, then fixes its checksum.
    fn patch_dyn(data: &mut [u8], f: impl Fn(&mut [u8])) {
        let at = dyn_offset(data);
        let dh = &mut data[at..at + 1024];
        f(dh);
        let c = checksum(dh, D_CHECKSUM);
        dh[D_CHECKSUM..D_CHECKSUM + 4].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn accepts_dynamic_and_fixed() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, sub, finding) in [
            ("d.vhd", "dynamic", "vhd dynamic"),
            ("f.vhd", "fixed", "vhd fixed"),
        ] {
            let path = create(dir.path(), name, sub);
            let file = std::fs::File::open(&path).expect("open");
            let info = inspect(&file, DiskFormat::Vhd, &Limits::default()).expect("accepted");
            assert_eq!(info.virtual_size, qemu_size(&path), "{name}");
            assert!(info.virtual_size >= 64 << 20, "{name}");
            assert!(
                info.findings[0].starts_with(finding),
                "{name}: {:?}",
                info.findings
            );
        }
    }

    #[test]
    fn refuses_differencing_type() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        patch_footers(&mut data, |f| {
            f[60..64].copy_from_slice(&4u32.to_be_bytes())
        });
        assert_matches!(check(&data), Err(FormatError::Differencing));
    }

    #[test]
    fn refuses_parent_locator() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        patch_dyn(&mut data, |dh| {
            dh[D_LOCATORS + 24..D_LOCATORS + 28].copy_from_slice(b"W2ku")
        });
        assert_matches!(check(&data), Err(FormatError::Differencing));
    }

    #[test]
    fn refuses_bad_checksums() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let n = data.len();
        let mut bad = data.clone();
        bad[n - 512 + 48] ^= 1;
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        let mut bad = data.clone();
        let at = dyn_offset(&data);
        bad[at + 32] ^= 1;
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_disagreeing_footer_copy() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        let n = data.len();
        let footer = &mut data[n - 512..];
        footer[48..56].copy_from_slice(&(128u64 << 20).to_be_bytes());
        let c = checksum(footer, F_CHECKSUM);
        footer[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&c.to_be_bytes());
        assert_matches!(check(&data), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_huge_virtual_size() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = dynamic();
        patch_footers(&mut data, |f| {
            f[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes())
        });
        assert_matches!(check(&data), Err(FormatError::TooLarge { .. }));
        // A fixed disk too.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fixed = std::fs::read(create(dir.path(), "f.vhd", "fixed")).expect("read");
        patch_footers(&mut fixed, |f| {
            f[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes())
        });
        assert_matches!(check(&fixed), Err(FormatError::TooLarge { .. }));
    }

    #[test]
    fn refuses_bat_over_metadata_limit() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let limits = Limits {
            max_metadata_bytes: 64,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Vhd, &limits);
        assert_matches!(got, Err(FormatError::MetadataTooLarge { .. }));
        // A huge entry count is refused before anything is read.
        let mut big = data.clone();
        patch_dyn(&mut big, |dh| {
            dh[28..32].copy_from_slice(&u32::MAX.to_be_bytes())
        });
        assert_matches!(check(&big), Err(FormatError::MetadataTooLarge { .. }));
    }

    #[test]
    fn refuses_inconsistent_dynamic_header() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let cases: [(&str, Patch); 5] = [
            (
                "block size not a power of two",
                Box::new(|dh| dh[32..36].copy_from_slice(&3_000_000u32.to_be_bytes())),
            ),
            (
                "block size too small",
                Box::new(|dh| dh[32..36].copy_from_slice(&256u32.to_be_bytes())),
            ),
            (
                "BAT too small",
                Box::new(|dh| dh[28..32].copy_from_slice(&2u32.to_be_bytes())),
            ),
            (
                "BAT beyond the file",
                Box::new(|dh| dh[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            ),
            (
                "BAT over the header",
                Box::new(|dh| dh[16..24].copy_from_slice(&0u64.to_be_bytes())),
            ),
        ];
        for (what, f) in cases {
            let mut bad = data.clone();
            patch_dyn(&mut bad, f);
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "{what}");
        }
        // Dynamic header offset outside the file.
        let mut bad = data.clone();
        patch_footers(&mut bad, |f| {
            f[16..24].copy_from_slice(&u64::MAX.to_be_bytes())
        });
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_bad_bat_entries() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let at = dyn_offset(&data);
        let bat = usize::try_from(u64::from_be_bytes(
            data[at + 16..at + 24].try_into().expect("8"),
        ))
        .expect("bat");
        let first = data[bat..bat + 4].to_vec();
        assert_ne!(first, [0xFF; 4], "qemu-io allocated block 0");
        // A block past the end of the file.
        let mut bad = data.clone();
        bad[bat..bat + 4].copy_from_slice(&0x00FF_FFFFu32.to_be_bytes());
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // A block over the BAT.
        let mut bad = data.clone();
        bad[bat..bat + 4].copy_from_slice(&u32::try_from(bat / 512).expect("sector").to_be_bytes());
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // Two virtual blocks sharing one block in the file.
        let mut bad = data.clone();
        bad[bat + 4..bat + 8].copy_from_slice(&first);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_truncated() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let n = data.len();
        for cut in [512, 600, 1024, 1536, 2048, 4096, n / 2, n - 512, n - 1] {
            assert_matches!(
                check(&data[..cut]),
                Err(FormatError::Truncated(_) | FormatError::Corrupt(_)),
                "cut at {cut}"
            );
        }
        // A fixed disk cut short keeps its footer only if the cut removed data, which we catch.
        let dir = tempfile::tempdir().expect("tempdir");
        let fixed = std::fs::read(create(dir.path(), "f.vhd", "fixed")).expect("read");
        let mut short = fixed[..1 << 20].to_vec();
        short.extend_from_slice(&fixed[fixed.len() - 512..]);
        assert_matches!(check(&short), Err(FormatError::Truncated(_)));
    }

    #[test]
    fn never_panics_on_prefixes_or_flips() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = dynamic();
        let n = data.len();
        let at = dyn_offset(&data);
        flips_never_panic(
            &data,
            DiskFormat::Vhd,
            (0..4096.min(n)).chain((4096..n).step_by(509)),
            0x9E37_79B9_7F4A_7C15,
            3000,
            // Header region, dynamic header + BAT, or the trailing footer.
            |r| match r % 3 {
                0 => r / 3 % 512,
                1 => at + r / 3 % 2048,
                _ => n - 512 + r / 3 % 512,
            },
            // Half the time, make the checksums right so the flip reaches deeper checks.
            |i, bad| {
                if i.is_multiple_of(2) {
                    let footer = bad[n - 512..].to_vec();
                    patch_footers(bad, |f| f.copy_from_slice(&footer));
                    if dyn_offset(bad) == at {
                        patch_dyn(bad, |_| {});
                    }
                }
            },
        );
    }
}
