//! ISO 9660: a volume descriptor set from sector 16 (2048-byte sectors), each descriptor
//! starting with a type byte and `CD001`; the primary volume descriptor (type 1) gives the
//! volume size as both-endian fields (block count at 80/84, block size at 128/130). Sectors
//! 0–15 are the system area, where hybrid ISOs keep an MBR/GPT: allowed, not another format.

use super::{FormatError, Limits, ReadAt, be16, be32, le16, le32, read_exact, read_some};

const SECTOR: u64 = 2048;
const FIRST_DESCRIPTOR: u64 = 16 * SECTOR;
/// Volume descriptor sets are short; a long run of descriptors is not an ISO we trust.
const MAX_DESCRIPTORS: u64 = 64;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    Ok(read_some(r, FIRST_DESCRIPTOR + 1, 5)?.as_slice() == b"CD001")
}

pub(super) fn inspect(r: &dyn ReadAt, _limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    for i in 0..MAX_DESCRIPTORS {
        let at = FIRST_DESCRIPTOR + i * SECTOR;
        let d = read_exact(r, at, SECTOR as usize, "a volume descriptor")?;
        if &d[1..6] != b"CD001" {
            return Err(FormatError::Corrupt(format!(
                "volume descriptor {i} lacks the CD001 identifier"
            )));
        }
        match d[0] {
            1 => {
                // Both-endian fields must agree: a cheap consistency check on a hand-made header.
                let blocks = le32(&d, 80);
                let block_size = le16(&d, 128);
                if blocks != be32(&d, 84) || block_size != be16(&d, 130) {
                    return Err(FormatError::Corrupt(
                        "the primary volume descriptor's both-endian fields disagree".into(),
                    ));
                }
                if !matches!(block_size, 512 | 1024 | 2048) {
                    return Err(FormatError::Corrupt(format!(
                        "logical block size {block_size}"
                    )));
                }
                let volume = blocks as u64 * block_size as u64;
                // The file must hold the whole volume; padding after it is common and harmless.
                if volume > file_size {
                    return Err(FormatError::Truncated(format!(
                        "the volume has {volume} bytes, the file {file_size}"
                    )));
                }
                let mut findings = vec![format!("ISO 9660 volume of {volume} bytes")];
                let mbr = read_some(r, 510, 2)?;
                if mbr.as_slice() == [0x55, 0xaa] {
                    findings.push("hybrid: the system area carries an MBR/GPT".into());
                }
                // The image is the file: it is served as is for sanboot.
                return Ok((file_size, findings));
            }
            255 => {
                return Err(FormatError::Corrupt(
                    "no primary volume descriptor before the terminator".into(),
                ));
            }
            _ => {}
        }
    }
    Err(FormatError::Corrupt("no primary volume descriptor".into()))
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::{corrupt_everywhere, write};
    use super::super::{DiskFormat, FormatError, Limits, inspect};

    /// A minimal ISO 9660 image: a PVD for `blocks` sectors and a terminator.
    fn iso(blocks: u32) -> Vec<u8> {
        let mut img = vec![0u8; blocks as usize * 2048];
        let pvd = 16 * 2048;
        img[pvd] = 1;
        img[pvd + 1..pvd + 6].copy_from_slice(b"CD001");
        img[pvd + 6] = 1;
        img[pvd + 80..pvd + 84].copy_from_slice(&blocks.to_le_bytes());
        img[pvd + 84..pvd + 88].copy_from_slice(&blocks.to_be_bytes());
        img[pvd + 128..pvd + 130].copy_from_slice(&2048u16.to_le_bytes());
        img[pvd + 130..pvd + 132].copy_from_slice(&2048u16.to_be_bytes());
        let term = 17 * 2048;
        img[term] = 255;
        img[term + 1..term + 6].copy_from_slice(b"CD001");
        img
    }

    #[test]
    fn isos_hybrid_or_not_are_accepted_and_polyglots_are_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let plain = dir.path().join("a.iso");
        write(&plain, &iso(64));
        let info = inspect(
            &std::fs::File::open(&plain).expect("open"),
            DiskFormat::Iso,
            &Limits::default(),
        )
        .expect("iso");
        assert_eq!(info.virtual_size, 64 * 2048);
        // Hybrid: an MBR in the system area is fine.
        let mut hybrid = iso(64);
        hybrid[510] = 0x55;
        hybrid[511] = 0xaa;
        let info = inspect(&&hybrid[..], DiskFormat::Iso, &Limits::default()).expect("hybrid");
        assert!(info.findings.iter().any(|f| f.starts_with("hybrid")));
        // An ISO is not raw, and an ISO with a qcow2 header in its system area is two formats.
        assert!(matches!(
            inspect(&&iso(64)[..], DiskFormat::Raw, &Limits::default()),
            Err(FormatError::Mismatch {
                detected: DiskFormat::Iso,
                ..
            })
        ));
        let mut polyglot = iso(64);
        polyglot[..4].copy_from_slice(b"QFI\xfb");
        assert!(matches!(
            inspect(&&polyglot[..], DiskFormat::Iso, &Limits::default()),
            Err(FormatError::Ambiguous(_))
        ));
        // A volume larger than the file is truncated.
        let short = &iso(64)[..40 * 2048];
        let mut patched = short.to_vec();
        patched[16 * 2048 + 80..16 * 2048 + 84].copy_from_slice(&64u32.to_le_bytes());
        assert!(matches!(
            inspect(&&patched[..], DiskFormat::Iso, &Limits::default()),
            Err(FormatError::Truncated(_))
        ));
    }

    #[test]
    fn no_input_panics() {
        let img = iso(40);
        let (head, pvd) = img.split_at(16 * 2048);
        let _ = head;
        // Sweep the descriptors, where all the parsing happens.
        let mut shifted = vec![0u8; 16 * 2048];
        shifted.extend_from_slice(pvd);
        corrupt_everywhere(&shifted, DiskFormat::Iso, 0);
        for at in (16 * 2048..18 * 2048).step_by(7) {
            let mut copy = img.clone();
            copy[at] ^= 0xff;
            let _ = inspect(&&copy[..], DiskFormat::Iso, &Limits::default());
        }
    }
}
