//! VHD (qemu's "vpc") as its logical disk: fixed disks are the file's first `current_size`
//! bytes; dynamic disks map 512-byte-sector blocks through a big-endian BAT, each allocated
//! block being a sector bitmap followed by the block's data.
//!
//! The sector bitmap is not consulted, as in qemu's vpc driver (it marks every sector of a
//! block it allocates as present, and reads allocated blocks whole): the logical disk is what
//! `qemu-img convert` makes of the image. Differencing disks never get here (the inspector
//! refuses them), so the bitmap would only matter for sectors a writer left unmarked.
//!
//! Also home of [`Run`] and [`read_runs`], the read loop shared by the VHD, VHDX, VDI and QED
//! readers (candidates for `read/mod.rs`).

use std::io;

use super::super::{
    DiskFormat, DiskInfo, FormatError, Limits, ReadAt, be32, be64, check_metadata, read_exact,
};
use super::Logical;

const FOOTER_LEN: u64 = 512;
const COOKIE: &[u8] = b"conectix";
const DYN_HEADER_LEN: usize = 1024;
const DYN_COOKIE: &[u8] = b"cxsparse";
const SECTOR: u64 = 512;
const UNALLOCATED: u32 = 0xFFFF_FFFF;
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
const MIN_BLOCK: u32 = 512;
const MAX_BLOCK: u32 = 256 << 20;

// Footer fields.
const F_DATA_OFFSET: usize = 16;
const F_CURRENT_SIZE: usize = 48;
const F_DISK_TYPE: usize = 60;
// Dynamic header fields.
const D_TABLE_OFFSET: usize = 16;
const D_MAX_ENTRIES: usize = 28;
const D_BLOCK_SIZE: usize = 32;

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let footer_at = file_size.checked_sub(FOOTER_LEN).ok_or_else(|| {
        FormatError::Truncated(format!(
            "a VHD needs a 512-byte footer, the file has {file_size} bytes"
        ))
    })?;
    let footer = read_exact(&r, footer_at, FOOTER_LEN as usize, "the VHD footer")?;
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
            Map::Fixed
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
    Ok(Box::new(Vhd {
        r,
        size,
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
    // Blocks are found by division; a zero or absurd size would divide by zero or overflow.
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(FormatError::Corrupt(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )));
    }
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
        // One bit per sector, padded to whole sectors.
        bitmap_len: block_size.div_ceil(SECTOR * 8).next_multiple_of(SECTOR),
    })
}

struct Vhd<R> {
    r: R,
    size: u64,
    /// Where the footer starts: no disk byte lies at or past it.
    data_end: u64,
    map: Map,
}

enum Map {
    Fixed,
    Dynamic {
        bat: Vec<u32>,
        block_size: u64,
        bitmap_len: u64,
    },
}

impl Map {
    fn locate(&self, pos: u64, size: u64) -> Result<Run, FormatError> {
        match self {
            Map::Fixed => Ok(Run::Data {
                at: pos,
                len: size - pos,
            }),
            Map::Dynamic {
                bat,
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

impl<R: ReadAt + Send> Logical for Vhd<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        let (map, size) = (&self.map, self.size);
        read_runs(&self.r, self.data_end, size, buf, offset, |_, pos| {
            map.locate(pos, size)
        })
    }
}

/// Refuses a file whose size field no longer says what inspection saw.
pub(super) fn same_size(size: u64, info: &DiskInfo) -> Result<(), FormatError> {
    if size != info.virtual_size {
        return Err(FormatError::Corrupt(format!(
            "the image now says {size} bytes, inspection saw {}; inspect it again",
            info.virtual_size
        )));
    }
    Ok(())
}

/// Where the stretch of logical disk starting at some position lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Run {
    /// `len` bytes stored contiguously in the file from `at`.
    Data { at: u64, len: u64 },
    /// `len` bytes that read as zeroes.
    Zero { len: u64 },
}

/// Fills `buf` with the logical disk at `offset`: `locate(r, pos)` says where the stretch
/// starting at `pos` lives (it may be longer than needed). Every stored stretch must end at or
/// before `data_end` (where the file's data area ends), or the read fails as corrupt; stored
/// stretches that follow each other in the file are read with one call.
pub(super) fn read_runs(
    r: &dyn ReadAt,
    data_end: u64,
    virtual_size: u64,
    buf: &mut [u8],
    offset: u64,
    mut locate: impl FnMut(&dyn ReadAt, u64) -> Result<Run, FormatError>,
) -> Result<(), FormatError> {
    if offset
        .checked_add(buf.len() as u64)
        .is_none_or(|end| end > virtual_size)
    {
        return Err(FormatError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a read of {} bytes at {offset} goes past the end of the {virtual_size}-byte disk",
                buf.len()
            ),
        )));
    }
    // A stored stretch not yet read: (position in buf, file offset, length).
    let mut pending: Option<(usize, u64, usize)> = None;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let run = locate(r, pos)?;
        let len = match run {
            Run::Data { len, .. } | Run::Zero { len } => len,
        };
        // An empty run would never finish the read.
        if len == 0 {
            return Err(FormatError::Corrupt(format!(
                "no data maps logical offset {pos}"
            )));
        }
        let take = usize::try_from(len).map_or(buf.len() - done, |l| l.min(buf.len() - done));
        match run {
            Run::Zero { .. } => {
                flush(r, data_end, buf, pending.take())?;
                buf[done..done + take].fill(0);
            }
            Run::Data { at, .. } => match &mut pending {
                Some((_, p_at, p_len)) if p_at.checked_add(*p_len as u64) == Some(at) => {
                    *p_len += take;
                }
                _ => {
                    flush(r, data_end, buf, pending.take())?;
                    pending = Some((done, at, take));
                }
            },
        }
        done += take;
    }
    flush(r, data_end, buf, pending)
}

/// Reads one stored stretch into its place in `buf`, after checking it lies inside the file.
fn flush(
    r: &dyn ReadAt,
    data_end: u64,
    buf: &mut [u8],
    pending: Option<(usize, u64, usize)>,
) -> Result<(), FormatError> {
    let Some((start, at, len)) = pending else {
        return Ok(());
    };
    if at.checked_add(len as u64).is_none_or(|end| end > data_end) {
        return Err(FormatError::Corrupt(format!(
            "data at offset {at} ({len} bytes) lies past the end of the file's data area ({data_end} bytes)"
        )));
    }
    let out = &mut buf[start..start + len];
    let n = r.read_at(out, at)?;
    if n < len {
        return Err(FormatError::Truncated(format!(
            "data at offset {at} ({len} bytes) is cut short at {}",
            at + n as u64
        )));
    }
    Ok(())
}

/// Shared by the VHD, VHDX, VDI and QED reader tests: a sample disk, qemu conversions, and
/// reading a whole logical disk in odd pieces.
#[cfg(test)]
pub(super) mod testing {
    use std::path::{Path, PathBuf};

    use super::super::super::tests_support::{qemu_img, write};
    use super::super::super::{DiskFormat, DiskInfo, FormatError, Limits, inspect};
    use super::super::{Logical, open};

    /// 20 MiB + 12 KiB (a partial last block in every format): data stretches that differ
    /// every 4 KiB, 1 MiB holes, a few unaligned bytes across block boundaries, data at the
    /// very end.
    pub fn sample_disk() -> Vec<u8> {
        let mut disk = vec![0u8; (20 << 20) + (12 << 10)];
        for (i, chunk) in disk.chunks_mut(1 << 20).enumerate() {
            if i % 3 != 1 {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (i * 31 + j / 4096) as u8 | 1;
                }
            }
        }
        // Inside holes, straddling 1 MiB and 2 MiB boundaries (and 64 KiB clusters).
        disk[(4 << 20) - 3..(4 << 20) + 3].fill(0xee);
        disk[(7 << 20) + 65_535] = 0x5a;
        disk[(10 << 20) + 1] = 0xa5;
        let n = disk.len();
        disk[n - 5..].fill(0x77);
        disk
    }

    /// Writes the sample disk as `disk.raw` in `dir`, returning its path and content.
    pub fn sample_raw(dir: &Path) -> (PathBuf, Vec<u8>) {
        let disk = sample_disk();
        let raw = dir.join("disk.raw");
        write(&raw, &disk);
        (raw, disk)
    }

    /// `qemu-img convert -f raw -O <format> [opts] raw out`.
    pub fn convert_to(raw: &Path, out: &Path, format: &str, opts: &[&str]) {
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
        args.extend_from_slice(opts);
        args.push(raw.to_str().expect("utf-8 path"));
        args.push(out.to_str().expect("utf-8 path"));
        qemu_img(&args);
    }

    /// What qemu makes of the image: `qemu-img convert -O raw`.
    pub fn qemu_raw(image: &Path, qemu_format: &str) -> Vec<u8> {
        let out = image.with_extension("qemu.raw");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            qemu_format,
            "-O",
            "raw",
            image.to_str().expect("utf-8 path"),
            out.to_str().expect("utf-8 path"),
        ]);
        let data = std::fs::read(&out).expect("read");
        std::fs::remove_file(&out).expect("remove");
        data
    }

    /// Inspects and opens an image file.
    pub fn open_file(image: &Path, format: DiskFormat) -> (DiskInfo, Box<dyn Logical>) {
        let file = std::fs::File::open(image).expect("open");
        let info = inspect(&file, format, &Limits::default()).expect("accepted");
        let reader = open(file, &info, &Limits::default()).expect("opens");
        (info, reader)
    }

    /// Reads the whole logical disk in odd pieces that cross block boundaries.
    pub fn read_all(reader: &mut dyn Logical) -> Result<Vec<u8>, FormatError> {
        let size = usize::try_from(reader.virtual_size()).expect("size");
        let mut out = vec![0u8; size];
        let mut at = 0;
        for piece in [1usize, 4095, 70_000, 1 << 20, (9 << 20) + 1, 513]
            .iter()
            .cycle()
        {
            if at >= size {
                break;
            }
            let n = (*piece).min(size - at);
            reader.read_logical(&mut out[at..at + n], at as u64)?;
            at += n;
        }
        Ok(out)
    }

    /// Inspects and reads `image` whole, and checks the result against qemu's conversion
    /// and against `disk` (the logical disk may be longer, zero-padded).
    pub fn check_image(image: &Path, format: DiskFormat, qemu_format: &str, disk: &[u8]) {
        let (info, mut reader) = open_file(image, format);
        assert_eq!(reader.virtual_size(), info.virtual_size);
        let got = read_all(&mut *reader).expect("reads");
        let name = image.display();
        assert!(got.len() >= disk.len(), "{name}: {} bytes", got.len());
        assert!(
            got[..disk.len()] == *disk,
            "{name}: logical content differs"
        );
        assert!(
            got[disk.len()..].iter().all(|&b| b == 0),
            "{name}: the padding is not zero"
        );
        assert!(
            got == qemu_raw(image, qemu_format),
            "{name}: differs from qemu-img convert"
        );
        // Reads past the end are refused, not zero-filled or wrapped.
        let mut one = [0u8; 2];
        assert!(
            reader
                .read_logical(&mut one, info.virtual_size - 1)
                .is_err()
        );
        assert!(reader.read_logical(&mut one, u64::MAX).is_err());
        assert!(reader.read_logical(&mut [], info.virtual_size).is_ok());
    }

    /// Opens `bytes` (a damaged copy of an inspected image) with the original image's
    /// inspection result and reads it whole.
    pub fn read_damaged(dir: &Path, bytes: &[u8], info: &DiskInfo) -> Result<Vec<u8>, FormatError> {
        let path = dir.join("damaged.img");
        write(&path, bytes);
        let file = std::fs::File::open(&path).expect("open");
        let mut reader = open(file, info, &Limits::default())?;
        read_all(&mut *reader)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::DiskFormat;
    use super::super::super::FormatError;
    use super::testing::{check_image, convert_to, open_file, qemu_raw, read_all, read_damaged};

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
        let (raw, disk) = super::testing::sample_raw(dir.path());
        for (name, opts) in [
            // Without force_size qemu rounds the size up to a CHS geometry: zero padding.
            ("dynamic", "subformat=dynamic"),
            ("dynamic-exact", "subformat=dynamic,force_size=on"),
            ("fixed", "subformat=fixed"),
            ("fixed-exact", "subformat=fixed,force_size=on"),
        ] {
            let image = dir.path().join(format!("{name}.vhd"));
            convert_to(&raw, &image, "vpc", &["-o", opts]);
            check_image(&image, DiskFormat::Vhd, "vpc", &disk);
        }
        // force_size keeps the exact size.
        let (info, _) = open_file(&dir.path().join("dynamic-exact.vhd"), DiskFormat::Vhd);
        assert_eq!(info.virtual_size, disk.len() as u64);
    }

    /// Like qemu, a dynamic disk's allocated block reads whole, whatever its sector bitmap
    /// says; a damaged block pointer is an error, never a panic.
    #[test]
    fn vhd_bitmap_ignored_and_bad_bat_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = super::testing::sample_raw(dir.path());
        let image = dir.path().join("d.vhd");
        convert_to(
            &raw,
            &image,
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
        std::fs::write(&cleared_path, &cleared).expect("write");
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
            let got = read_damaged(dir.path(), &bad, &info);
            assert!(
                matches!(got, Err(FormatError::Corrupt(_))),
                "{what}: {:?}",
                got.map(|_| ())
            );
        }
        // A fixed disk cut short.
        let fixed = dir.path().join("f.vhd");
        convert_to(
            &raw,
            &fixed,
            "vpc",
            &["-o", "subformat=fixed,force_size=on"],
        );
        let (info, _) = open_file(&fixed, DiskFormat::Vhd);
        let data = std::fs::read(&fixed).expect("read");
        let mut short = data[..1 << 20].to_vec();
        short.extend_from_slice(&data[data.len() - 512..]);
        let got = read_damaged(dir.path(), &short, &info);
        assert!(
            matches!(got, Err(FormatError::Truncated(_))),
            "{:?}",
            got.map(|_| ())
        );
    }
}
