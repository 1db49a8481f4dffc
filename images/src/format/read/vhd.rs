//! VHD (qemu's "vpc") as its logical disk: fixed disks are the file's first `current_size`
//! bytes; dynamic disks map 512-byte-sector blocks through a big-endian BAT, each allocated
//! block being a sector bitmap followed by the block's data.
//!
//! The sector bitmap is not consulted, as in qemu's vpc driver (it marks every sector of a
//! block it allocates as present, and reads allocated blocks whole): the logical disk is what
//! `qemu-img convert` makes of the image. Differencing disks never get here (the inspector
//! refuses them), so the bitmap would only matter for sectors a writer left unmarked.

use super::super::vhd::{
    COOKIE, D_BLOCK_SIZE, D_MAX_ENTRIES, D_TABLE_OFFSET, DISK_DIFFERENCING, DISK_DYNAMIC,
    DISK_FIXED, DYN_COOKIE, DYN_HEADER_LEN, F_CURRENT_SIZE, F_DATA_OFFSET, F_DISK_TYPE, FOOTER_LEN,
    SECTOR, UNALLOCATED, bitmap_len, check_block_size, leads_with_dynamic_footer,
};
use super::super::{
    DiskFormat, DiskInfo, FormatError, Limits, ReadAt, be32, be64, check_metadata, read_exact,
};
use super::{Locate, Logical, Mapped, Run, same_size};

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let footer_at = file_size.checked_sub(FOOTER_LEN as u64).ok_or_else(|| {
        FormatError::Truncated(format!(
            "a VHD needs a 512-byte footer, the file has {file_size} bytes"
        ))
    })?;
    // A dynamic disk by the footer's copy at its start, as qemu reads it (inspection of the
    // whole file made sure both copies agree), so a file still arriving converts at once.
    let head = read_exact(&r, 0, FOOTER_LEN, "the VHD footer copy")?;
    let footer = if footer_at != 0 && leads_with_dynamic_footer(&head) {
        head
    } else {
        read_exact(&r, footer_at, FOOTER_LEN, "the VHD footer")?
    };
    if !footer.starts_with(COOKIE) {
        return Err(FormatError::Corrupt(
            "the VHD footer is missing at the end of the file".into(),
        ));
    }
    let size = be64(&footer, F_CURRENT_SIZE);
    same_size(size, info)?;
    let map = match be32(&footer, F_DISK_TYPE) {
        DISK_FIXED => {
            // The data is the first `size` bytes; the footer must not be part of it.
            if size > footer_at {
                return Err(FormatError::Truncated(format!(
                    "the fixed disk needs {size} data bytes before its footer, the file has {footer_at}"
                )));
            }
            Map::Fixed { size }
        }
        DISK_DYNAMIC => dynamic_map(&r, &footer, footer_at, size, limits)?,
        DISK_DIFFERENCING => return Err(FormatError::Differencing),
        other => {
            return Err(FormatError::Unsupported {
                format: DiskFormat::Vhd,
                detail: format!("disk type {other}"),
            });
        }
    };
    Ok(Box::new(Mapped {
        r,
        size,
        // Where the footer starts.
        data_end: footer_at,
        map,
    }))
}

/// Reads the dynamic header and the BAT (bounded by the metadata limit).
fn dynamic_map(
    r: &dyn ReadAt,
    footer: &[u8],
    footer_at: u64,
    size: u64,
    limits: &Limits,
) -> Result<Map, FormatError> {
    let data_offset = be64(footer, F_DATA_OFFSET);
    if data_offset
        .checked_add(DYN_HEADER_LEN as u64)
        .is_none_or(|end| end > footer_at)
    {
        return Err(FormatError::Corrupt(format!(
            "the dynamic header at {data_offset} lies past the end of the file"
        )));
    }
    let dh = read_exact(r, data_offset, DYN_HEADER_LEN, "the VHD dynamic header")?;
    if !dh.starts_with(DYN_COOKIE) {
        return Err(FormatError::Corrupt(format!(
            "no dynamic header (\"cxsparse\") at offset {data_offset}"
        )));
    }
    let block_size = be32(&dh, D_BLOCK_SIZE);
    check_block_size(block_size)?;
    let block_size = u64::from(block_size);
    let entries = be32(&dh, D_MAX_ENTRIES);
    let bat_bytes = u64::from(entries) * 4;
    check_metadata("VHD block allocation table", bat_bytes, limits)?;
    if u64::from(entries) * block_size < size {
        return Err(FormatError::Corrupt(format!(
            "{entries} blocks of {block_size} bytes do not cover the virtual size {size}"
        )));
    }
    let table_offset = be64(&dh, D_TABLE_OFFSET);
    if table_offset
        .checked_add(bat_bytes)
        .is_none_or(|end| end > footer_at)
    {
        return Err(FormatError::Corrupt(format!(
            "the BAT at {table_offset} ({bat_bytes} bytes) lies past the end of the file"
        )));
    }
    let bat = read_exact(
        r,
        table_offset,
        bat_bytes as usize,
        "the VHD block allocation table",
    )?
    .chunks_exact(4)
    .map(|e| be32(e, 0))
    .collect();
    Ok(Map::Dynamic {
        bat,
        block_size,
        bitmap_len: bitmap_len(block_size),
    })
}

enum Map {
    /// The disk is the file's first `size` bytes.
    Fixed { size: u64 },
    Dynamic {
        bat: Vec<u32>,
        block_size: u64,
        bitmap_len: u64,
    },
}

impl Locate for Map {
    fn locate(&mut self, _: &dyn ReadAt, pos: u64) -> Result<Run, FormatError> {
        match *self {
            Map::Fixed { size } => Ok(Run::Data {
                at: pos,
                len: size - pos,
            }),
            Map::Dynamic {
                ref bat,
                block_size,
                bitmap_len,
            } => {
                let index = pos / block_size;
                let within = pos % block_size;
                let len = block_size - within;
                let entry = usize::try_from(index)
                    .ok()
                    .and_then(|i| bat.get(i))
                    .copied()
                    .ok_or_else(|| {
                        FormatError::Corrupt(format!("block {index} is beyond the BAT"))
                    })?;
                if entry == UNALLOCATED {
                    return Ok(Run::Zero { len });
                }
                let at = u64::from(entry) * SECTOR + bitmap_len + within;
                Ok(Run::Data { at, len })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests_support::{
        assert_matches, check_conversions, convert, open_file, qemu_raw, read_all, read_damaged,
        sample_raw, write,
    };
    use super::super::super::{DiskFormat, FormatError, Limits, ReadAt, inspect, inspect_claimed};
    use super::super::open;

    fn be32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    fn be64_at(b: &[u8], at: usize) -> usize {
        usize::try_from(u64::from_be_bytes(
            b[at..at + 8].try_into().expect("8 bytes"),
        ))
        .expect("offset")
    }

    /// The BAT's offset in a dynamic VHD.
    fn bat_offset(data: &[u8]) -> usize {
        let dyn_header = be64_at(data, 16);
        be64_at(data, dyn_header + 16)
    }

    #[test]
    fn vhd_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_, disk) = check_conversions(
            dir.path(),
            DiskFormat::Vhd,
            "vpc",
            "vhd",
            &[
                // Without force_size qemu rounds the size up to a CHS geometry: zero padding.
                ("dynamic", &["-o", "subformat=dynamic"]),
                ("dynamic-exact", &["-o", "subformat=dynamic,force_size=on"]),
                ("fixed", &["-o", "subformat=fixed"]),
                ("fixed-exact", &["-o", "subformat=fixed,force_size=on"]),
            ],
        );
        // force_size keeps the exact size.
        let (info, _) = open_file(&dir.path().join("dynamic-exact.vhd"), DiskFormat::Vhd);
        assert_eq!(info.virtual_size, disk.len() as u64);
    }

    /// A file whose last 512 bytes (a VHD's footer) have not arrived: reads reaching them fail.
    struct FooterToCome(Vec<u8>);

    impl ReadAt for FooterToCome {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            if offset + buf.len() as u64 > self.0.len() as u64 - 512 {
                return Err(std::io::Error::other("the footer has not arrived"));
            }
            self.0.read_at(buf, offset)
        }

        fn size(&self) -> std::io::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    /// A dynamic disk is checked and read by the footer's copy at its start, so its upload
    /// converts before the footer arrives; only the whole file's inspection needs the footer.
    /// A fixed disk has nothing but its footer to go by.
    #[test]
    fn a_dynamic_vhd_converts_before_its_footer_arrives() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let limits = Limits::default();
        let dynamic = convert(
            &raw,
            dir.path().join("d.vhd"),
            "vpc",
            &["-o", "subformat=dynamic"],
        );
        let whole = std::fs::read(&dynamic).expect("read");
        let expected = inspect(&whole, DiskFormat::Vhd, &limits).expect("whole file");
        let arriving = FooterToCome(whole);
        let early = inspect_claimed(&arriving, DiskFormat::Vhd, &limits).expect("its start");
        assert_eq!(early, expected);
        let err = inspect(&arriving, DiskFormat::Vhd, &limits).expect_err("needs its end");
        assert!(err.to_string().contains("not arrived"), "{err}");
        let mut reader = open(arriving, &early, &limits).expect("open");
        let out = read_all(&mut *reader).expect("read");
        assert!(
            out[..disk.len()] == disk[..],
            "the disk, from its start alone"
        );

        let fixed = convert(
            &raw,
            dir.path().join("f.vhd"),
            "vpc",
            &["-o", "subformat=fixed"],
        );
        let arriving = FooterToCome(std::fs::read(&fixed).expect("read"));
        let err = inspect_claimed(&arriving, DiskFormat::Vhd, &limits).expect_err("no copy");
        assert!(err.to_string().contains("not arrived"), "{err}");
    }

    /// Like qemu, a dynamic disk's allocated block reads whole, whatever its sector bitmap
    /// says; a damaged block pointer is an error, never a panic.
    #[test]
    fn vhd_bitmap_ignored_and_bad_bat_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let image = convert(
            &raw,
            dir.path().join("d.vhd"),
            "vpc",
            &["-o", "subformat=dynamic,force_size=on"],
        );
        let (info, _) = open_file(&image, DiskFormat::Vhd);
        let data = std::fs::read(&image).expect("read");
        let bat = bat_offset(&data);
        let block0 = be32_at(&data, bat) as usize * 512;
        assert_ne!(be32_at(&data, bat), 0xFFFF_FFFF, "block 0 holds data");

        let mut cleared = data.clone();
        cleared[block0..block0 + 512].fill(0);
        let cleared_path = dir.path().join("cleared.vhd");
        write(&cleared_path, &cleared);
        let (_, mut reader) = open_file(&cleared_path, DiskFormat::Vhd);
        let got = read_all(&mut *reader).expect("reads");
        assert!(got == disk, "an allocated block reads whole");
        assert!(got == qemu_raw(&cleared_path, "vpc"), "as qemu reads it");

        for (what, entry) in [
            ("far past the end", 0x00FF_FFFFu32),
            (
                "data running into the footer",
                (data.len() / 512 - 2) as u32,
            ),
        ] {
            let mut bad = data.clone();
            bad[bat..bat + 4].copy_from_slice(&entry.to_be_bytes());
            assert_matches!(
                read_damaged(dir.path(), &bad, &info),
                Err(FormatError::Corrupt(_)),
                "{what}"
            );
        }
        // A fixed disk cut short.
        let fixed = convert(
            &raw,
            dir.path().join("f.vhd"),
            "vpc",
            &["-o", "subformat=fixed,force_size=on"],
        );
        let (info, _) = open_file(&fixed, DiskFormat::Vhd);
        let data = std::fs::read(&fixed).expect("read");
        let mut short = data[..1 << 20].to_vec();
        short.extend_from_slice(&data[data.len() - 512..]);
        assert_matches!(
            read_damaged(dir.path(), &short, &info),
            Err(FormatError::Truncated(_))
        );
    }
}
