//! Reading an accepted image as its logical disk: every format maps logical offsets to places in
//! the file (or to zeroes), and [`Logical::read_logical`] fills a buffer with disk bytes. Only
//! called after [`super::inspect`] accepted the file, and still defensive: every file offset a
//! table yields is checked against the file's size, and a bad one is an error, never a panic.
//!
//! Memory is bounded: the qcow2 reader holds its L1 table (checked against the metadata limit)
//! and a few L2 tables; nothing is proportional to the disk.

mod qcow2;
mod qed;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

use std::io;

use super::{DiskFormat, DiskInfo, FormatError, Limits, ReadAt};

/// An image as the disk it describes.
pub trait Logical: Send {
    fn virtual_size(&self) -> u64;
    /// Fills `buf` with the disk's bytes at `offset` (unallocated areas read as zeroes).
    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError>;

    /// Whether the `len` bytes at `offset` are known from the image's tables alone to read as
    /// zeroes (unallocated, or marked zero): a caller may skip reading them. `false` when the
    /// format cannot tell without reading (raw) or part of the range holds data.
    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, FormatError> {
        let _ = (offset, len);
        Ok(false)
    }
}

/// Where the stretch of logical disk starting at some position lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// `len` bytes stored contiguously in the file from `at`.
    Data { at: u64, len: u64 },
    /// `len` bytes that read as zeroes.
    Zero { len: u64 },
}

/// Where a format's tables put each stretch of its logical disk.
trait Locate: Send {
    /// Where the stretch starting at `pos` lives (`r` is the file, for tables read lazily).
    fn locate(&mut self, r: &dyn ReadAt, pos: u64) -> Result<Run, FormatError>;
}

/// An image whose map says where each stretch of its disk lives, read with [`read_runs`]: the
/// VHD, VHDX, VDI and QED readers.
struct Mapped<R, M> {
    r: R,
    size: u64,
    /// Where the file's data area ends: no disk byte lies at or past it.
    data_end: u64,
    map: M,
}

impl<R: ReadAt + Send, M: Locate> Logical for Mapped<R, M> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        let map = &mut self.map;
        read_runs(&self.r, self.data_end, self.size, buf, offset, |r, pos| {
            map.locate(r, pos)
        })
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, FormatError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            match self.map.locate(&self.r, pos)? {
                Run::Zero { len } if len > 0 => pos = pos.saturating_add(len),
                _ => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// [`Logical::is_hole`] for formats mapped in fixed units (qcow2 clusters, VMDK grains):
/// whether every unit the range touches reads as zeroes (`zero(index)`).
fn units_are_zero(
    offset: u64,
    len: u64,
    unit: u64,
    mut zero: impl FnMut(u64) -> Result<bool, FormatError>,
) -> Result<bool, FormatError> {
    let last = offset.saturating_add(len).div_ceil(unit.max(1));
    for index in offset / unit.max(1)..last {
        if !zero(index)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fills `buf` with the logical disk at `offset`: `locate(r, pos)` says where the stretch
/// starting at `pos` lives (it may be longer than needed). Every stored stretch must end at or
/// before `data_end` (where the file's data area ends), or the read fails as corrupt; stored
/// stretches that follow each other in the file are read with one call.
fn read_runs(
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

/// A disk made of units (a qcow2 cluster, a VMDK grain) that the format reads one at a time
/// (some compressed, some split up), though many are stored as they are, one after another.
trait Units {
    /// Bytes per unit.
    fn unit(&self) -> u64;
    /// Fills `out`, one unit long, with unit `index`.
    fn read_unit(&mut self, index: u64, out: &mut [u8]) -> Result<(), FormatError>;
    /// Where unit `index`'s bytes lie in the file, if they are stored as they are (not
    /// compressed, not zero, not split up).
    fn stored_at(&mut self, index: u64) -> Result<Option<u64>, FormatError>;
    /// Reads stored bytes at file offset `at` into `out`, checking they lie inside the file.
    fn read_stored(&self, at: u64, out: &mut [u8]) -> Result<(), FormatError>;
}

/// Fills `buf` with the logical disk at `offset`, unit by unit: whole units straight into
/// `buf` — a run of them stored one after another in the file (as in any image qemu-img
/// wrote) with one read, not one per unit —, partial ones through a scratch buffer.
fn read_units(u: &mut impl Units, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
    let unit = u.unit();
    let whole = unit as usize;
    let mut scratch = Vec::new();
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let index = pos / unit;
        let within = (pos % unit) as usize;
        let take = (whole - within).min(buf.len() - done);
        if take < whole {
            scratch.resize(whole, 0);
            u.read_unit(index, &mut scratch)?;
            buf[done..done + take].copy_from_slice(&scratch[within..within + take]);
            done += take;
            continue;
        }
        let Some(at) = u.stored_at(index)? else {
            u.read_unit(index, &mut buf[done..done + whole])?;
            done += whole;
            continue;
        };
        let mut end = done + whole;
        let mut next = index + 1;
        while buf.len() - end >= whole && u.stored_at(next)? == Some(at + (next - index) * unit) {
            end += whole;
            next += 1;
        }
        u.read_stored(at, &mut buf[done..end])?;
        done = end;
    }
    Ok(())
}

/// Refuses a file whose size field no longer says what inspection saw.
fn same_size(size: u64, info: &DiskInfo) -> Result<(), FormatError> {
    if size != info.virtual_size {
        return Err(FormatError::Corrupt(format!(
            "the image now says {size} bytes, inspection saw {}; inspect it again",
            info.virtual_size
        )));
    }
    Ok(())
}

/// Opens an accepted image for reading. `info` must come from inspecting this same file.
pub fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    match info.format {
        DiskFormat::Raw | DiskFormat::Iso => Ok(Box::new(Raw {
            r,
            size: info.virtual_size,
        })),
        DiskFormat::Qcow2 => Ok(Box::new(qcow2::Qcow2::open(r, limits)?)),
        DiskFormat::Vmdk => vmdk::open(r, info, limits),
        DiskFormat::Vhd => vhd::open(r, info, limits),
        DiskFormat::Vhdx => vhdx::open(r, info, limits),
        DiskFormat::Vdi => vdi::open(r, info, limits),
        DiskFormat::Qed => qed::open(r, info, limits),
    }
}

struct Raw<R> {
    r: R,
    size: u64,
}

impl<R: ReadAt + Send> Logical for Raw<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        let n = self.r.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(FormatError::Truncated(format!(
                "the file ends at {}",
                offset + n as u64
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::tests_support::{
        convert, create, open_file, qemu_raw, read_in_pieces, write,
    };
    use super::super::{DiskFormat, Limits, ReadAt, inspect};

    /// Reads of whole units join units stored one after another in the file, and only those:
    /// here qemu-io wrote the units in the reverse of their disk order (so their data lie in
    /// the file back to front), with a zero unit, an unallocated one and an in-order run among
    /// them. Read whole, unit by unit, and in pieces that start mid-unit.
    #[test]
    fn whole_units_are_read_wherever_their_data_lie() {
        let dir = tempfile::tempdir().expect("tmp");
        let writes = [
            "write -P 0x17 448k 64k",
            "write -P 0x16 384k 64k",
            "write -P 0x15 320k 64k",
            "write -z 256k 64k",
            "write -P 0x13 128k 64k",
            "write -P 0x12 64k 64k",
            "write -P 0x11 0 64k",
            "write -P 0x21 1M 256k",
        ];
        for (format, qemu) in [(DiskFormat::Qcow2, "qcow2"), (DiskFormat::Vmdk, "vmdk")] {
            let name = format!("a.{qemu}");
            let image = create(dir.path(), &name, qemu, &[], "2M", &writes);
            let expected = qemu_raw(&image, qemu);
            for pieces in [
                &[2 << 20][..],
                &[64 << 10],
                &[192 << 10],
                &[96 << 10, 32 << 10],
            ] {
                let (_, mut reader) = open_file(&image, format);
                let out = read_in_pieces(&mut *reader, pieces).expect("reads");
                assert!(
                    out == expected,
                    "{name} in pieces of {pieces:?}: content differs"
                );
            }
            // The four units written at 1M lie one after another: one read, once the tables
            // are in memory.
            let file = std::fs::File::open(&image).expect("open");
            let info = inspect(&file, format, &Limits::default()).expect("inspect");
            let reads = Arc::new(AtomicUsize::new(0));
            let counted = Counted(file, reads.clone());
            let mut reader = super::open(counted, &info, &Limits::default()).expect("open");
            let mut run = vec![0u8; 256 << 10];
            reader.read_logical(&mut run, 1 << 20).expect("read");
            let before = reads.load(Ordering::Relaxed);
            reader.read_logical(&mut run, 1 << 20).expect("read");
            assert_eq!(reads.load(Ordering::Relaxed) - before, 1, "{name}");
            assert!(
                run[..] == expected[1 << 20..(1 << 20) + (256 << 10)],
                "{name}"
            );
        }
    }

    /// A file that counts the reads reaching it.
    struct Counted(std::fs::File, Arc<AtomicUsize>);

    impl ReadAt for Counted {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read_at(buf, offset)
        }

        fn size(&self) -> std::io::Result<u64> {
            self.0.size()
        }
    }

    /// A mostly empty disk made by qemu-img in every format with a map: the tables alone show
    /// its empty stretches (what lets an import skip them), and never a stretch with data.
    #[test]
    fn is_hole_finds_what_the_tables_leave_unallocated() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut disk = vec![0u8; 64 << 20];
        disk[..1 << 20].fill(0x11);
        disk[(40 << 20) + 12_345] = 0x22;
        let raw = dir.path().join("disk.raw");
        write(&raw, &disk);
        for (format, qemu, ext, opts) in [
            (DiskFormat::Qcow2, "qcow2", "qcow2", &[][..]),
            (DiskFormat::Vmdk, "vmdk", "vmdk", &[][..]),
            (
                DiskFormat::Vmdk,
                "vmdk",
                "stream.vmdk",
                &["-o", "subformat=streamOptimized"][..],
            ),
            (DiskFormat::Vhd, "vpc", "vhd", &[][..]),
            (DiskFormat::Vhdx, "vhdx", "vhdx", &[][..]),
            (DiskFormat::Vdi, "vdi", "vdi", &[][..]),
            (DiskFormat::Qed, "qed", "qed", &[][..]),
        ] {
            let image = convert(&raw, dir.path().join(format!("disk.{ext}")), qemu, opts);
            let (_, mut reader) = open_file(&image, format);
            let hole =
                |r: &mut dyn super::Logical, at: u64| r.is_hole(at, 4 << 20).expect("is_hole");
            assert!(hole(&mut *reader, 8 << 20), "{ext}: 8 MiB.. is empty");
            assert!(hole(&mut *reader, 60 << 20), "{ext}: 60 MiB.. is empty");
            assert!(!hole(&mut *reader, 0), "{ext}: the first MiB holds data");
            assert!(!hole(&mut *reader, 40 << 20), "{ext}: one byte at 40 MiB");
        }
    }
}
