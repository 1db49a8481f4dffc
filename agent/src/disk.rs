//! The disk being written: opening it for direct I/O, its size, and the checks that keep the
//! agent from writing over something in use — a mounted file system (on the disk or one of its
//! partitions, or through a device-mapper/RAID holder), active swap, or the disk holding the
//! agent's own root file system.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::sys::stat::{major, minor};

/// An opened target: a block device or a plain file.
#[derive(Debug)]
pub struct Target {
    /// `O_DIRECT` descriptor, if the device or file system allows direct I/O.
    pub direct: Option<File>,
    pub buffered: File,
    pub size: u64,
    pub block_device: bool,
}

/// Opens `path` read-write with `O_DIRECT`.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
}

impl Target {
    /// Opens `path` for writing after the safety checks; `force` overrides the in-use and root
    /// checks (never the size check, which the caller makes against the image).
    pub fn open(path: &Path, force: bool) -> anyhow::Result<Target> {
        let block_device = check_target(path, force, false, "writing", |e| {
            format!(
                "refusing to write {}: {e} (--force overrides)",
                path.display()
            )
        })?;
        let mut options = File::options();
        options.read(true).write(true);
        if block_device {
            // An exclusive open: the kernel refuses it while a file system has the device, and
            // nobody can mount it while we write.
            options.custom_flags(nix::libc::O_EXCL);
        }
        let buffered = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && force => File::options()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                bail!(
                    "refusing to write {}: the device is busy (mounted, or held by another \
                     driver); --force overrides",
                    path.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let direct = match open_direct(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(
                    "{}: no direct I/O ({e}); writing through the page cache",
                    path.display()
                );
                None
            }
        };
        Target::sized(path, buffered, direct, block_device)
    }

    /// Opens `path` to read it whole (capture): a file system mounted read-write from it (or
    /// the running root) changes under the reader and makes an inconsistent image, so that is
    /// refused unless `force`; read-only mounts are fine.
    pub fn open_read(path: &Path, force: bool) -> anyhow::Result<Target> {
        let block_device = check_target(path, force, true, "capturing", |e| {
            format!(
                "refusing to capture {}: {e}, so its content may change while it is read; \
                 unmount it or remount it read-only (--force captures it anyway)",
                path.display()
            )
        })?;
        let buffered =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let direct = File::options()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)
            .ok();
        Target::sized(path, buffered, direct, block_device)
    }

    fn sized(
        path: &Path,
        mut buffered: File,
        direct: Option<File>,
        block_device: bool,
    ) -> anyhow::Result<Target> {
        let size = buffered
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot size {}", path.display()))?;
        Ok(Target {
            direct,
            buffered,
            size,
            block_device,
        })
    }
}

/// The checks both opens make: `path` is a block device or a regular file, and a block device
/// is not in use — refused with `refusal(reason)` unless `force` (then `doing` goes on, and the
/// log says so). Whether `path` is a block device.
fn check_target(
    path: &Path,
    force: bool,
    read_only_mounts_ok: bool,
    doing: &str,
    refusal: impl FnOnce(&str) -> String,
) -> anyhow::Result<bool> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot open the disk {}", path.display()))?;
    let block_device = meta.file_type().is_block_device();
    if !block_device && !meta.file_type().is_file() {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        );
    }
    if block_device {
        let dev = (major(meta.rdev()) as u32, minor(meta.rdev()) as u32);
        if let Err(e) = check_not_in_use(dev, read_only_mounts_ok) {
            if !force {
                bail!(refusal(&e));
            }
            tracing::warn!("{}: {e}; {doing} anyway (--force)", path.display());
        }
    }
    Ok(block_device)
}

/// `Err(reason)` when device `dev`, a partition of it, or a device built on it is mounted (but
/// for read-only mounts when `read_only_mounts_ok`: the mount and its file system both `ro`),
/// used as swap, held by another driver, or carries the running system's root.
fn check_not_in_use(dev: (u32, u32), read_only_mounts_ok: bool) -> Result<(), String> {
    let mine = family(dev);
    let root = std::fs::metadata("/")
        .map(|m| (major(m.dev()) as u32, minor(m.dev()) as u32))
        .ok();
    if let Some(root) = root
        && root.0 != 0
    {
        let root_disks: HashSet<_> = whole_disks(root);
        if mine.iter().any(|d| root_disks.contains(d) || *d == root) {
            return Err("it holds the running system's root file system".into());
        }
    }
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(devno), Some(point), Some(options)) =
                (fields.get(2), fields.get(4), fields.get(5))
            else {
                continue;
            };
            // After the optional fields and " - ": fstype, source, super options.
            let super_options = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|i| fields.get(i + 3))
                .copied()
                .unwrap_or("rw");
            let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
            if let Some(d) = parse_devno(devno)
                && mine.contains(&d)
            {
                if read_only_mounts_ok && ro(options) && ro(super_options) {
                    tracing::info!("{} is mounted read-only at {point}", name_of(d));
                    continue;
                }
                return Err(format!("{} is mounted read-write at {point}", name_of(d)));
            }
        }
    }
    for d in &mine {
        let holders = sys_dir(*d).join("holders");
        if let Ok(mut entries) = std::fs::read_dir(&holders)
            && let Some(Ok(holder)) = entries.next()
        {
            return Err(format!(
                "{} is held by {}",
                name_of(*d),
                holder.file_name().to_string_lossy()
            ));
        }
    }
    Ok(())
}

/// The device and its partitions.
fn family(dev: (u32, u32)) -> Vec<(u32, u32)> {
    let mut out = vec![dev];
    if let Ok(entries) = std::fs::read_dir(sys_dir(dev)) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.join("partition").exists()
                && let Some(d) = read_devno(&p.join("dev"))
            {
                out.push(d);
            }
        }
    }
    out
}

/// The whole disks under `dev`: itself, the disk of a partition, and (recursively) the disks
/// below a device-mapper or RAID device.
fn whole_disks(dev: (u32, u32)) -> HashSet<(u32, u32)> {
    let mut out = HashSet::new();
    let mut todo = vec![dev];
    while let Some(d) = todo.pop() {
        if !out.insert(d) || out.len() > 64 {
            continue;
        }
        let dir = sys_dir(d);
        if dir.join("partition").exists()
            && let Ok(real) = std::fs::canonicalize(&dir)
            && let Some(parent) = real.parent()
            && let Some(p) = read_devno(&parent.join("dev"))
        {
            todo.push(p);
        }
        if let Ok(slaves) = std::fs::read_dir(dir.join("slaves")) {
            for s in slaves.flatten() {
                if let Some(p) = read_devno(&s.path().join("dev")) {
                    todo.push(p);
                }
            }
        }
    }
    out
}

fn sys_dir(dev: (u32, u32)) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1))
}

fn name_of(dev: (u32, u32)) -> String {
    std::fs::canonicalize(sys_dir(dev))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| format!("/dev/{}", n.to_string_lossy()))
        })
        .unwrap_or_else(|| format!("device {}:{}", dev.0, dev.1))
}

fn read_devno(path: &Path) -> Option<(u32, u32)> {
    parse_devno(std::fs::read_to_string(path).ok()?.trim())
}

fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_parse_strictly() {
        assert_eq!(parse_devno("259:3"), Some((259, 3)));
        assert_eq!(parse_devno("8"), None);
        assert_eq!(parse_devno("a:b"), None);
    }

    /// Read-only: the disk under this machine's `/` must be refused (nothing is opened).
    #[test]
    fn the_disk_of_the_running_root_is_refused() {
        let meta = std::fs::metadata("/").expect("/");
        let root = (major(meta.dev()) as u32, minor(meta.dev()) as u32);
        if root.0 == 0 {
            eprintln!("/ is not on a block device here (tmpfs, overlay): nothing to check");
            return;
        }
        for disk in whole_disks(root) {
            let e = check_not_in_use(disk, true).expect_err("root disk");
            assert!(e.contains("root file system"), "{e}");
        }
    }

    #[test]
    fn a_plain_file_opens_with_its_size() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(123 * 4096).expect("len");
        let t = Target::open(f.path(), false).expect("open");
        assert_eq!(t.size, 123 * 4096);
        assert!(!t.block_device);
    }

    #[test]
    fn a_directory_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let e = Target::open(d.path(), false).expect_err("dir");
        assert!(e.to_string().contains("neither a block device"), "{e}");
    }
}
