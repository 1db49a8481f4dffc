//! VMDK: only single-file sparse images, `monolithicSparse` and `streamOptimized`.
//!
//! Sparse header (little-endian, VMware "Virtual Disk Format 5.0"): `KDMV` magic, version (1–3),
//! flags, capacity and grain size in sectors, the embedded descriptor's sector offset and size,
//! GTEs per grain table, redundant and primary grain-directory offsets. A `streamOptimized` image
//! sets gdOffset to all-ones and carries the real header in a footer 1024 bytes before the end.
//!
//! The embedded descriptor is text; in it, an extent line (`RW 2097152 SPARSE "disk.vmdk"`) names
//! a file. A descriptor-only VMDK (no binary header) consists of nothing but such references to
//! other files — refused outright, since following them reads whatever path they name.

use super::{
    DiskFormat, FormatError, Limits, ReadAt, check_metadata, le32, le64, read_exact, read_some,
};

pub(super) const MAGIC: &[u8; 4] = b"KDMV";
pub(super) const GD_AT_END: u64 = u64::MAX;
pub(super) const SECTOR: u64 = 512;
/// Header flag: grains are deflate-compressed (streamOptimized).
pub(super) const COMPRESSED: u32 = 1 << 16;
/// Descriptors are small text; anything bigger is not a descriptor we want to parse.
const MAX_DESCRIPTOR: u64 = 1 << 20;

pub(super) fn probe(r: &dyn ReadAt) -> Result<bool, FormatError> {
    let head = read_some(r, 0, 1024)?;
    Ok(head.starts_with(MAGIC) || is_text_descriptor(&head))
}

/// A descriptor-only VMDK: plain text that declares a disk type.
fn is_text_descriptor(head: &[u8]) -> bool {
    let text = head.split(|&b| b == 0).next().unwrap_or_default();
    !text.is_empty()
        && text
            .iter()
            .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        && String::from_utf8_lossy(text)
            .to_ascii_lowercase()
            .contains("createtype")
}

/// The fields of a sparse header (or of a streamOptimized footer, laid out the same).
pub(super) struct Header {
    version: u32,
    pub(super) flags: u32,
    /// In sectors.
    pub(super) capacity: u64,
    /// In sectors.
    pub(super) grain: u64,
    desc_offset: u64,
    desc_size: u64,
    pub(super) gtes_per_gt: u32,
    /// In sectors.
    pub(super) gd_offset: u64,
}

pub(super) fn parse_header(h: &[u8]) -> Header {
    Header {
        version: le32(h, 4),
        flags: le32(h, 8),
        capacity: le64(h, 12),
        grain: le64(h, 20),
        desc_offset: le64(h, 28),
        desc_size: le64(h, 36),
        gtes_per_gt: le32(h, 44),
        gd_offset: le64(h, 56),
    }
}

pub(super) fn inspect(r: &dyn ReadAt, limits: &Limits) -> Result<(u64, Vec<String>), FormatError> {
    let file_size = r.size()?;
    let head = read_some(r, 0, 1024)?;
    if !head.starts_with(MAGIC) {
        // Descriptor-only: every extent is another file. Name the first one in the refusal.
        let text = read_some(r, 0, MAX_DESCRIPTOR.min(limits.max_metadata_bytes) as usize)?;
        let descriptor = Descriptor::parse(&text);
        let first = descriptor
            .extents
            .first()
            .map_or_else(|| "a descriptor-only VMDK".to_string(), |e| e.file.clone());
        return Err(FormatError::ExternalExtent(first));
    }
    let mut h = parse_header(&read_exact(r, 0, 80, "the VMDK sparse header")?);
    // Versions 1-3 share this layout; others are unknown to us.
    if !(1..=3).contains(&h.version) {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vmdk,
            detail: format!("sparse header version {}", h.version),
        });
    }
    let mut findings = Vec::new();
    if h.gd_offset == GD_AT_END {
        // streamOptimized: the header at the start is provisional; the footer holds the truth.
        let at = file_size.checked_sub(1024).ok_or_else(|| {
            FormatError::Truncated("no room for the streamOptimized footer".into())
        })?;
        let footer = read_exact(r, at, 80, "the streamOptimized footer")?;
        if !footer.starts_with(MAGIC) {
            return Err(FormatError::Corrupt(
                "the streamOptimized footer is missing".into(),
            ));
        }
        let f = parse_header(&footer);
        if f.gd_offset == GD_AT_END
            || f.capacity != h.capacity
            || f.desc_offset != h.desc_offset
            || f.desc_size != h.desc_size
        {
            return Err(FormatError::Corrupt(
                "the streamOptimized footer disagrees with the header".into(),
            ));
        }
        h = f;
        findings.push("grain directory located by the footer".to_string());
    }
    // Grains are the unit of allocation; a non-power-of-two or absurd grain breaks the maths.
    if !h.grain.is_power_of_two() || h.grain > 1 << 17 {
        return Err(FormatError::Corrupt(format!(
            "grain size of {} sectors",
            h.grain
        )));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > 1 << 16 {
        return Err(FormatError::Corrupt(format!(
            "{} entries per grain table",
            h.gtes_per_gt
        )));
    }
    let virtual_size = h
        .capacity
        .checked_mul(SECTOR)
        .ok_or(FormatError::TooLarge {
            size: u64::MAX,
            limit: limits.max_virtual_size,
        })?;
    super::check_size(virtual_size, limits)?;
    let per_gt = h.grain.saturating_mul(h.gtes_per_gt as u64);
    let gd_bytes = h.capacity.div_ceil(per_gt).saturating_mul(4);
    check_metadata("the grain directory", gd_bytes, limits)?;
    if h.gd_offset
        .checked_mul(SECTOR)
        .is_none_or(|o| o.saturating_add(gd_bytes) > file_size)
    {
        return Err(FormatError::Truncated(format!(
            "the grain directory at sector {} ends past the end of the file",
            h.gd_offset
        )));
    }
    if h.flags & COMPRESSED != 0 {
        findings.push("compressed grains".into());
    }

    // The embedded descriptor: bounded, inside the file, and describing only this file.
    let desc_bytes = h.desc_size.saturating_mul(SECTOR);
    if h.desc_offset == 0 || desc_bytes == 0 {
        return Err(FormatError::Corrupt("no embedded descriptor".into()));
    }
    if desc_bytes > MAX_DESCRIPTOR {
        return Err(FormatError::MetadataTooLarge {
            what: "the descriptor",
            size: desc_bytes,
            limit: MAX_DESCRIPTOR,
        });
    }
    let desc_at = h.desc_offset.saturating_mul(SECTOR);
    let text = read_exact(r, desc_at, desc_bytes as usize, "the embedded descriptor")?;
    let d = Descriptor::parse(&text);
    if let Some(line) = d.unknown.first() {
        return Err(FormatError::Corrupt(format!(
            "unrecognised descriptor line: {line}"
        )));
    }
    let create_type = d.get("createtype").unwrap_or_default().to_ascii_lowercase();
    if create_type != "monolithicsparse" && create_type != "streamoptimized" {
        return Err(FormatError::Unsupported {
            format: DiskFormat::Vmdk,
            detail: format!("createType {create_type:?}"),
        });
    }
    // A parent makes this a delta over another file (qemu follows parentFileNameHint).
    if let Some(parent) = d.get("parentfilenamehint") {
        return Err(FormatError::BackingFile(parent.to_string()));
    }
    if let Some(cid) = d.get("parentcid")
        && !cid.eq_ignore_ascii_case("ffffffff")
    {
        return Err(FormatError::BackingFile(format!("parentCID {cid}")));
    }
    let [extent] = d.extents.as_slice() else {
        return Err(FormatError::ExternalExtent(format!(
            "{} extents; a single-file VMDK has exactly one",
            d.extents.len()
        )));
    };
    // The one extent must be this file's own sparse data: a bare name, no path.
    let bare = !extent.file.is_empty()
        && !extent.file.contains(['/', '\\'])
        && extent.file != ".."
        && extent.file != ".";
    if !bare || extent.kind != "SPARSE" || !matches!(extent.access.as_str(), "RW" | "RDONLY") {
        return Err(FormatError::ExternalExtent(format!(
            "{} {} \"{}\"",
            extent.access, extent.kind, extent.file
        )));
    }
    if extent.sectors != Some(h.capacity) {
        return Err(FormatError::Corrupt(format!(
            "the extent covers {:?} sectors, the header says {}",
            extent.sectors, h.capacity
        )));
    }
    findings.insert(
        0,
        format!("vmdk {create_type}, {}-byte grains", h.grain * SECTOR),
    );
    Ok((virtual_size, findings))
}

struct Extent {
    access: String,
    sectors: Option<u64>,
    kind: String,
    file: String,
}

/// A parsed descriptor: `key=value` fields (keys lower-cased), extent lines, and any line that
/// is neither (which makes the descriptor corrupt).
struct Descriptor {
    fields: Vec<(String, String)>,
    extents: Vec<Extent>,
    unknown: Vec<String>,
}

impl Descriptor {
    fn parse(bytes: &[u8]) -> Descriptor {
        let text = String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default())
            .into_owned();
        let mut d = Descriptor {
            fields: Vec::new(),
            extents: Vec::new(),
            unknown: Vec::new(),
        };
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .take(10_000)
        {
            let first = line.split_whitespace().next().unwrap_or_default();
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                // ACCESS SECTORS TYPE "FILE" [OFFSET]
                let mut parts = line.splitn(4, ' ').map(str::trim);
                let access = parts.next().unwrap_or_default().to_string();
                let sectors = parts.next().and_then(|s| s.parse().ok());
                let kind = parts.next().unwrap_or_default().to_ascii_uppercase();
                let rest = parts.next().unwrap_or_default();
                let file = rest.split('"').nth(1).unwrap_or(rest).to_string();
                d.extents.push(Extent {
                    access,
                    sectors,
                    kind,
                    file,
                });
            } else if let Some((key, value)) = line.split_once('=') {
                let value = value.trim().trim_matches('"').to_string();
                d.fields.push((key.trim().to_ascii_lowercase(), value));
            } else {
                d.unknown.push(line.chars().take(120).collect());
            }
        }
        d
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::{convert, corrupt_everywhere, create, write};
    use super::super::{DiskFormat, FormatError, Limits, inspect};
    use std::path::{Path, PathBuf};

    fn vmdk(dir: &Path, name: &str, opts: &[&str], size: &str) -> PathBuf {
        create(dir, name, "vmdk", opts, size, &[])
    }

    fn check(path: &Path) -> Result<super::super::DiskInfo, FormatError> {
        inspect(
            &std::fs::File::open(path).expect("open"),
            DiskFormat::Vmdk,
            &Limits::default(),
        )
    }

    #[test]
    fn sparse_and_stream_optimized_are_accepted() {
        let dir = tempfile::tempdir().expect("tmp");
        let sparse = vmdk(dir.path(), "s.vmdk", &[], "100M");
        assert_eq!(check(&sparse).expect("sparse").virtual_size, 100 << 20);
        // streamOptimized only comes from a conversion with data.
        let raw = dir.path().join("d.raw");
        write(&raw, &[vec![7u8; 1 << 20], vec![0u8; 3 << 20]].concat());
        let stream = convert(
            &raw,
            dir.path().join("so.vmdk"),
            "vmdk",
            &["-o", "subformat=streamOptimized"],
        );
        let info = check(&stream).expect("streamOptimized");
        assert_eq!(info.virtual_size, 4 << 20);
        assert!(
            info.findings[0].contains("streamoptimized"),
            "{:?}",
            info.findings
        );
        // As VMware writes them: the header's grain directory "at the end", found via the footer.
        // (qemu-img writes no footer, so build one: footer marker, header copy, end-of-stream.)
        let original = std::fs::read(&stream).expect("read");
        let mut bytes = original.clone();
        bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut marker = vec![0u8; 512];
        marker[12..16].copy_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&marker);
        bytes.extend_from_slice(&original[..512]);
        bytes.extend_from_slice(&[0u8; 512]);
        let at_end = dir.path().join("at-end.vmdk");
        write(&at_end, &bytes);
        let info = check(&at_end).expect("footer");
        assert_eq!(info.virtual_size, 4 << 20);
        assert!(info.findings.iter().any(|f| f.contains("footer")));
        // Without a footer that agrees, refused.
        let len = bytes.len();
        bytes[len - 1024 + 12..len - 1024 + 20].copy_from_slice(&1u64.to_le_bytes());
        write(&at_end, &bytes);
        assert!(matches!(check(&at_end), Err(FormatError::Corrupt(_))));
    }

    #[test]
    fn files_outside_the_image_are_never_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        // A descriptor whose extent is /etc/shadow.
        let shadow = d.join("shadow.vmdk");
        write(&shadow, b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"/etc/shadow\" 0\n");
        assert!(
            matches!(check(&shadow), Err(FormatError::ExternalExtent(f)) if f == "/etc/shadow")
        );
        // ...and claimed as raw, it is still recognised as a VMDK.
        let as_raw = inspect(
            &std::fs::File::open(&shadow).expect("open"),
            DiskFormat::Raw,
            &Limits::default(),
        );
        assert!(matches!(
            as_raw,
            Err(FormatError::Mismatch {
                detected: DiskFormat::Vmdk,
                ..
            })
        ));
        // A delta disk over a parent.
        let base = vmdk(d, "base.vmdk", &[], "10M");
        let delta = vmdk(
            d,
            "delta.vmdk",
            &["-b", base.to_str().expect("p"), "-F", "vmdk"],
            "10M",
        );
        assert!(matches!(check(&delta), Err(FormatError::BackingFile(_))));
        // Split into 2 GB extent files: the descriptor names other files.
        let split = vmdk(
            d,
            "split.vmdk",
            &["-o", "subformat=twoGbMaxExtentSparse"],
            "10M",
        );
        assert!(matches!(check(&split), Err(FormatError::ExternalExtent(_))));
        // An embedded descriptor edited to point elsewhere.
        let mut bytes = std::fs::read(&base).expect("read");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.find("\"base.vmdk\"").expect("extent line");
        bytes[at + 1..at + 10].copy_from_slice(b"/etc/x.vm");
        let edited = d.join("edited.vmdk");
        write(&edited, &bytes);
        assert!(matches!(
            check(&edited),
            Err(FormatError::ExternalExtent(_))
        ));
    }

    #[test]
    fn no_input_panics() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = vmdk(dir.path(), "x.vmdk", &[], "16M");
        corrupt_everywhere(&std::fs::read(&p).expect("read"), DiskFormat::Vmdk, 1024);
    }
}
