//! The vocabulary Kagami's server and agent share: the image model that travels over the wire,
//! the block manifest that names an image's content and the splitter that makes one, and the
//! disk-format inspector, readers and writers (`format`).

pub mod format;
pub mod fuzzing;
pub mod manifest;
pub mod model;
pub mod split;
pub mod wire;

pub use manifest::{BLOCK_SIZE, BlockId, Manifest, ManifestError, SEGMENT_BLOCKS, SEGMENT_SIZE};
