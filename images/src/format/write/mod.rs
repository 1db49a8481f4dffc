//! Exporting a manifest as an image file, streamed, with no temporary file: a writer knows from
//! the manifest alone which blocks hold data, so it lays out every table up front and emits the
//! file front to back as [`Piece`]s — metadata it generates, and runs of guest blocks the caller
//! reads from the store. Holes stay holes: a hole block is never allocated in the output.

mod qcow2;
mod vhd;
mod vmdk;

use super::DiskFormat;
use crate::BLOCK_SIZE;

/// One piece of an export, in file order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes the writer generated (headers, tables).
    Meta(Vec<u8>),
    /// These guest blocks, in order, each written as a full 64 KiB: a hole as zeroes and a
    /// short last block padded with zeroes.
    Blocks(Vec<u64>),
}

/// An export in progress: ask [`Export::next_piece`] what comes next; when it is
/// [`Piece::Blocks`], read those blocks (64 KiB each, zero-padded) and pass them to
/// [`Export::encode`], which returns the bytes to write for them.
pub trait Export: Send {
    /// The output's length, when the format allows knowing it before the data is read.
    fn output_len(&self) -> Option<u64>;
    /// The next piece, or `None` at the end.
    fn next_piece(&mut self) -> Option<Piece>;
    /// The output for the blocks of the last `Piece::Blocks` (verbatim unless the format
    /// compresses).
    fn encode(&mut self, _indices: &[u64], data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// VHD and VMDK address their files in 32-bit sector numbers: 2 TiB.
const MAX_SECTOR_ADDRESSED: u64 = (u32::MAX as u64) * 512;

/// Starts an export of a disk of `virtual_size` bytes whose block `i` holds data iff `data[i]`,
/// or says why the format cannot carry it.
pub fn export(
    format: DiskFormat,
    virtual_size: u64,
    data: Vec<bool>,
) -> Result<Box<dyn Export>, String> {
    // Worst case for VMDK: incompressible grains, each with a marker sector, plus tables.
    let data_bytes = data.iter().filter(|d| **d).count() as u64 * (BLOCK + 512);
    match format {
        DiskFormat::Qcow2 => Ok(Box::new(qcow2::Qcow2Export::new(virtual_size, data))),
        DiskFormat::Vmdk
            if data_bytes + data.len() as u64 / 128 + (1 << 20) > MAX_SECTOR_ADDRESSED =>
        {
            Err("a streamOptimized VMDK addresses at most 2 TiB of file; export as qcow2".into())
        }
        DiskFormat::Vmdk => Ok(Box::new(vmdk::StreamOptimized::new(virtual_size, data))),
        // The VHD format's own limit is 2040 GiB.
        DiskFormat::Vhd if virtual_size > 2040 << 30 => {
            Err("a VHD holds at most 2040 GiB; export as qcow2 or vmdk".into())
        }
        DiskFormat::Vhd => Ok(Box::new(vhd::DynamicVhd::new(virtual_size, data))),
        other => Err(format!(
            "export as {other} is not available yet; use raw, qcow2, vmdk or vhd"
        )),
    }
}

/// Bytes per exported block.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
