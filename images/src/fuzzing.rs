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

/// xorshift64*: the seeded generator of the property tests that stand in for the fuzz targets
/// in CI (deterministic, so a failure reproduces from its seed).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}
