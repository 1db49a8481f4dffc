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

/// Starts an export of a disk of `virtual_size` bytes whose block `i` holds data iff `data[i]`.
pub fn export(format: DiskFormat, virtual_size: u64, data: Vec<bool>) -> Option<Box<dyn Export>> {
    match format {
        DiskFormat::Qcow2 => Some(Box::new(qcow2::Qcow2Export::new(virtual_size, data))),
        DiskFormat::Vmdk => Some(Box::new(vmdk::StreamOptimized::new(virtual_size, data))),
        DiskFormat::Vhd => Some(Box::new(vhd::DynamicVhd::new(virtual_size, data))),
        _ => None,
    }
}

/// Bytes per exported block.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
