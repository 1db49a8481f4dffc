//! Safe disk-format inspection: what an uploaded file really is, before anything else reads it.
//!
//! [`inspect`] reads only bounded pieces of the file (headers, descriptors, metadata tables up to
//! configured limits) through [`ReadAt`], never follows a path written inside the image, and
//! answers either a [`DiskInfo`] (format, virtual size, findings) or a [`FormatError`] that says
//! exactly why the file is refused. Every check carries a comment saying why it exists.
//!
//! The rules, for every format:
//! - the file must be exactly the claimed format, and no other format's signature may match
//!   (a qcow2 uploaded "as raw" would otherwise be booted by a hypervisor that probes formats);
//! - nothing may point outside the file: backing files, parent locators (differencing disks),
//!   external data files, VMDK extents other than the file itself;
//! - no encryption, no unknown incompatible feature bits (we cannot know what they change);
//! - virtual size and metadata tables within [`Limits`]; headers complete and self-consistent.
//!
//! How this compares with OpenStack's inspector: see `docs/formats.md`.

mod iso;
mod qcow2;
mod qed;
pub mod read;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;
pub mod write;

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The disk formats Kagami knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
    Vdi,
    Qed,
    Iso,
}

impl DiskFormat {
    pub const ALL: [DiskFormat; 8] = [
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vmdk,
        DiskFormat::Vhd,
        DiskFormat::Vhdx,
        DiskFormat::Vdi,
        DiskFormat::Qed,
        DiskFormat::Iso,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vdi => "vdi",
            DiskFormat::Qed => "qed",
            DiskFormat::Iso => "iso",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "'{s}' is not a disk format; use raw, qcow2, vmdk, vhd, vhdx, vdi, qed or iso"
                )
            })
    }
}

/// Bounds on what an image may claim and on what inspecting it may cost.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Limits {
    /// Largest virtual size accepted, in bytes.
    pub max_virtual_size: u64,
    /// Largest metadata structure (an L1 table, a BAT, a descriptor) read or accepted, in bytes.
    pub max_metadata_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_virtual_size: 16 << 40,
            max_metadata_bytes: 64 << 20,
        }
    }
}

/// What inspection found in an accepted image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub format: DiskFormat,
    /// Size of the disk the image describes, in bytes.
    pub virtual_size: u64,
    /// Size of the file inspected, in bytes.
    pub file_size: u64,
    /// Facts worth telling the operator (subformat, features), none of them a reason to refuse.
    pub findings: Vec<String>,
}

/// Why an image was refused. The `code` is stable; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("the file is {detected}, not {claimed}; upload it with disk_format={detected}")]
    Mismatch {
        claimed: DiskFormat,
        detected: DiskFormat,
    },
    #[error("the file matches several formats at once ({0}); refusing an ambiguous image")]
    Ambiguous(String),
    #[error("the image needs a backing file ({0}); flatten it first (qemu-img convert)")]
    BackingFile(String),
    #[error(
        "the image keeps its data in an external file ({0}); convert it to a self-contained image"
    )]
    DataFile(String),
    #[error(
        "the VMDK names an extent outside itself ({0}); only single-file monolithicSparse and streamOptimized VMDKs are accepted"
    )]
    ExternalExtent(String),
    #[error("the image is a differencing disk (parent locator); merge it into its parent first")]
    Differencing,
    #[error("the image is encrypted; decrypt it before upload")]
    Encrypted,
    #[error("the image uses unknown incompatible features (0x{0:x}); refusing what we cannot read")]
    UnknownFeatures(u64),
    #[error("the virtual size {size} exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("{what} of {size} bytes exceeds the metadata limit of {limit} bytes")]
    MetadataTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("the file is truncated: {0}")]
    Truncated(String),
    #[error("the header is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported {format} variant: {detail}")]
    Unsupported { format: DiskFormat, detail: String },
    #[error("cannot read the image: {0}")]
    Io(#[from] io::Error),
}

impl FormatError {
    /// A stable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            FormatError::Mismatch { .. } => "format_mismatch",
            FormatError::Ambiguous(_) => "format_ambiguous",
            FormatError::BackingFile(_) => "backing_file",
            FormatError::DataFile(_) => "data_file",
            FormatError::ExternalExtent(_) => "external_extent",
            FormatError::Differencing => "differencing_disk",
            FormatError::Encrypted => "encrypted",
            FormatError::UnknownFeatures(_) => "unknown_features",
            FormatError::TooLarge { .. } => "virtual_size_too_large",
            FormatError::MetadataTooLarge { .. } => "metadata_too_large",
            FormatError::Truncated(_) => "truncated",
            FormatError::Corrupt(_) => "corrupt_header",
            FormatError::Unsupported { .. } => "unsupported_variant",
            FormatError::Io(_) => "unreadable",
        }
    }
}

/// An inspection's answer, as the CLI and the API report it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verdict {
    /// `accepted` or `refused`.
    pub verdict: String,
    pub claimed: DiskFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<DiskInfo>,
    /// The refusal's stable code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Verdict {
    pub fn of(claimed: DiskFormat, result: &Result<DiskInfo, FormatError>) -> Verdict {
        match result {
            Ok(info) => Verdict {
                verdict: "accepted".into(),
                claimed,
                info: Some(info.clone()),
                code: None,
                reason: None,
            },
            Err(e) => Verdict {
                verdict: "refused".into(),
                claimed,
                info: None,
                code: Some(e.code().into()),
                reason: Some(e.to_string()),
            },
        }
    }

    pub fn accepted(&self) -> bool {
        self.info.is_some()
    }
}

/// Inspects as `claimed`, or — when no claim is made — as the one format whose signature the
/// file carries (raw if none).
pub fn verdict(r: &dyn ReadAt, claimed: Option<DiskFormat>, limits: &Limits) -> Verdict {
    let claimed = match claimed {
        Some(c) => c,
        None => match detect(r).as_deref() {
            Ok([one]) => *one,
            _ => DiskFormat::Raw,
        },
    };
    Verdict::of(claimed, &inspect(r, claimed, limits))
}

/// Positional reads over the image: a file, an HTTP range source, a byte slice.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the data.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Total size in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match std::os::unix::fs::FileExt::read_at(self, &mut buf[done..], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for &[u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// What a streaming upload can show the inspector without a copy of the whole file: its first
/// bytes and its last bytes. Every signature Kagami probes lives in the first 64 KiB or the last
/// 1 KiB (VHD and VMDK footers), so [`detect`] on this sees what it would see on the file; the
/// gap in between reads as zeroes.
#[derive(Debug, Default)]
pub struct StreamEnds {
    /// The first bytes (up to [`StreamEnds::HEAD`]).
    pub head: Vec<u8>,
    /// The last bytes (up to [`StreamEnds::TAIL`]; may overlap `head` in a short stream).
    pub tail: Vec<u8>,
    /// Length of the whole stream.
    pub size: u64,
}

impl StreamEnds {
    /// Bytes worth keeping from each end: probes and the ISO inspector read at most this far.
    pub const HEAD: usize = 4 << 20;
    pub const TAIL: usize = 64 << 10;
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for StreamEnds {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = buf.len().min(self.size.saturating_sub(offset) as usize);
        let tail_start = self.size.saturating_sub(self.tail.len() as u64);
        for (i, byte) in buf[..n].iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = if at < self.head.len() as u64 {
                self.head[at as usize]
            } else if at >= tail_start {
                self.tail[(at - tail_start) as usize]
            } else {
                0
            };
        }
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// Reads exactly `len` bytes at `offset` (bounded by the caller), or says what was cut short.
pub(crate) fn read_exact(
    r: &dyn ReadAt,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len];
    let n = r.read_at(&mut buf, offset)?;
    if n < len {
        return Err(FormatError::Truncated(format!(
            "{what} at offset {offset} needs {len} bytes, the file has {n}"
        )));
    }
    Ok(buf)
}

/// Reads up to `len` bytes at `offset` (fewer at the end of the file).
pub(crate) fn read_some(r: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len];
    let n = r.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Checks a virtual size against the limits.
pub(crate) fn check_size(size: u64, limits: &Limits) -> Result<u64, FormatError> {
    if size > limits.max_virtual_size {
        return Err(FormatError::TooLarge {
            size,
            limit: limits.max_virtual_size,
        });
    }
    Ok(size)
}

/// Checks a metadata structure's size against the limits before it is read or trusted.
pub(crate) fn check_metadata(
    what: &'static str,
    size: u64,
    limits: &Limits,
) -> Result<(), FormatError> {
    if size > limits.max_metadata_bytes {
        return Err(FormatError::MetadataTooLarge {
            what,
            size,
            limit: limits.max_metadata_bytes,
        });
    }
    Ok(())
}

/// Each format's signature probe (raw has none).
type Probe = fn(&dyn ReadAt) -> Result<bool, FormatError>;
const PROBES: [(DiskFormat, Probe); 7] = [
    (DiskFormat::Qcow2, qcow2::probe),
    (DiskFormat::Vmdk, vmdk::probe),
    (DiskFormat::Vhd, vhd::probe),
    (DiskFormat::Vhdx, vhdx::probe),
    (DiskFormat::Vdi, vdi::probe),
    (DiskFormat::Qed, qed::probe),
    (DiskFormat::Iso, iso::probe),
];

/// Which formats' signatures the file carries (cheap, bounded reads). A plain ISO's system
/// area is allowed to carry an MBR/GPT (hybrid ISOs); that is not another format here.
pub fn detect(r: &dyn ReadAt) -> Result<Vec<DiskFormat>, FormatError> {
    let mut found = Vec::new();
    for (format, probe) in PROBES {
        if probe(r)? {
            found.push(format);
        }
    }
    Ok(found)
}

/// Inspects `r`, claimed to be `claimed`, and accepts or refuses it.
pub fn inspect(
    r: &dyn ReadAt,
    claimed: DiskFormat,
    limits: &Limits,
) -> Result<DiskInfo, FormatError> {
    let file_size = r.size()?;
    let found = detect(r)?;
    // Exactly one signature, and it must be the claimed one. Raw means "no signature at all":
    // a known format claimed as raw is the classic way to smuggle a backing file past a checker.
    match (claimed, found.as_slice()) {
        (DiskFormat::Raw, []) => {}
        (_, [one]) if *one == claimed => {}
        (_, [one]) => {
            return Err(FormatError::Mismatch {
                claimed,
                detected: *one,
            });
        }
        (_, []) => {
            return Err(FormatError::Mismatch {
                claimed,
                detected: DiskFormat::Raw,
            });
        }
        (_, many) => {
            let names: Vec<&str> = many.iter().map(|f| f.as_str()).collect();
            return Err(FormatError::Ambiguous(names.join(", ")));
        }
    }
    claimed_checks(r, claimed, limits, file_size, true)
}

/// [`inspect`] without the search for other formats' signatures (some sit at the end of a
/// file): the claimed format's own signature and checks, reading only the file's start where
/// the format allows (a dynamic VHD is checked by its footer's copy at offset 0, the footer
/// itself being last). An import may start reading a file that is still arriving on this
/// verdict — Kagami's readers read nothing but the file itself — but keeps nothing unless the
/// whole file then passes [`inspect`], which refuses whatever this refuses.
pub fn inspect_claimed(
    r: &dyn ReadAt,
    claimed: DiskFormat,
    limits: &Limits,
) -> Result<DiskInfo, FormatError> {
    let file_size = r.size()?;
    if let Some((_, probe)) = PROBES.iter().find(|(format, _)| *format == claimed)
        && !probe(r)?
    {
        return Err(FormatError::Mismatch {
            claimed,
            detected: DiskFormat::Raw,
        });
    }
    claimed_checks(r, claimed, limits, file_size, false)
}

/// The claimed format's own checks (its signature already found); `whole`: the file is all
/// there (see [`inspect_claimed`]).
fn claimed_checks(
    r: &dyn ReadAt,
    claimed: DiskFormat,
    limits: &Limits,
    file_size: u64,
    whole: bool,
) -> Result<DiskInfo, FormatError> {
    let (virtual_size, findings) = match claimed {
        DiskFormat::Raw => (file_size, Vec::new()),
        DiskFormat::Qcow2 => qcow2::inspect(r, limits)?,
        DiskFormat::Vmdk => vmdk::inspect(r, limits)?,
        DiskFormat::Vhd => vhd::inspect(r, limits, whole)?,
        DiskFormat::Vhdx => vhdx::inspect(r, limits)?,
        DiskFormat::Vdi => vdi::inspect(r, limits)?,
        DiskFormat::Qed => qed::inspect(r, limits)?,
        DiskFormat::Iso => iso::inspect(r, limits)?,
    };
    Ok(DiskInfo {
        format: claimed,
        virtual_size: check_size(virtual_size, limits)?,
        file_size,
        findings,
    })
}

/// Shared by the format tests: real images from qemu, no-panic sweeps, reading a disk back.
#[cfg(test)]
pub(crate) mod tests_support;
