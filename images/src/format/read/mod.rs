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

use super::{DiskFormat, DiskInfo, FormatError, Limits, ReadAt};

/// An image as the disk it describes.
pub trait Logical: Send {
    fn virtual_size(&self) -> u64;
    /// Fills `buf` with the disk's bytes at `offset` (unallocated areas read as zeroes).
    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError>;
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
