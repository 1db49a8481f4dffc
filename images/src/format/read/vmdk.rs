//! VMDK sparse extents as their logical disk: grain directory → grain tables → grains, plain
//! (`monolithicSparse`) or deflate-compressed with grain markers (`streamOptimized`).

use super::super::vmdk::{COMPRESSED, GD_AT_END, SECTOR, parse_header};
use super::super::{DiskInfo, FormatError, Limits, ReadAt, check_metadata, le32, read_exact};
use super::{Logical, Units, read_units, units_are_zero};

/// Grain tables kept in memory (512 entries of 4 bytes each, usually).
const GT_CACHE: usize = 8;

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let mut h = parse_header(&read_exact(&r, 0, 80, "the VMDK header")?);
    if h.gd_offset == GD_AT_END {
        // streamOptimized as VMware writes it: the footer holds the real grain directory offset.
        h = parse_header(&read_exact(
            &r,
            file_size.saturating_sub(1024),
            80,
            "the VMDK footer",
        )?);
    }
    let grain_sectors = h.grain;
    let gtes = h.gtes_per_gt as u64;
    let capacity = h.capacity;
    if grain_sectors == 0 || gtes == 0 {
        return Err(FormatError::Corrupt(
            "grain size or grain table size is zero".into(),
        ));
    }
    let grain = grain_sectors * SECTOR;
    let entries = capacity.div_ceil(grain_sectors.saturating_mul(gtes));
    check_metadata("the grain directory", entries * 4, limits)?;
    let gd = read_exact(
        &r,
        h.gd_offset.saturating_mul(SECTOR),
        (entries * 4) as usize,
        "the grain directory",
    )?;
    Ok(Box::new(Vmdk {
        gd: gd.chunks_exact(4).map(|c| le32(c, 0)).collect(),
        compressed: h.flags & COMPRESSED != 0,
        file_size,
        size: info.virtual_size,
        grain,
        gtes,
        gt_cache: Vec::new(),
        r,
    }))
}

struct Vmdk<R> {
    r: R,
    file_size: u64,
    size: u64,
    grain: u64,
    gtes: u64,
    gd: Vec<u32>,
    compressed: bool,
    gt_cache: Vec<(u32, Vec<u32>)>,
}

impl<R: ReadAt + Send> Vmdk<R> {
    /// The file sector where grain `index` lives (0 or 1: unallocated or zeroed).
    fn grain_sector(&mut self, index: u64) -> Result<u32, FormatError> {
        let gt = self
            .gd
            .get((index / self.gtes) as usize)
            .copied()
            .unwrap_or(0);
        if gt == 0 {
            return Ok(0);
        }
        let pos = match self.gt_cache.iter().position(|(s, _)| *s == gt) {
            Some(p) => p,
            None => {
                let at = gt as u64 * SECTOR;
                if at.saturating_add(self.gtes * 4) > self.file_size {
                    return Err(FormatError::Corrupt(format!(
                        "a grain table at sector {gt} lies past the end of the file"
                    )));
                }
                let bytes = read_exact(&self.r, at, (self.gtes * 4) as usize, "a grain table")?;
                if self.gt_cache.len() == GT_CACHE {
                    self.gt_cache.remove(0);
                }
                self.gt_cache
                    .push((gt, bytes.chunks_exact(4).map(|c| le32(c, 0)).collect()));
                self.gt_cache.len() - 1
            }
        };
        Ok(self.gt_cache[pos]
            .1
            .get((index % self.gtes) as usize)
            .copied()
            .unwrap_or(0))
    }

    fn read_grain(&mut self, index: u64, out: &mut [u8]) -> Result<(), FormatError> {
        let sector = self.grain_sector(index)?;
        if sector <= 1 {
            out.fill(0);
            return Ok(());
        }
        let at = sector as u64 * SECTOR;
        if !self.compressed {
            return self.read_stored(at, out);
        }
        // A grain marker: LBA (u64), compressed size (u32), then zlib data.
        let marker = read_exact(&self.r, at, 12, "a grain marker")?;
        let len = le32(&marker, 8) as u64;
        // Deflate never grows data by much; anything larger than two grains is not a grain.
        if len == 0 || len > 2 * self.grain || at + 12 + len > self.file_size {
            return Err(FormatError::Corrupt(format!(
                "grain {index} has a compressed size of {len}"
            )));
        }
        let data = read_exact(&self.r, at + 12, len as usize, "a compressed grain")?;
        let mut inflate = flate2::Decompress::new(true);
        let mut grain = vec![0u8; self.grain as usize];
        inflate
            .decompress(&data, &mut grain, flate2::FlushDecompress::Finish)
            .map_err(|e| FormatError::Corrupt(format!("grain {index} does not inflate: {e}")))?;
        // Inflated grains shorter than a grain end the disk (the last grain) or are zero-padded.
        out.copy_from_slice(&grain[..out.len()]);
        Ok(())
    }
}

impl<R: ReadAt + Send> Units for Vmdk<R> {
    fn unit(&self) -> u64 {
        self.grain
    }

    fn read_unit(&mut self, index: u64, out: &mut [u8]) -> Result<(), FormatError> {
        self.read_grain(index, out)
    }

    /// An allocated grain's, in a sparse (not streamOptimized) file.
    fn stored_at(&mut self, index: u64) -> Result<Option<u64>, FormatError> {
        if self.compressed {
            return Ok(None);
        }
        let sector = self.grain_sector(index)?;
        Ok((sector > 1).then_some(u64::from(sector) * SECTOR))
    }

    fn read_stored(&self, at: u64, out: &mut [u8]) -> Result<(), FormatError> {
        if at.saturating_add(out.len() as u64) > self.file_size {
            return Err(FormatError::Corrupt(format!(
                "grain data at offset {at} ({} bytes) lies past the end of the file",
                out.len()
            )));
        }
        let n = self.r.read_at(out, at)?;
        if n < out.len() {
            return Err(FormatError::Truncated(format!(
                "grain data at offset {at} is cut short"
            )));
        }
        Ok(())
    }
}

impl<R: ReadAt + Send> Logical for Vmdk<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_logical(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        read_units(self, buf, offset)
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, FormatError> {
        units_are_zero(offset, len, self.grain, |index| {
            self.grain_sector(index).map(|s| s <= 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::DiskFormat;
    use super::super::super::tests_support::{convert, open_file, read_in_pieces, write};

    #[test]
    fn vmdk_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let mut disk = vec![0u8; 20 << 20];
        for (i, chunk) in disk.chunks_mut(1 << 20).enumerate() {
            if i % 3 != 2 {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (i * 7 + j / 512) as u8 | 1;
                }
            }
        }
        disk[(3 << 20) - 2..(3 << 20) + 2].fill(0xab);
        let raw = d.join("disk.raw");
        write(&raw, &disk);
        for sub in ["monolithicSparse", "streamOptimized"] {
            let opt = format!("subformat={sub}");
            let v = convert(&raw, d.join(format!("{sub}.vmdk")), "vmdk", &["-o", &opt]);
            let (_, mut reader) = open_file(&v, DiskFormat::Vmdk);
            let out = read_in_pieces(&mut *reader, &[3, 65_533, 1 << 20, 12_345]).expect("reads");
            assert!(out == disk, "{sub}: logical content differs");
        }
    }
}
