//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the seeded property test that
//! CI runs (`images/tests/hostile.rs`): each takes arbitrary bytes and must return, never panic
//! or allocate without bound.

use crate::format::{self, DiskFormat, Limits};
use crate::{Manifest, wire};

/// Limits small enough that a fuzz input cannot make a legitimate large allocation either.
const LIMITS: Limits = Limits {
    max_virtual_size: 1 << 32,
    max_metadata_bytes: 1 << 20,
};

/// Inspects `data` as every format; when one accepts it, reads the disk's first and last
/// blocks through the logical reader.
pub fn inspect_and_read(data: &[u8]) {
    let _ = format::detect(&data);
    for claimed in DiskFormat::ALL {
        let Ok(info) = format::inspect(&data, claimed, &LIMITS) else {
            continue;
        };
        let Ok(mut disk) = format::read::open(data.to_vec(), &info, &LIMITS) else {
            continue;
        };
        let size = disk.virtual_size();
        let mut buf = vec![0u8; 65536];
        let first = (size.min(65536)) as usize;
        let _ = disk.read_logical(&mut buf[..first], 0);
        if size > 65536 {
            let _ = disk.read_logical(&mut buf, size - 65536);
        }
    }
}

/// Decodes `data` as a manifest bundle and, if valid, re-encodes it identically.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode_bundle(data, 1 << 40) {
        assert_eq!(
            m.encode_bundle(),
            data,
            "a decoded manifest re-encodes to the same bytes"
        );
    }
}

/// Decodes `data` as block frames and as an id list.
pub fn frames(data: &[u8]) {
    let _ = wire::decode_frames(data);
    let _ = wire::decode_ids(data);
}
