//! The vocabulary Kagami's server and agent share: the image model that travels over the wire,
//! and the block manifest that names an image's content.
//!
//! Disk-format inspection and readers (`format`) arrive with the formats work; today images enter
//! as raw bytes.

pub mod format;
pub mod fuzzing;
pub mod manifest;
pub mod model;
pub mod split;
pub mod wire;

pub use manifest::{BLOCK_SIZE, BlockId, Manifest, ManifestError, SEGMENT_BLOCKS, SEGMENT_SIZE};
