//! QED (QEMU Enhanced Disk), without backing files.
//!
//! Layout (all fields little-endian): a 64-byte header at offset 0 ("QED\0") inside a header
//! area of `header_size` clusters, then an L1 table of `table_size` clusters at
//! `l1_table_offset` whose non-zero entries point at L2 tables of the same size, whose entries
//! point at data clusters.

use super::{
    FormatError, Limits, ReadAt, check_metadata, check_size, le32, le64, read_exact, read_some,
};

const MAGIC: &[u8] = b"QED\0";
const HEADER_LEN: usize = 64;

/// The image reads unallocated clusters from a backing file.
pub(super) const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly; its tables need a consistency check.
const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw and must not be probed.
const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

const MIN_CLUSTER: u32 = 4 << 10;
const MAX_CLUSTER: u32 = 64 << 20;
const MIN_TABLE: u32 = 1;
const MAX_TABLE: u32 = 16;
/// Longest backing file name we read to report it (qemu's own buffer is a path's length).
const MAX_BACKING_NAME: u32 = 4096;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    // Every QED image starts with its magic.
    Ok(read_some(r, 0, MAGIC.len())? == MAGIC)
}

/// The header's fields (qemu's `QEDHeader`).
pub(super) struct Header {
    pub(super) cluster_size: u32,
    /// In clusters.
    pub(super) table_size: u32,
    /// In clusters.
    pub(super) header_size: u32,
    pub(super) features: u64,
    pub(super) compat_features: u64,
    pub(super) autoclear_features: u64,
    pub(super) l1_offset: u64,
    pub(super) image_size: u64,
    pub(super) backing_offset: u32,
    pub(super) backing_size: u32,
}

/// Reads the header at offset 0 (`what` names it if the file is too short) and checks its
/// magic.
pub(super) fn read_header(r: &dyn ReadAt, what: &str) -> Result<Header, FormatError> {
    let h = read_exact(r, 0, HEADER_LEN, what)?;
    if !h.starts_with(MAGIC) {
        return Err(FormatError::Corrupt("no QED magic at offset 0".into()));
    }
    Ok(Header {
        cluster_size: le32(&h, 4),
        table_size: le32(&h, 8),
        header_size: le32(&h, 12),
        features: le64(&h, 16),
        compat_features: le64(&h, 24),
        autoclear_features: le64(&h, 32),
        l1_offset: le64(&h, 40),
        image_size: le64(&h, 48),
        backing_offset: le32(&h, 56),
        backing_size: le32(&h, 60),
    })
}

pub(super) fn inspect(r: &dyn ReadAt, limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    // inspect() runs only after probe(); the magic is re-checked so this function stands on
    // its own.
    let Header {
        cluster_size,
        table_size,
        header_size,
        features,
        compat_features,
        autoclear_features,
        l1_offset,
        image_size,
        backing_offset,
        backing_size,
    } = read_header(r, "QED header")?;

    // Unknown feature bits change the on-disk format in ways we cannot know.
    if features & !KNOWN_FEATURES != 0 {
        return Err(FormatError::UnknownFeatures(features & !KNOWN_FEATURES));
    }
    // A backing file is read for every unallocated cluster: a path outside the image. A name
    // without the feature bit is refused too, since a lenient reader might still follow it.
    if features & F_BACKING_FILE != 0 || backing_offset != 0 || backing_size != 0 {
        return Err(FormatError::BackingFile(backing_name(
            r,
            backing_offset,
            backing_size,
        )));
    }

    check_geometry(cluster_size, table_size)?;
    let cluster = u64::from(cluster_size);
    let table_bytes = u64::from(table_size) * cluster;
    let header_bytes = u64::from(header_size) * cluster;
    // The header area holds at least the header itself and must lie inside the file.
    if header_size == 0 || header_bytes > file_size {
        return Err(FormatError::Corrupt(format!(
            "header area of {header_size} clusters does not fit the file ({file_size} bytes)"
        )));
    }

    // The size callers will see must be within limits before anything is sized from it.
    check_size(image_size, limits)?;
    // The disk is addressed in 512-byte sectors; a partial sector means a damaged header.
    if !image_size.is_multiple_of(512) {
        return Err(FormatError::Corrupt(format!(
            "image size {image_size} is not a multiple of 512"
        )));
    }
    // Two table levels map at most cluster * entries^2 bytes; more cannot be addressed.
    let entries = table_bytes / 8;
    let max_size = u128::from(cluster) * u128::from(entries) * u128::from(entries);
    if u128::from(image_size) > max_size {
        return Err(FormatError::Corrupt(format!(
            "image size {image_size} exceeds the {max_size} bytes two tables of {table_bytes} bytes can map"
        )));
    }

    // The L1 table is read whole; its size must be bounded before it is allocated.
    check_metadata("QED L1 table", table_bytes, limits)?;
    let l1_end = check_table(
        l1_offset,
        table_bytes,
        cluster,
        header_bytes,
        file_size,
        || "the L1 table".into(),
    )?;
    let l1_len = usize::try_from(table_bytes).map_err(|_| FormatError::MetadataTooLarge {
        what: "QED L1 table",
        size: table_bytes,
        limit: limits.max_metadata_bytes,
    })?;
    let l1 = read_exact(r, l1_offset, l1_len, "QED L1 table")?;
    let mut l2s = Vec::new();
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let offset = le64(e, 0);
        // Zero marks an unallocated L2 table.
        if offset == 0 {
            continue;
        }
        check_table(
            offset,
            table_bytes,
            cluster,
            header_bytes,
            file_size,
            || format!("the L2 table of L1 entry {i}"),
        )?;
        l2s.push(offset);
    }
    // Tables overlapping each other or the L1 table would let one write rewrite another.
    l2s.sort_unstable();
    for w in l2s.windows(2) {
        if let [a, b] = w
            && *b < a.saturating_add(table_bytes)
        {
            return Err(FormatError::Corrupt(format!(
                "the L2 tables at offsets {a} and {b} overlap"
            )));
        }
    }
    let i = l2s.partition_point(|&s| s.saturating_add(table_bytes) <= l1_offset);
    if let Some(&s) = l2s.get(i)
        && s < l1_end
    {
        return Err(FormatError::Corrupt(format!(
            "the L2 table at offset {s} overlaps the L1 table"
        )));
    }

    let mut findings = vec![format!(
        "qed, cluster size {cluster_size}, table size {table_size}"
    )];
    if features & F_NEED_CHECK != 0 {
        findings.push("not closed cleanly (needs a consistency check; qemu repairs it on first read-write open)".into());
    }
    // Unknown compatible and autoclear bits are safe to ignore by definition; worth telling.
    if compat_features != 0 {
        findings.push(format!(
            "unknown compatible feature bits 0x{compat_features:x} ignored"
        ));
    }
    if autoclear_features != 0 {
        findings.push(format!(
            "unknown autoclear feature bits 0x{autoclear_features:x} ignored"
        ));
    }
    findings.push(format!("{} of {entries} L2 tables allocated", l2s.len()));
    Ok((image_size, findings))
}

/// Checks the cluster and table sizes, which cluster addressing shifts, masks and divides by.
pub(super) fn check_geometry(cluster_size: u32, table_size: u32) -> Result<(), FormatError> {
    // The spec allows clusters of powers of two, 4 KiB..64 MiB.
    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) {
        return Err(FormatError::Corrupt(format!(
            "cluster size {cluster_size} is not a power of two between 4 KiB and 64 MiB"
        )));
    }
    // Table size (in clusters) is a power of two from 1 to 16 per the spec.
    if !table_size.is_power_of_two() || !(MIN_TABLE..=MAX_TABLE).contains(&table_size) {
        return Err(FormatError::Corrupt(format!(
            "table size {table_size} is not a power of two between 1 and 16"
        )));
    }
    Ok(())
}

/// Checks a table offset (cluster-aligned, after the header area, whole inside the file: qemu's
/// `qed_check_table_offset`) and returns the table's end; `what()` names the table.
pub(super) fn check_table(
    offset: u64,
    table_bytes: u64,
    cluster: u64,
    header_bytes: u64,
    file_size: u64,
    what: impl FnOnce() -> String,
) -> Result<u64, FormatError> {
    let end = offset.checked_add(table_bytes);
    // Tables are whole clusters after the header; anything else is a damaged pointer that
    // would make reads or writes land in the header or past the end of the file.
    match end {
        Some(end)
            if offset.is_multiple_of(cluster) && offset >= header_bytes && end <= file_size =>
        {
            Ok(end)
        }
        _ => Err(FormatError::Corrupt(format!(
            "{} at offset {offset} is misaligned, inside the header or beyond the file ({file_size} bytes)",
            what()
        ))),
    }
}

/// The backing file name, for the error message (bounded read; a placeholder if unreadable).
fn backing_name(r: &dyn ReadAt, offset: u32, size: u32) -> String {
    if size == 0 {
        return "unnamed backing file".into();
    }
    if size > MAX_BACKING_NAME {
        return format!("a {size}-byte name at offset {offset}");
    }
    match read_some(r, u64::from(offset), size as usize) {
        // The name goes into an error message: stop at a NUL and escape control characters.
        Ok(b) if b.len() == size as usize => {
            let name = b.split(|&c| c == 0).next().unwrap_or_default();
            String::from_utf8_lossy(name).escape_debug().to_string()
        }
        _ => format!("an unreadable name at offset {offset}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::tests_support::{
        Patch, assert_matches, create as qemu_create, flips_never_panic, have_qemu,
    };
    use super::super::{DiskFormat, DiskInfo, FormatError, Limits, inspect};

    /// Creates a 64 MiB qed image with some data written at 1 MiB.
    fn create(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
        qemu_create(dir, name, "qed", extra, "64M", &["write -P 0xab 1M 64k"])
    }

    fn check(data: &[u8]) -> Result<DiskInfo, FormatError> {
        inspect(&data, DiskFormat::Qed, &Limits::default())
    }

    fn image() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "a.qed", &[]);
        let data = std::fs::read(path).expect("read");
        (dir, data)
    }

    fn put32(data: &mut [u8], at: usize, v: u32) {
        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(data: &mut [u8], at: usize, v: u64) {
        data[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn l1_offset(data: &[u8]) -> usize {
        usize::try_from(u64::from_le_bytes(
            data[40..48].try_into().expect("8 bytes"),
        ))
        .expect("offset")
    }

    #[test]
    fn accepts_plain_image() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "a.qed", &[]);
        let file = std::fs::File::open(&path).expect("open");
        let info = inspect(&file, DiskFormat::Qed, &Limits::default()).expect("accepted");
        assert_eq!(info.virtual_size, 64 << 20);
        assert!(info.findings[0].starts_with("qed"), "{:?}", info.findings);
        // Other geometries qemu can make.
        let path = create(
            dir.path(),
            "b.qed",
            &["-o", "cluster_size=4096,table_size=2"],
        );
        let file = std::fs::File::open(&path).expect("open");
        let info = inspect(&file, DiskFormat::Qed, &Limits::default()).expect("accepted");
        assert_eq!(info.virtual_size, 64 << 20);
    }

    #[test]
    fn refuses_backing_file() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        create(dir.path(), "base.qed", &[]);
        let path = create(dir.path(), "top.qed", &["-b", "base.qed", "-F", "qed"]);
        let file = std::fs::File::open(&path).expect("open");
        match inspect(&file, DiskFormat::Qed, &Limits::default()) {
            Err(FormatError::BackingFile(name)) => assert!(name.contains("base.qed"), "{name}"),
            other => panic!("expected BackingFile, got {other:?}"),
        }
        // A backing file name without the feature bit is refused as well.
        let mut data = std::fs::read(&path).expect("read");
        data[16] &= !1;
        assert_matches!(check(&data), Err(FormatError::BackingFile(_)));
        // An absurd name length is reported, not read.
        put32(&mut data, 60, u32::MAX);
        assert_matches!(check(&data), Err(FormatError::BackingFile(_)));
    }

    #[test]
    fn refuses_unknown_features() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = image();
        data[17] |= 1;
        assert_matches!(check(&data), Err(FormatError::UnknownFeatures(0x100)));
    }

    #[test]
    fn accepts_need_check_and_unknown_compat_bits() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = image();
        data[16] |= 2;
        data[24] |= 1;
        data[32] |= 1;
        let info = check(&data).expect("accepted");
        assert_eq!(info.findings.len(), 5, "{:?}", info.findings);
    }

    #[test]
    fn refuses_huge_virtual_size() {
        if !have_qemu() {
            return;
        }
        let (_dir, mut data) = image();
        put64(&mut data, 48, 1 << 60);
        assert_matches!(check(&data), Err(FormatError::TooLarge { .. }));
        // Beyond what the tables can map, with a limit that would allow it.
        put64(&mut data, 48, 1 << 50);
        let limits = Limits {
            max_virtual_size: u64::MAX,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Qed, &limits);
        assert_matches!(got, Err(FormatError::Corrupt(_)));
    }

    #[test]
    fn refuses_l1_over_limit() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = image();
        let limits = Limits {
            max_metadata_bytes: 64 << 10,
            ..Limits::default()
        };
        let got = inspect(&data, DiskFormat::Qed, &limits);
        assert_matches!(got, Err(FormatError::MetadataTooLarge { .. }));
    }

    #[test]
    fn refuses_inconsistent_header() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = image();
        let l1 = l1_offset(&data);
        let cases: [(&str, Patch); 10] = [
            (
                "cluster size not a power of two",
                Box::new(|d| put32(d, 4, 3000)),
            ),
            ("cluster size too small", Box::new(|d| put32(d, 4, 2048))),
            (
                "cluster size too large",
                Box::new(|d| put32(d, 4, 128 << 20)),
            ),
            (
                "table size not a power of two",
                Box::new(|d| put32(d, 8, 3)),
            ),
            ("table size too large", Box::new(|d| put32(d, 8, 32))),
            ("no header area", Box::new(|d| put32(d, 12, 0))),
            (
                "header area beyond the file",
                Box::new(|d| put32(d, 12, 1000)),
            ),
            (
                "partial sector",
                Box::new(|d| put64(d, 48, (64 << 20) + 100)),
            ),
            ("L1 beyond the file", Box::new(|d| put64(d, 40, 1 << 40))),
            ("L1 misaligned", Box::new(|d| put64(d, 40, 65536 + 512))),
        ];
        for (what, f) in cases {
            let mut bad = data.clone();
            f(&mut bad);
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "{what}");
        }
        // L1 inside the header.
        let mut bad = data.clone();
        put64(&mut bad, 40, 0);
        assert_matches!(check(&bad), Err(FormatError::Corrupt(_)));
        // L2 entries: beyond the file, misaligned, over the L1 table, shared.
        let first = bad[l1..l1 + 8].to_vec();
        assert_ne!(first, [0; 8], "qemu-io allocated an L2 table");
        let n = data.len() as u64;
        for (what, index, v) in [
            ("beyond the file", 0, n),
            ("misaligned", 0, 0x1_0200),
            ("over the L1 table", 0, l1 as u64),
            (
                "shared",
                1,
                u64::from_le_bytes(first.clone().try_into().expect("8 bytes")),
            ),
        ] {
            let mut bad = data.clone();
            put64(&mut bad, l1 + 8 * index, v);
            assert_matches!(check(&bad), Err(FormatError::Corrupt(_)), "L2 {what}");
        }
    }

    #[test]
    fn refuses_truncated() {
        if !have_qemu() {
            return;
        }
        let (_dir, data) = image();
        let l1 = l1_offset(&data);
        for cut in [
            4,
            32,
            63,
            64,
            4096,
            l1,
            l1 + 8,
            l1 + 100_000,
            l1 + (256 << 10),
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
        let (_dir, data) = image();
        let n = data.len();
        let l1 = l1_offset(&data);
        flips_never_panic(
            &data,
            DiskFormat::Qed,
            (0..2048).chain((2048..n).step_by(4093)),
            0xDEAD_BEEF_CAFE_F00D,
            3000,
            |r| {
                if r.is_multiple_of(4) {
                    l1 + r / 4 % 64
                } else {
                    r / 4 % 64
                }
            },
            |_, _| {},
        );
    }
}
