//! qcow2 (versions 2 and 3), per qemu's `docs/interop/qcow2.txt`. Big-endian header:
//!
//! ```text
//!  0 magic "QFI\xfb"        4 version            8 backing_file_offset (u64)
//! 16 backing_file_size     20 cluster_bits      24 size (u64, virtual)
//! 32 crypt_method          36 l1_size           40 l1_table_offset (u64)
//! 48 refcount_table_offset 56 refcount_table_clusters
//! 60 nb_snapshots          64 snapshots_offset (u64)
//! v3: 72 incompatible_features  80 compatible_features  88 autoclear_features
//!     96 refcount_order        100 header_length        104 compression_type (u8)
//! ```
//! then header extensions (type u32, length u32, data padded to 8) up to the end of cluster 0.

use super::{
    DiskFormat, FormatError, Limits, ReadAt, be32, be64, check_metadata, read_exact, read_some,
};

pub(super) const MAGIC: &[u8; 4] = b"QFI\xfb";
const V2_HEADER: usize = 72;
const V3_MIN_HEADER: usize = 104;

/// Incompatible feature bits (v3).
const DIRTY: u64 = 1 << 0;
const CORRUPT: u64 = 1 << 1;
const EXTERNAL_DATA_FILE: u64 = 1 << 2;
const COMPRESSION_TYPE: u64 = 1 << 3;
const EXTENDED_L2: u64 = 1 << 4;
const KNOWN_INCOMPATIBLE: u64 =
    DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    Ok(read_some(r, 0, 4)?.as_slice() == MAGIC)
}

pub(super) fn inspect(r: &dyn ReadAt, limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    let mut findings = Vec::new();
    let h = read_exact(r, 0, V2_HEADER, "the qcow2 header")?;
    let version = be32(&h, 4);
    // v1 is a different, obsolete layout; anything above 3 is unknown to us.
    if version != 2 && version != 3 {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Qcow2,
            detail: format!("version {version}"),
        });
    }
    let cluster_bits = be32(&h, 20);
    // The spec allows 512 B to 2 MiB clusters; everything below depends on this being sane.
    if !(9..=21).contains(&cluster_bits) {
        return Err(FormatError::Corrupt(format!(
            "cluster_bits {cluster_bits} is outside 9..21"
        )));
    }
    let cluster = 1u64 << cluster_bits;
    let size = be64(&h, 24);

    // A backing file makes the image a view over another file: the classic host-file leak.
    let backing_offset = be64(&h, 8);
    if backing_offset != 0 {
        let len = (be32(&h, 16) as usize).min(1023);
        let name = read_some(r, backing_offset, len).unwrap_or_default();
        return Err(FormatError::BackingFile(printable(&name)));
    }
    // Encrypted images cannot be read without a key, and we would store ciphertext as a disk.
    if be32(&h, 32) != 0 {
        return Err(FormatError::Encrypted);
    }

    let mut extended_l2 = false;
    let header_length = if version == 3 {
        let v3 = read_exact(r, 0, V3_MIN_HEADER, "the qcow2 v3 header")?;
        let incompatible = be64(&v3, 72);
        // An external data file keeps the guest data in another (host) file.
        if incompatible & EXTERNAL_DATA_FILE != 0 {
            return Err(FormatError::DataFile(
                "incompatible feature bit 2 (external data file)".into(),
            ));
        }
        // qemu marks an image corrupt when it found inconsistent metadata; never ingest it.
        if incompatible & CORRUPT != 0 {
            return Err(FormatError::Corrupt(
                "the image is marked corrupt (incompatible bit 1); run qemu-img check -r".into(),
            ));
        }
        // Bits we do not know may change how every cluster is read.
        let unknown = incompatible & !KNOWN_INCOMPATIBLE;
        if unknown != 0 {
            return Err(FormatError::UnknownFeatures(unknown));
        }
        if incompatible & DIRTY != 0 {
            findings.push("dirty (refcounts may be stale; data is read through L1/L2 only)".into());
        }
        if incompatible & COMPRESSION_TYPE != 0 {
            // Byte 104: 0 zlib, 1 zstd. Another value would make every compressed cluster unreadable.
            let kind = read_exact(r, 104, 1, "the compression type")?[0];
            if kind > 1 {
                return Err(FormatError::Unsupported {
                    format: DiskFormat::Qcow2,
                    detail: format!("compression type {kind}"),
                });
            }
            findings.push(
                if kind == 1 {
                    "zstd compression"
                } else {
                    "zlib compression"
                }
                .into(),
            );
        }
        extended_l2 = incompatible & EXTENDED_L2 != 0;
        if extended_l2 {
            findings.push("extended L2 entries (subclusters)".into());
        }
        let refcount_order = be32(&v3, 96);
        if refcount_order > 6 {
            return Err(FormatError::Corrupt(format!(
                "refcount_order {refcount_order} is above 6"
            )));
        }
        let len = be32(&v3, 100) as u64;
        // The header and its extensions must fit in the first cluster (spec).
        if len < V3_MIN_HEADER as u64 || len > cluster {
            return Err(FormatError::Corrupt(format!(
                "header_length {len} is not between 104 and the cluster size"
            )));
        }
        len
    } else {
        V2_HEADER as u64
    };

    check_extensions(r, header_length, cluster, &mut findings)?;

    // The L1 table: big enough to map the whole disk, inside the file, within our limits.
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let per_l2 = cluster / l2_entry;
    let needed = size.div_ceil(cluster.saturating_mul(per_l2));
    let l1_size = be32(&h, 36) as u64;
    let l1_offset = be64(&h, 40);
    check_metadata("the L1 table", l1_size * 8, limits)?;
    if l1_size < needed {
        return Err(FormatError::Corrupt(format!(
            "the L1 table has {l1_size} entries, the disk needs {needed}"
        )));
    }
    if l1_size > 0 {
        if !l1_offset.is_multiple_of(cluster) || l1_offset == 0 {
            return Err(FormatError::Corrupt(format!(
                "l1_table_offset {l1_offset} is not a non-zero multiple of the cluster size"
            )));
        }
        if l1_offset
            .checked_add(l1_size * 8)
            .is_none_or(|end| end > file_size)
        {
            return Err(FormatError::Truncated(format!(
                "the L1 table at {l1_offset} ends past the end of the file ({file_size} bytes)"
            )));
        }
    }
    let refcount_offset = be64(&h, 48);
    if !refcount_offset.is_multiple_of(cluster) || refcount_offset >= file_size.max(1) {
        return Err(FormatError::Corrupt(format!(
            "refcount_table_offset {refcount_offset} is misaligned or past the end of the file"
        )));
    }
    let snapshots = be32(&h, 60);
    if snapshots > 0 {
        findings.push(format!(
            "{snapshots} internal snapshot(s), ignored: only the active disk is imported"
        ));
    }
    findings.insert(0, format!("qcow2 v{version}, {cluster}-byte clusters"));
    Ok((size, findings))
}

/// Walks the header extensions (bounded by the first cluster and a count): a data-file name or
/// an encryption header refuses the image; unknown types are allowed, as the spec says.
fn check_extensions(
    r: &dyn ReadAt,
    start: u64,
    cluster: u64,
    findings: &mut Vec<String>,
) -> Result<(), FormatError> {
    let area = read_some(r, 0, cluster as usize)?;
    let mut pos = start as usize;
    for _ in 0..256 {
        if pos + 8 > area.len() {
            // Running off the end of the first cluster without an end marker: corrupt, unless
            // the file itself ends here (a header-only image has nothing more to say).
            if area.len() < cluster as usize {
                return Ok(());
            }
            return Err(FormatError::Corrupt(
                "header extensions run past the first cluster".into(),
            ));
        }
        let kind = be32(&area, pos);
        let len = be32(&area, pos + 4) as usize;
        let data = pos + 8;
        let end = data
            .checked_add(len.next_multiple_of(8))
            .filter(|e| *e <= area.len());
        let Some(end) = end else {
            return Err(FormatError::Corrupt(format!(
                "header extension 0x{kind:08x} runs past the first cluster"
            )));
        };
        match kind {
            EXT_END => return Ok(()),
            EXT_DATA_FILE => return Err(FormatError::DataFile(printable(&area[data..data + len]))),
            EXT_FULL_DISK_ENCRYPTION => return Err(FormatError::Encrypted),
            EXT_BACKING_FORMAT => {
                findings.push("a backing-format extension without a backing file".into())
            }
            _ => {}
        }
        pos = end;
    }
    Err(FormatError::Corrupt(
        "more than 256 header extensions".into(),
    ))
}

/// A file name from inside an image, safe to show: printable ASCII only, bounded.
fn printable(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .take(256)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if text.is_empty() {
        "(unnamed)".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::{corrupt_everywhere, create, write};
    use super::super::{DiskFormat, FormatError, Limits, inspect};

    fn qcow2(dir: &std::path::Path, name: &str, opts: &[&str], size: &str) -> std::path::PathBuf {
        create(dir, name, "qcow2", opts, size, &[])
    }

    fn check(
        path: &std::path::Path,
        claimed: DiskFormat,
    ) -> Result<super::super::DiskInfo, FormatError> {
        inspect(
            &std::fs::File::open(path).expect("open"),
            claimed,
            &Limits::default(),
        )
    }

    #[test]
    fn real_images_are_accepted_with_their_size() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, opts) in [
            ("v3.qcow2", vec![]),
            ("v2.qcow2", vec!["-o", "compat=0.10"]),
            ("big-clusters.qcow2", vec!["-o", "cluster_size=2M"]),
            ("l2.qcow2", vec!["-o", "extended_l2=on"]),
            ("zstd.qcow2", vec!["-o", "compression_type=zstd"]),
        ] {
            let p = qcow2(dir.path(), name, &opts, "100M");
            let info = check(&p, DiskFormat::Qcow2).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(info.virtual_size, 100 << 20, "{name}");
        }
    }

    #[test]
    fn hostile_images_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let backing = qcow2(
            d,
            "backed.qcow2",
            &["-b", "/etc/passwd", "-F", "raw"],
            "10M",
        );
        assert!(
            matches!(check(&backing, DiskFormat::Qcow2), Err(FormatError::BackingFile(n)) if n == "/etc/passwd")
        );

        let data_file = qcow2(
            d,
            "datafile.qcow2",
            &["-o", &format!("data_file={}", d.join("data.raw").display())],
            "10M",
        );
        assert!(matches!(
            check(&data_file, DiskFormat::Qcow2),
            Err(FormatError::DataFile(_))
        ));

        let plain = qcow2(d, "plain.qcow2", &[], "10M");
        assert!(matches!(
            check(&plain, DiskFormat::Raw),
            Err(FormatError::Mismatch {
                detected: DiskFormat::Qcow2,
                ..
            })
        ));

        let raw = d.join("plain.raw");
        write(&raw, &vec![0u8; 1 << 20]);
        assert!(matches!(
            check(&raw, DiskFormat::Qcow2),
            Err(FormatError::Mismatch {
                detected: DiskFormat::Raw,
                ..
            })
        ));

        // 2^60 bytes: qemu-img refuses to make it, so patch the size field.
        let mut bytes = std::fs::read(&plain).expect("read");
        bytes[24..32].copy_from_slice(&(1u64 << 60).to_be_bytes());
        let huge = d.join("huge.qcow2");
        write(&huge, &bytes);
        assert!(matches!(
            check(&huge, DiskFormat::Qcow2),
            Err(FormatError::TooLarge { .. }
                | FormatError::MetadataTooLarge { .. }
                | FormatError::Corrupt(_))
        ));

        let mut unknown = std::fs::read(&plain).expect("read");
        unknown[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let p = d.join("unknown.qcow2");
        write(&p, &unknown);
        assert!(
            matches!(check(&p, DiskFormat::Qcow2), Err(FormatError::UnknownFeatures(x)) if x == 1 << 40)
        );

        let mut encrypted = std::fs::read(&plain).expect("read");
        encrypted[32..36].copy_from_slice(&1u32.to_be_bytes());
        let p = d.join("aes.qcow2");
        write(&p, &encrypted);
        assert!(matches!(
            check(&p, DiskFormat::Qcow2),
            Err(FormatError::Encrypted)
        ));

        let truncated = d.join("truncated.qcow2");
        write(&truncated, &std::fs::read(&plain).expect("read")[..50]);
        assert!(matches!(
            check(&truncated, DiskFormat::Qcow2),
            Err(FormatError::Truncated(_))
        ));
    }

    #[test]
    fn no_input_panics() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = qcow2(dir.path(), "x.qcow2", &[], "64M");
        corrupt_everywhere(&std::fs::read(&p).expect("read"), DiskFormat::Qcow2, 1024);
    }
}
