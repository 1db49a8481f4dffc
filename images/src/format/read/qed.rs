//! QED as its logical disk: L1 → L2 → data clusters, every table `table_size` clusters of
//! little-endian u64 offsets. An offset of 0 is unallocated and 1 is qemu's zero-cluster
//! marker; both read as zeroes (backing files never get here: the inspector refuses them).
//!
//! Memory is bounded whatever the geometry: the L1 table (within the metadata limit, checked
//! by the inspector and again here) and a few 64 KiB pieces of L2 tables, not whole tables
//! (one table may be 16 clusters of 64 MiB).

use super::super::qed::{self, F_BACKING_FILE, Header, check_geometry, read_header};
use super::super::{DiskInfo, FormatError, Limits, ReadAt, check_metadata, le64, read_exact};
use super::{Locate, Logical, Mapped, Run, same_size};

/// An unallocated cluster (or L2 table).
const UNALLOCATED: u64 = 0;
/// qemu's zero-cluster marker (qed.h `qed_offset_is_zero_cluster`): reads as zeroes.
const ZERO_CLUSTER: u64 = 1;
/// L2 tables are read and cached in pieces of at most this many bytes...
const L2_PIECE: u64 = 64 << 10;
/// ...and this many pieces are kept.
const L2_CACHE: usize = 8;

pub(super) fn open<R: ReadAt + Send + 'static>(
    r: R,
    info: &DiskInfo,
    limits: &Limits,
) -> Result<Box<dyn Logical>, FormatError> {
    let file_size = r.size()?;
    let Header {
        cluster_size,
        table_size,
        header_size,
        features,
        l1_offset,
        image_size: size,
        ..
    } = read_header(&r, "the QED header")?;
    same_size(size, info)?;
    // Unallocated clusters would have to be read from the backing file.
    if features & F_BACKING_FILE != 0 {
        return Err(FormatError::BackingFile("named in the QED header".into()));
    }
    // Clusters and tables are found by division; zero or absurd sizes must not get there.
    check_geometry(cluster_size, table_size)?;
    let cluster = u64::from(cluster_size);
    let table_bytes = u64::from(table_size) * cluster;
    let entries = table_bytes / 8;
    // Two table levels map at most cluster * entries^2 bytes.
    if u128::from(size) > u128::from(cluster) * u128::from(entries) * u128::from(entries) {
        return Err(FormatError::Corrupt(format!(
            "image size {size} exceeds what two tables of {table_bytes} bytes can map"
        )));
    }
    check_metadata("QED L1 table", table_bytes, limits)?;
    let map = Map {
        l1: Vec::new(),
        l2_cache: Vec::new(),
        cluster,
        table_bytes,
        header_bytes: u64::from(header_size) * cluster,
        file_size,
    };
    map.check_table(l1_offset, || "the L1 table".into())?;
    let l1 = read_exact(&r, l1_offset, table_bytes as usize, "the QED L1 table")?
        .chunks_exact(8)
        .map(|e| le64(e, 0))
        .collect();
    Ok(Box::new(Mapped {
        r,
        size,
        data_end: file_size,
        map: Map { l1, ..map },
    }))
}

struct Map {
    l1: Vec<u64>,
    /// Pieces of L2 tables, by file offset, least recently loaded first.
    l2_cache: Vec<(u64, Vec<u8>)>,
    cluster: u64,
    table_bytes: u64,
    header_bytes: u64,
    file_size: u64,
}

impl Map {
    /// A table must be cluster-aligned, after the header area and whole inside the file.
    fn check_table(&self, offset: u64, what: impl FnOnce() -> String) -> Result<(), FormatError> {
        let (table, cluster) = (self.table_bytes, self.cluster);
        qed::check_table(
            offset,
            table,
            cluster,
            self.header_bytes,
            self.file_size,
            what,
        )?;
        Ok(())
    }
}

impl Locate for Map {
    fn locate(&mut self, r: &dyn ReadAt, pos: u64) -> Result<Run, FormatError> {
        let entries = self.table_bytes / 8;
        let index = pos / self.cluster;
        let within = pos % self.cluster;
        let (l1_index, l2_index) = (index / entries, index % entries);
        let l2 = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
            .ok_or_else(|| {
                FormatError::Corrupt(format!("cluster {index} is beyond the L1 table"))
            })?;
        if l2 == UNALLOCATED {
            // The whole rest of this L2 table's span is unallocated.
            return Ok(Run::Zero {
                len: (entries - l2_index) * self.cluster - within,
            });
        }
        self.check_table(l2, || format!("the L2 table of L1 entry {l1_index}"))?;
        let piece_len = self.table_bytes.min(L2_PIECE);
        let piece_at = l2 + l2_index * 8 / piece_len * piece_len;
        let pos_in_piece = (l2_index * 8 % piece_len) as usize;
        let piece = match self.l2_cache.iter().position(|(at, _)| *at == piece_at) {
            Some(i) => &self.l2_cache[i].1,
            None => {
                let bytes = read_exact(r, piece_at, piece_len as usize, "a QED L2 table")?;
                if self.l2_cache.len() == L2_CACHE {
                    self.l2_cache.remove(0);
                }
                self.l2_cache.push((piece_at, bytes));
                &self.l2_cache[self.l2_cache.len() - 1].1
            }
        };
        let entry = le64(piece, pos_in_piece);
        let len = self.cluster - within;
        match entry {
            UNALLOCATED | ZERO_CLUSTER => Ok(Run::Zero { len }),
            // A data cluster is aligned and after the header area (qemu's
            // `qed_check_cluster_offset`); read_runs checks that it is inside the file.
            at if at.is_multiple_of(self.cluster) && at >= self.header_bytes => Ok(Run::Data {
                at: at + within,
                len,
            }),
            at => Err(FormatError::Corrupt(format!(
                "cluster {index} points at offset {at}, misaligned or inside the header"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests_support::{
        assert_matches, check_conversions, convert, open_file, qemu_raw, read_all, read_damaged,
        run, sample_raw, write,
    };
    use super::super::super::{DiskFormat, FormatError};

    fn u64_at(b: &[u8], at: usize) -> usize {
        usize::try_from(u64::from_le_bytes(
            b[at..at + 8].try_into().expect("8 bytes"),
        ))
        .expect("offset")
    }

    #[test]
    fn qed_reads_back_what_qemu_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let cases: [(&str, &[&str]); 3] = [
            ("default", &[]),
            // 4 KiB clusters, two-cluster tables: every 4 MiB has its own L2 table (qemu
            // cannot open what it makes with table_size=1 and 4 KiB clusters).
            ("small", &["-o", "cluster_size=4096,table_size=2"]),
            ("large", &["-o", "cluster_size=1M,table_size=16"]),
        ];
        check_conversions(dir.path(), DiskFormat::Qed, "qed", "qed", &cases);
    }

    /// Zero clusters, written by qemu and patched in, read as zeroes; a data cluster or an L2
    /// table pointed past the end of the file (or misaligned) is an error, never a panic.
    #[test]
    fn qed_zero_clusters_and_bad_tables() {
        let dir = tempfile::tempdir().expect("tmp");
        let (raw, disk) = sample_raw(dir.path());
        let image = convert(&raw, dir.path().join("d.qed"), "qed", &[]);
        // qemu writes the zero-cluster marker for an aligned write of zeroes over an
        // unallocated cluster (cluster 17, in the hole at 1 MiB).
        let p = image.to_str().expect("utf-8 path");
        run("qemu-io", &["-f", "qed", "-c", "write -z 1088k 64k", p]);
        let (info, mut reader) = open_file(&image, DiskFormat::Qed);
        let got = read_all(&mut *reader).expect("reads");
        assert!(got == disk, "qemu's zero cluster reads as zeroes");

        let data = std::fs::read(&image).expect("read");
        let l1 = u64_at(&data, 40);
        let l2 = u64_at(&data, l1);
        assert_eq!(
            u64_at(&data, l2 + 17 * 8),
            1,
            "qemu wrote a zero-cluster marker"
        );
        assert!(u64_at(&data, l2 + 8) > 1, "cluster 1 holds data");

        // The marker patched over a data cluster.
        let mut zeroed = data.clone();
        zeroed[l2 + 8..l2 + 16].copy_from_slice(&1u64.to_le_bytes());
        let path = dir.path().join("zeroed.qed");
        write(&path, &zeroed);
        let (_, mut reader) = open_file(&path, DiskFormat::Qed);
        let got = read_all(&mut *reader).expect("reads");
        let mut want = disk.clone();
        want[64 << 10..128 << 10].fill(0);
        assert!(got == want, "a patched zero cluster reads as zeroes");
        assert!(got == qemu_raw(&path, "qed"), "as qemu reads it");

        let n = data.len() as u64;
        for (what, at, entry) in [
            ("data cluster past the end", l2 + 8, n + (1 << 20)),
            ("data cluster at the end", l2 + 8, n),
            ("data cluster misaligned", l2 + 8, 0x1_0200),
            ("data cluster neither marker nor aligned", l2 + 8, 2),
            ("huge data cluster", l2 + 8, !0xFFFFu64),
            ("L2 table past the end", l1, n),
            ("L2 table misaligned", l1, 0x1_0200),
        ] {
            let mut bad = data.clone();
            bad[at..at + 8].copy_from_slice(&entry.to_le_bytes());
            assert_matches!(
                read_damaged(dir.path(), &bad, &info),
                Err(FormatError::Corrupt(_)),
                "{what}"
            );
        }
    }
}
