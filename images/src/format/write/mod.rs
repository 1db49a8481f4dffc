//! Exporting a manifest as an image file, streamed, with no temporary file: a writer knows from
//! the manifest alone which blocks hold data, so it lays out every table up front and emits the
//! file front to back as [`Piece`]s — metadata it generates, and runs of guest blocks the caller
//! reads from the store. Holes stay holes: a hole block is never allocated in the output.

mod qcow2;

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

/// An export in progress.
pub trait Export: Send + Iterator<Item = Piece> {
    /// The output's length, when the format allows knowing it before the data is read.
    fn output_len(&self) -> Option<u64>;
}

/// Starts an export of a disk of `virtual_size` bytes whose block `i` holds data iff `data[i]`.
pub fn export(format: DiskFormat, virtual_size: u64, data: Vec<bool>) -> Option<Box<dyn Export>> {
    match format {
        DiskFormat::Qcow2 => Some(Box::new(qcow2::Qcow2Export::new(virtual_size, data))),
        _ => None,
    }
}

/// Bytes per exported block.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
