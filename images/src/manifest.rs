//! Manifests: an image's content as fixed 64 KiB blocks named by sha256.
//!
//! The logical disk is cut into [`BLOCK_SIZE`] blocks; each block is named by the sha256 of its
//! bytes, and an all-zero block is a *hole*: it is never hashed, stored or sent. Blocks group into
//! 4 MiB *segments* of [`SEGMENT_BLOCKS`] ids, and a segment is named by the sha256 of its
//! encoded block list, so identical stretches of different images share segments as well as
//! blocks. An image's *digest* is the sha256 of its encoded top level (header + segment ids), so
//! it commits to every byte of the disk without a second pass over the data.
//!
//! Why 64 KiB (shared/DESIGN.md): on a real OS disk with 1.5 % of its files changed, a
//! differential copy moves 6.8× the changed bytes with 64 KiB blocks against 94× with 4 MiB ones.
//!
//! Two encodings, both little-endian and versioned:
//! - the **index** (what the digest covers): a 32-byte header then one 32-byte id per segment,
//!   the zero id standing for an all-hole segment;
//! - the **bundle** (what travels to an agent): the index followed by the body of each distinct
//!   non-hole segment in order of first appearance. Each body is checked against its id when
//!   decoded, so a bundle is self-verifying given the digest.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes in a block: the unit of hashing, dedup and transfer.
pub const BLOCK_SIZE: usize = 64 * 1024;
/// Block ids in a full segment.
pub const SEGMENT_BLOCKS: usize = 64;
/// Logical bytes covered by a full segment (4 MiB).
pub const SEGMENT_SIZE: usize = BLOCK_SIZE * SEGMENT_BLOCKS;

const MAGIC: &[u8; 8] = b"KGMANIF\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const ID_LEN: usize = 32;

/// A sha256 content id: of a block's bytes, or of a segment's encoded block list.
/// The all-zero id is reserved for holes (an all-zero block or an all-hole segment).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

/// Segments are named exactly like blocks; the alias keeps signatures honest.
pub type SegmentId = BlockId;

impl BlockId {
    /// The id recorded for a hole.
    pub const HOLE: BlockId = BlockId([0; 32]);

    /// The id of `data`, or [`BlockId::HOLE`] when `data` is all zeroes.
    pub fn of(data: &[u8]) -> Self {
        if is_zero(data) {
            return Self::HOLE;
        }
        Self::hash(data)
    }

    /// The sha256 of `data`, whatever it holds.
    pub fn hash(data: &[u8]) -> Self {
        BlockId(Sha256::digest(data).into())
    }

    /// The sha256 of each of `parts`, on the calling thread, several at once: SHA-256's rounds
    /// are one long dependency chain, so one stream leaves the SHA unit mostly waiting; hashing
    /// four to sixteen independent blocks interleaved (tape-sha256 picks SHA-NI or SIMD lanes at
    /// run time) doubles what a core hashes here. The hot paths — ingest, read verification,
    /// the agent's writes and scans — hash blocks in batches through this.
    pub fn hash_many(parts: &[&[u8]]) -> Vec<Self> {
        let mut out = vec![[0u8; 32]; parts.len()];
        tape_sha256::hash_many(parts, &mut out);
        out.into_iter().map(BlockId).collect()
    }

    /// [`BlockId::of`] for each of `blocks`: holes are found without hashing, the rest hashed
    /// together by [`BlockId::hash_many`].
    pub fn of_many(blocks: &[&[u8]]) -> Vec<Self> {
        let (at, data): (Vec<usize>, Vec<&[u8]>) = blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| !is_zero(b))
            .map(|(i, b)| (i, *b))
            .unzip();
        let mut ids = vec![Self::HOLE; blocks.len()];
        for (i, id) in at.into_iter().zip(Self::hash_many(&data)) {
            ids[i] = id;
        }
        ids
    }

    pub fn is_hole(&self) -> bool {
        *self == Self::HOLE
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a 32-byte id from the front of `bytes` (the caller checked the length).
    fn from_slice(bytes: &[u8]) -> Self {
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[..ID_LEN]);
        BlockId(id)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", self.to_hex())
    }
}

impl FromStr for BlockId {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id)
            .map_err(|_| ManifestError::BadId(s.chars().take(80).collect()))?;
        Ok(BlockId(id))
    }
}

impl Serialize for BlockId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlockId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// True when every byte of `data` is zero. Compares 16 bytes at a time: this runs over every
/// byte ingested, holes included, so it must stay far faster than hashing.
pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, tail) = data.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && tail.iter().all(|&b| b == 0)
}

/// Why a manifest could not be decoded or built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is truncated: expected at least {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("not a Kagami manifest (bad magic)")]
    BadMagic,
    #[error("manifest header has non-zero reserved fields")]
    Reserved,
    #[error("manifest version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error(
        "manifest uses {block_size}-byte blocks and {segment_blocks}-block segments; only 65536 and 64 are supported"
    )]
    Geometry {
        block_size: u32,
        segment_blocks: u32,
    },
    #[error("virtual size {size} exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("segment {index} does not match its id {id}")]
    SegmentMismatch { index: usize, id: BlockId },
    #[error("manifest has {0} trailing bytes after its last segment")]
    Trailing(usize),
    #[error("segment {index} has {got} blocks where its position needs {expected}")]
    SegmentLength {
        index: usize,
        expected: usize,
        got: usize,
    },
    #[error("'{0}' is not a 64-digit hex sha256 id")]
    BadId(String),
}

/// One segment: up to [`SEGMENT_BLOCKS`] block ids (only the image's last segment may be short).
/// A hole segment carries no ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// sha256 of [`Segment::encode`], or [`BlockId::HOLE`] when every block is a hole.
    pub id: SegmentId,
    pub blocks: Vec<BlockId>,
}

impl Segment {
    /// Names a block list. An all-hole list becomes a hole segment: the hole id and no ids at
    /// all, so a sparse disk costs nothing per hole segment in memory or on the wire.
    pub fn new(blocks: Vec<BlockId>) -> Self {
        if blocks.iter().all(BlockId::is_hole) {
            return Segment::hole();
        }
        Segment {
            id: BlockId::hash(&encode_ids(&blocks)),
            blocks,
        }
    }

    /// A segment of holes only.
    pub fn hole() -> Self {
        Segment {
            id: BlockId::HOLE,
            blocks: Vec::new(),
        }
    }

    /// The stored form: the block ids back to back.
    pub fn encode(&self) -> Vec<u8> {
        encode_ids(&self.blocks)
    }

    /// Decodes a stored body and checks it against `id`.
    pub fn decode(id: SegmentId, body: &[u8]) -> Result<Self, ManifestError> {
        if !body.len().is_multiple_of(ID_LEN)
            || body.is_empty()
            || body.len() > SEGMENT_BLOCKS * ID_LEN
        {
            return Err(ManifestError::SegmentLength {
                index: 0,
                expected: SEGMENT_BLOCKS,
                got: body.len() / ID_LEN,
            });
        }
        let blocks: Vec<BlockId> = body.chunks_exact(ID_LEN).map(BlockId::from_slice).collect();
        let segment = Segment::new(blocks);
        if segment.id != id {
            return Err(ManifestError::SegmentMismatch { index: 0, id });
        }
        Ok(segment)
    }

    pub fn is_hole(&self) -> bool {
        self.id.is_hole()
    }
}

fn encode_ids(ids: &[BlockId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * ID_LEN);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

/// An image's content: its virtual size and, for each 4 MiB of it, a segment of block ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    virtual_size: u64,
    segments: Vec<Segment>,
}

/// A block's place in an image: its index, byte offset and length (only the last block of an
/// image whose size is not a multiple of 64 KiB is short).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub index: u64,
    pub offset: u64,
    pub len: usize,
    pub id: BlockId,
}

impl Manifest {
    /// Builds a manifest; `segments` must cover `virtual_size` exactly (see [`Manifest::segment_count`]).
    pub fn new(virtual_size: u64, segments: Vec<Segment>) -> Result<Self, ManifestError> {
        let expected = Self::segment_count(virtual_size);
        if segments.len() != expected {
            return Err(ManifestError::SegmentLength {
                index: segments.len(),
                expected,
                got: segments.len(),
            });
        }
        for (index, segment) in segments.iter().enumerate() {
            let want = if segment.is_hole() {
                0
            } else {
                blocks_in_segment(virtual_size, index)
            };
            if segment.blocks.len() != want {
                return Err(ManifestError::SegmentLength {
                    index,
                    expected: want,
                    got: segment.blocks.len(),
                });
            }
        }
        Ok(Manifest {
            virtual_size,
            segments,
        })
    }

    /// How many segments a disk of `virtual_size` bytes has.
    pub fn segment_count(virtual_size: u64) -> usize {
        virtual_size.div_ceil(SEGMENT_SIZE as u64) as usize
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Every block in disk order, holes included.
    pub fn blocks(&self) -> impl Iterator<Item = BlockRef> + '_ {
        (0..self.segments.len()).flat_map(|i| self.segment_blocks(i))
    }

    /// The blocks of segment `index`, holes included (none if `index` is out of range).
    pub fn segment_blocks(&self, index: usize) -> impl Iterator<Item = BlockRef> + '_ {
        let size = self.virtual_size;
        let segment = self.segments.get(index);
        let count = segment.map_or(0, |_| blocks_in_segment(size, index));
        (0..count).map(move |j| {
            let i = (index * SEGMENT_BLOCKS + j) as u64;
            let offset = i * BLOCK_SIZE as u64;
            let id = segment
                .and_then(|s| s.blocks.get(j))
                .copied()
                .unwrap_or(BlockId::HOLE);
            BlockRef {
                index: i,
                offset,
                len: (size - offset).min(BLOCK_SIZE as u64) as usize,
                id,
            }
        })
    }

    /// Blocks that hold data (not holes), and the bytes they cover.
    pub fn data_stats(&self) -> (u64, u64) {
        self.blocks()
            .filter(|b| !b.id.is_hole())
            .fold((0, 0), |(n, bytes), b| (n + 1, bytes + b.len as u64))
    }

    /// Distinct non-hole segments, in order of first appearance.
    pub fn distinct_segments(&self) -> Vec<&Segment> {
        let mut seen = HashSet::new();
        self.segments
            .iter()
            .filter(|s| !s.is_hole() && seen.insert(s.id))
            .collect()
    }

    /// The index encoding: header + one id per segment. Its sha256 is the image digest.
    pub fn encode_index(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.segments.len() * ID_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&(SEGMENT_BLOCKS as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        for s in &self.segments {
            out.extend_from_slice(&s.id.0);
        }
        out
    }

    /// The image digest: sha256 of the index encoding.
    pub fn digest(&self) -> BlockId {
        BlockId::hash(&self.encode_index())
    }

    /// The bundle encoding: the index, then each distinct non-hole segment's body.
    pub fn encode_bundle(&self) -> Vec<u8> {
        let mut out = self.encode_index();
        for s in self.distinct_segments() {
            out.extend_from_slice(&s.encode());
        }
        out
    }

    /// Decodes an index and returns the virtual size and segment ids; bodies come from elsewhere
    /// (the catalog's segment table, or the rest of a bundle).
    pub fn decode_index(
        bytes: &[u8],
        max_virtual_size: u64,
    ) -> Result<(u64, Vec<SegmentId>), ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::Truncated {
                expected: HEADER_LEN,
                got: bytes.len(),
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        // Reserved fields must be zero: one manifest, one encoding (found by fuzzing — a
        // decoder that ignored them accepted bytes that re-encode differently).
        if bytes[10..12] != [0, 0] || bytes[20..24] != [0, 0, 0, 0] {
            return Err(ManifestError::Reserved);
        }
        let block_size = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let segment_blocks = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        if block_size as usize != BLOCK_SIZE || segment_blocks as usize != SEGMENT_BLOCKS {
            return Err(ManifestError::Geometry {
                block_size,
                segment_blocks,
            });
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&bytes[24..32]);
        let virtual_size = u64::from_le_bytes(size);
        // Checked before anything is allocated from the header's word.
        if virtual_size > max_virtual_size {
            return Err(ManifestError::TooLarge {
                size: virtual_size,
                limit: max_virtual_size,
            });
        }
        let count = Self::segment_count(virtual_size);
        let expected = HEADER_LEN + count * ID_LEN;
        if bytes.len() < expected {
            return Err(ManifestError::Truncated {
                expected,
                got: bytes.len(),
            });
        }
        let ids = bytes[HEADER_LEN..expected]
            .chunks_exact(ID_LEN)
            .map(BlockId::from_slice)
            .collect();
        Ok((virtual_size, ids))
    }

    /// Decodes a bundle, checking every segment body against its id.
    pub fn decode_bundle(bytes: &[u8], max_virtual_size: u64) -> Result<Self, ManifestError> {
        let (virtual_size, ids) = Self::decode_index(bytes, max_virtual_size)?;
        let mut pos = HEADER_LEN + ids.len() * ID_LEN;
        let mut bodies: HashMap<SegmentId, Segment> = HashMap::new();
        let mut segments = Vec::with_capacity(ids.len());
        for (index, id) in ids.into_iter().enumerate() {
            let want = blocks_in_segment(virtual_size, index);
            let segment = if id.is_hole() {
                segments.push(Segment::hole());
                continue;
            } else if let Some(known) = bodies.get(&id) {
                known.clone()
            } else {
                let end = pos + want * ID_LEN;
                if bytes.len() < end {
                    return Err(ManifestError::Truncated {
                        expected: end,
                        got: bytes.len(),
                    });
                }
                let segment = Segment::decode(id, &bytes[pos..end])
                    .map_err(|_| ManifestError::SegmentMismatch { index, id })?;
                pos = end;
                bodies.insert(id, segment.clone());
                segment
            };
            if segment.blocks.len() != want {
                return Err(ManifestError::SegmentLength {
                    index,
                    expected: want,
                    got: segment.blocks.len(),
                });
            }
            segments.push(segment);
        }
        if pos != bytes.len() {
            return Err(ManifestError::Trailing(bytes.len() - pos));
        }
        Ok(Manifest {
            virtual_size,
            segments,
        })
    }
}

/// How many blocks segment `index` of a `virtual_size`-byte disk holds.
pub fn blocks_in_segment(virtual_size: u64, index: usize) -> usize {
    let start = index as u64 * SEGMENT_SIZE as u64;
    let bytes = virtual_size.saturating_sub(start).min(SEGMENT_SIZE as u64);
    bytes.div_ceil(BLOCK_SIZE as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::Rng;
    use crate::split::split_bytes;

    /// The batch hasher (a young crate, SIMD and SHA-NI kernels chosen at run time) must agree
    /// with sha2 on every length — padding edges, whole blocks, mixed lengths in one batch — and
    /// every batch size around its lane widths.
    #[test]
    fn hash_many_agrees_with_sha2() {
        let mut rng = Rng(0x5eed_f00d_b10c);
        let edges = [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            4095,
            4096,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
        ];
        for round in 0..200 {
            let count = 1 + round % 19;
            let same = round % 2 == 0;
            let first = edges[rng.below(edges.len())];
            let parts: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    let len = if same {
                        first
                    } else if rng.below(2) == 0 {
                        edges[rng.below(edges.len())]
                    } else {
                        rng.below(BLOCK_SIZE + 1)
                    };
                    (0..len).map(|_| rng.next_u64() as u8).collect()
                })
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let want: Vec<BlockId> = refs.iter().map(|p| BlockId::hash(p)).collect();
            assert_eq!(BlockId::hash_many(&refs), want, "round {round}");
        }
    }

    #[test]
    fn of_many_names_holes_without_hashing_them() {
        let data = vec![7u8; BLOCK_SIZE];
        let zero = vec![0u8; BLOCK_SIZE];
        let ids = BlockId::of_many(&[&zero, &data, &zero[..100], &data[..100]]);
        assert_eq!(
            ids,
            vec![
                BlockId::HOLE,
                BlockId::hash(&data),
                BlockId::HOLE,
                BlockId::hash(&data[..100])
            ]
        );
        assert!(BlockId::of_many(&[]).is_empty());
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        // Data in some blocks, holes elsewhere, and a repeated block.
        for (i, chunk) in data.chunks_mut(BLOCK_SIZE).enumerate() {
            if i % 3 == 0 {
                chunk.fill((i % 7) as u8 + 1);
            }
        }
        data
    }

    #[test]
    fn holes_are_not_hashed_and_data_is() {
        assert!(BlockId::of(&[0u8; BLOCK_SIZE]).is_hole());
        let mut block = vec![0u8; BLOCK_SIZE];
        block[BLOCK_SIZE - 1] = 1;
        assert!(!BlockId::of(&block).is_hole());
        assert_eq!(BlockId::of(&block), BlockId::hash(&block));
    }

    #[test]
    fn bundle_round_trips_and_digest_is_stable() {
        let data = sample(SEGMENT_SIZE * 3 + BLOCK_SIZE * 5 + 1234);
        let m = split_bytes(&data);
        assert_eq!(m.virtual_size(), data.len() as u64);
        assert_eq!(m.segments().len(), 4);
        let bundle = m.encode_bundle();
        let back = Manifest::decode_bundle(&bundle, u64::MAX).expect("decodes");
        assert_eq!(back, m);
        assert_eq!(back.digest(), m.digest());
        // The short last block is covered with its real length.
        let last = m.blocks().last().expect("has blocks");
        assert_eq!(last.len, 1234);
    }

    #[test]
    fn identical_segments_are_stored_once_in_a_bundle() {
        let data = vec![7u8; SEGMENT_SIZE * 4];
        let m = split_bytes(&data);
        assert_eq!(m.distinct_segments().len(), 1);
        assert_eq!(
            m.encode_bundle().len(),
            HEADER_LEN + 4 * ID_LEN + SEGMENT_BLOCKS * ID_LEN
        );
    }

    #[test]
    fn all_zero_disk_has_only_hole_segments() {
        let m = split_bytes(&vec![0u8; SEGMENT_SIZE * 2]);
        assert!(m.segments().iter().all(Segment::is_hole));
        assert_eq!(m.data_stats(), (0, 0));
        assert_eq!(m.encode_bundle().len(), HEADER_LEN + 2 * ID_LEN);
    }

    #[test]
    fn tampered_bundles_are_rejected() {
        let m = split_bytes(&sample(SEGMENT_SIZE * 2));
        let bundle = m.encode_bundle();
        let mut bad = bundle.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            Manifest::decode_bundle(&bad, u64::MAX),
            Err(ManifestError::SegmentMismatch { .. })
        ));
        assert!(matches!(
            Manifest::decode_bundle(&bundle[..bundle.len() - 1], u64::MAX),
            Err(ManifestError::Truncated { .. })
        ));
        let mut trailing = bundle.clone();
        trailing.push(0);
        assert_eq!(
            Manifest::decode_bundle(&trailing, u64::MAX),
            Err(ManifestError::Trailing(1))
        );
        assert!(matches!(
            Manifest::decode_bundle(&bundle, 10),
            Err(ManifestError::TooLarge { .. })
        ));
        let mut reserved = bundle.clone();
        reserved[10] = 0x80;
        assert_eq!(
            Manifest::decode_bundle(&reserved, u64::MAX),
            Err(ManifestError::Reserved)
        );
        let mut magic = bundle;
        magic[0] = b'X';
        assert_eq!(
            Manifest::decode_bundle(&magic, u64::MAX),
            Err(ManifestError::BadMagic)
        );
    }

    #[test]
    fn every_prefix_of_a_bundle_fails_cleanly() {
        let bundle = split_bytes(&sample(SEGMENT_SIZE + 3 * BLOCK_SIZE)).encode_bundle();
        for len in 0..bundle.len() {
            assert!(
                Manifest::decode_bundle(&bundle[..len], u64::MAX).is_err(),
                "prefix {len} accepted"
            );
        }
    }

    #[test]
    fn ids_parse_from_hex() {
        let id = BlockId::hash(b"kagami");
        assert_eq!(id.to_hex().parse::<BlockId>(), Ok(id));
        assert!("zz".parse::<BlockId>().is_err());
        let json = serde_json::to_string(&id).expect("serialises");
        assert_eq!(serde_json::from_str::<BlockId>(&json).expect("parses"), id);
    }
}
