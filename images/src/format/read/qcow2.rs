//! qcow2 as its logical disk: L1 → L2 → clusters, compressed (zlib, zstd) and extended-L2.

use super::super::{FormatError, Limits, ReadAt, be32, be64, check_metadata, read_exact};
use super::{Logical, Units, read_units, units_are_zero};

/// qcow2 L2 entry bits.
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 tables kept in memory (each one cluster: at most 2 MiB).
const L2_CACHE: usize = 4;

pub(super) struct Qcow2<R> {
    r: R,
    file_size: u64,
    size: u64,
    cluster_bits: u32,
    extended_l2: bool,
    zstd: bool,
    l1: Vec<u64>,
    l2_cache: Vec<(u64, Vec<u8>)>,
    /// The last decompressed cluster (a compressed cluster is usually read whole, but a read
    /// that starts mid-cluster must not inflate it twice).
    inflated: Option<(u64, Vec<u8>)>,
}

impl<R: ReadAt + Send> Qcow2<R> {
    pub(super) fn open(r: R, limits: &Limits) -> Result<Self, FormatError> {
        let h = read_exact(&r, 0, 112.min(r.size()? as usize), "the qcow2 header")?;
        let version = be32(&h, 4);
        let incompatible = if version >= 3 && h.len() >= 80 {
            be64(&h, 72)
        } else {
            0
        };
        let zstd = incompatible & (1 << 3) != 0 && h.get(104).copied() == Some(1);
        let cluster_bits = be32(&h, 20);
        let l1_size = be32(&h, 36) as u64;
        check_metadata("the L1 table", l1_size * 8, limits)?;
        let l1_bytes = read_exact(&r, be64(&h, 40), (l1_size * 8) as usize, "the L1 table")?;
        let l1 = l1_bytes.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2 {
            file_size: r.size()?,
            size: be64(&h, 24),
            cluster_bits,
            extended_l2: incompatible & (1 << 4) != 0,
            zstd,
            l1,
            l2_cache: Vec::new(),
            inflated: None,
            r,
        })
    }

    fn cluster(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn entry_len(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// The L2 entry (and, with extended L2, the subcluster bitmap) for a guest cluster.
    fn l2_entry(&mut self, cluster_index: u64) -> Result<(u64, u64), FormatError> {
        let per_l2 = self.cluster() / self.entry_len();
        let l1_index = (cluster_index / per_l2) as usize;
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((0, 0));
        }
        let cluster = self.cluster();
        if l2_offset
            .checked_add(cluster)
            .is_none_or(|end| end > self.file_size)
        {
            return Err(FormatError::Corrupt(format!(
                "an L2 table at {l2_offset} lies past the end of the file"
            )));
        }
        let pos = match self.l2_cache.iter().position(|(o, _)| *o == l2_offset) {
            Some(p) => p,
            None => {
                let table = read_exact(&self.r, l2_offset, cluster as usize, "an L2 table")?;
                if self.l2_cache.len() == L2_CACHE {
                    self.l2_cache.remove(0);
                }
                self.l2_cache.push((l2_offset, table));
                self.l2_cache.len() - 1
            }
        };
        let table = &self.l2_cache[pos].1;
        let at = ((cluster_index % per_l2) * self.entry_len()) as usize;
        let entry = be64(table, at);
        let bitmap = if self.extended_l2 {
            be64(table, at + 8)
        } else {
            0
        };
        Ok((entry, bitmap))
    }

    /// Reads guest cluster `index` into `out` (one cluster long).
    fn read_cluster(&mut self, index: u64, out: &mut [u8]) -> Result<(), FormatError> {
        let (entry, bitmap) = self.l2_entry(index)?;
        let cluster = self.cluster();
        if entry & L2_COMPRESSED != 0 {
            return self.read_compressed(entry, out);
        }
        let host = entry & OFFSET_MASK;
        if !self.extended_l2 {
            if entry & L2_ZERO != 0 || host == 0 {
                out.fill(0);
                return Ok(());
            }
            return self.read_host(host, out);
        }
        // Extended L2: 32 subclusters, each allocated (bits 0-31), zero (32-63), or unallocated.
        let sub = (cluster / 32) as usize;
        for (i, part) in out.chunks_mut(sub).enumerate() {
            if bitmap & (1 << i) != 0 && bitmap & (1 << (32 + i)) == 0 && host != 0 {
                self.read_host(host + (i * sub) as u64, part)?;
            } else {
                part.fill(0);
            }
        }
        Ok(())
    }

    /// Whether cluster `index` reads as zeroes without data behind it (the same rules as
    /// [`Qcow2::read_cluster`]'s).
    fn cluster_is_zero(&mut self, index: u64) -> Result<bool, FormatError> {
        let (entry, bitmap) = self.l2_entry(index)?;
        if entry & L2_COMPRESSED != 0 {
            return Ok(false);
        }
        let host = entry & OFFSET_MASK;
        if !self.extended_l2 {
            return Ok(entry & L2_ZERO != 0 || host == 0);
        }
        Ok(
            (0..32)
                .all(|i| !(bitmap & (1 << i) != 0 && bitmap & (1 << (32 + i)) == 0 && host != 0)),
        )
    }

    fn read_host(&self, host: u64, out: &mut [u8]) -> Result<(), FormatError> {
        if host
            .checked_add(out.len() as u64)
            .is_none_or(|end| end > self.file_size)
        {
            return Err(FormatError::Corrupt(format!(
                "a data cluster at {host} lies past the end of the file"
            )));
        }
        let n = self.r.read_at(out, host)?;
        if n < out.len() {
            return Err(FormatError::Truncated(format!(
                "a data cluster at {host} is cut short"
            )));
        }
        Ok(())
    }

    fn read_compressed(&mut self, entry: u64, out: &mut [u8]) -> Result<(), FormatError> {
        if let Some((e, data)) = &self.inflated
            && *e == entry
        {
            out.copy_from_slice(data);
            return Ok(());
        }
        // Compressed descriptor (spec): x = 62 - (cluster_bits - 8) bits of host offset, then
        // the count of additional 512-byte sectors the compressed data spans.
        let x = 62 - (self.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        let len = (sectors * 512)
            .saturating_sub(host & 511)
            .min(self.file_size.saturating_sub(host));
        let compressed = read_exact(&self.r, host, len as usize, "a compressed cluster")?;
        let corrupt =
            |what: String| FormatError::Corrupt(format!("compressed cluster at {host}: {what}"));
        if self.zstd {
            // The zstd frame may be followed by padding; decode exactly one cluster.
            let mut decoder = zstd::stream::read::Decoder::new(&compressed[..])
                .map_err(|e| corrupt(e.to_string()))?;
            std::io::Read::read_exact(&mut decoder, out).map_err(|e| corrupt(e.to_string()))?;
        } else {
            let mut inflate = flate2::Decompress::new(false);
            inflate
                .decompress(&compressed, out, flate2::FlushDecompress::Finish)
                .map_err(|e| corrupt(e.to_string()))?;
            if inflate.total_out() != out.len() as u64 {
                return Err(corrupt(format!(
                    "inflates to {} bytes, not a cluster",
                    inflate.total_out()
                )));
            }
        }
        self.inflated = Some((entry, out.to_vec()));
        Ok(())
    }
}

impl<R: ReadAt + Send> Units for Qcow2<R> {
    fn unit(&self) -> u64 {
        self.cluster()
    }

    fn read_unit(&mut self, index: u64, out: &mut [u8]) -> Result<(), FormatError> {
        self.read_cluster(index, out)
    }

    /// A plain allocated cluster's (not compressed, not zero, not split into subclusters).
    fn stored_at(&mut self, index: u64) -> Result<Option<u64>, FormatError> {
        if self.extended_l2 {
            return Ok(None);
        }
        let (entry, _) = self.l2_entry(index)?;
        let host = entry & OFFSET_MASK;
        Ok((entry & (L2_COMPRESSED | L2_ZERO) == 0 && host != 0).then_some(host))
    }

    fn read_stored(&self, at: u64, out: &mut [u8]) -> Result<(), FormatError> {
        self.read_host(at, out)
    }
}

impl<R: ReadAt + Send> Logical for Qcow2<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        read_units(self, buf, offset)
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, FormatError> {
        units_are_zero(offset, len, self.cluster(), |index| {
            self.cluster_is_zero(index)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::DiskFormat;
    use super::super::super::tests_support::{convert, open_file, read_in_pieces, write};

    /// Converts a raw disk to qcow2 with `opts`, reads it back logically, compares.
    #[test]
    fn qcow2_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let mut disk = vec![0u8; 24 << 20];
        for (i, chunk) in disk.chunks_mut(1 << 20).enumerate() {
            if i % 3 != 1 {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (i * 31 + j / 4096) as u8 | 1;
                }
            }
        }
        // Unaligned data at the end of a cluster and a short tail.
        disk[(5 << 20) - 3..(5 << 20) + 3].fill(0xee);
        let raw = d.join("disk.raw");
        write(&raw, &disk);
        for (name, opts) in [
            ("plain", vec![]),
            ("compressed", vec!["-c"]),
            ("zstd", vec!["-c", "-o", "compression_type=zstd"]),
            ("small-clusters", vec!["-o", "cluster_size=4096"]),
            (
                "extended-l2",
                vec!["-o", "extended_l2=on,cluster_size=128k"],
            ),
            ("v2", vec!["-o", "compat=0.10"]),
        ] {
            let q = convert(&raw, d.join(format!("{name}.qcow2")), "qcow2", &opts);
            let (_, mut reader) = open_file(&q, DiskFormat::Qcow2);
            // Read in odd pieces to cross cluster boundaries.
            let out = read_in_pieces(&mut *reader, &[1, 4095, 70_000, 1 << 20]).expect("reads");
            assert!(out == disk, "{name}: logical content differs");
        }
    }
}
