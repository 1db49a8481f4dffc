//! `kagami ramdisk build`: the agent's boot ramdisk from a kernel and its modules.
//!
//! The initramfs (a newc cpio, uncompressed: the kernel takes it as is, and a stripped agent is
//! small enough that compressing buys little on a provisioning network) holds busybox, `kagami-agent` with the shared
//! libraries it links (found with `ldd`), the NIC and disk driver modules asked for plus their
//! dependencies (read from each module's `.modinfo` `depends=`), and the init script of
//! `agent/ramdisk/`. The output folder gets `vmlinuz` and `initrd.img`, the two names
//! `GET /boot/ramdisk/…` serves.
//!
//! The newc format is a 110-byte ASCII header per entry; it is written here rather than taken
//! from a crate because the whole writer is shorter than the code to adapt one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const INIT: &str = include_str!("../../../agent/ramdisk/init");
const UDHCPC_SCRIPT: &str = include_str!("../../../agent/ramdisk/udhcpc.script");

/// Drivers loaded by default: virtio (VMs), SATA/SAS/NVMe disks, common server NICs. Those
/// missing from the kernel's modules (built in, or absent) are skipped.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "nvme",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "bnxt_en",
    "tg3",
    "r8169",
    "mlx5_core",
];

#[derive(Debug)]
pub struct Build {
    pub kernel: PathBuf,
    /// `/lib/modules/<version>` of that kernel.
    pub modules: PathBuf,
    pub out: PathBuf,
    pub agent: PathBuf,
    pub busybox: PathBuf,
    pub module_names: Vec<String>,
}

/// What was built, for the operator.
#[derive(Debug)]
pub struct Built {
    pub initrd_bytes: u64,
    pub modules: Vec<String>,
    pub skipped: Vec<String>,
}

/// A newc cpio archive being written.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, &[], (0, 0))
    }

    fn file(&mut self, name: &str, data: &[u8], executable: bool) -> std::io::Result<()> {
        let mode = if executable { 0o100755 } else { 0o100644 };
        self.entry(name, mode, data, (0, 0))
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

/// The shared libraries `binary` needs (absolute paths), from `ldd`; none for a static one.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// A module's dependencies, from the `depends=` string of its `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len() + 1)
        .position(|w| w[0] == 0 && &w[1..] == key)
        .map(|at| {
            let rest = &ko[at + 1 + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `.ko` under `dir`, by module name (`-` read as `_`, as the kernel does).
fn index_modules(dir: &Path) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut out = HashMap::new();
    let mut compressed = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if path.is_dir() {
                todo.push(path);
            } else if let Some(stem) = name.strip_suffix(".ko") {
                out.insert(stem.replace('-', "_"), path);
            } else if name.contains(".ko.") {
                compressed += 1;
            }
        }
    }
    if out.is_empty() && compressed > 0 {
        bail!(
            "the modules under {} are compressed (.ko.xz/.ko.zst); unpack them first",
            dir.display()
        );
    }
    Ok(out)
}

/// Builds `vmlinuz` and `initrd.img` in `b.out`.
pub fn build(b: &Build) -> anyhow::Result<Built> {
    let index = index_modules(&b.modules)?;
    // Dependencies first: a depth-first walk that appends a module after what it needs.
    let mut order: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut skipped = Vec::new();
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        contents: &mut BTreeMap<String, Vec<u8>>,
    ) -> anyhow::Result<bool> {
        let Some(path) = index.get(name) else {
            return Ok(false);
        };
        if !seen.insert(name.to_string()) {
            return Ok(true);
        }
        let ko = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for dep in depends(&ko) {
            visit(&dep, index, seen, order, contents)?;
        }
        contents.insert(name.to_string(), ko);
        order.push(name.to_string());
        Ok(true)
    }
    for name in &b.module_names {
        let name = name.replace('-', "_");
        if !visit(&name, &index, &mut seen, &mut order, &mut contents)? {
            skipped.push(name);
        }
    }

    std::fs::create_dir_all(&b.out).with_context(|| format!("creating {}", b.out.display()))?;
    let initrd_path = b.out.join("initrd.img");
    let tmp = b.out.join(".initrd.img.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cpio = Cpio {
        out: std::io::BufWriter::new(file),
        ino: 0,
        written: 0,
    };
    for d in [
        "bin",
        "dev",
        "etc",
        "etc/kagami",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens /dev/console before init runs.
    cpio.entry("dev/console", 0o020600, &[], (5, 1))?;
    cpio.file("init", INIT.as_bytes(), true)?;
    cpio.file("etc/kagami/udhcpc.script", UDHCPC_SCRIPT.as_bytes(), true)?;
    let busybox =
        std::fs::read(&b.busybox).with_context(|| format!("reading {}", b.busybox.display()))?;
    cpio.file("bin/busybox", &busybox, true)?;
    let agent = stripped(&b.agent)?;
    cpio.file("bin/kagami-agent", &agent, true)?;
    let mut libs = BTreeSet::new();
    for binary in [&b.busybox, &b.agent] {
        libs.extend(shared_libraries(binary)?);
    }
    let mut dirs = BTreeSet::new();
    for lib in &libs {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let mut parent = rel.parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_path_buf());
            parent = p.parent();
        }
        for p in chain.into_iter().rev() {
            if dirs.insert(p.clone()) && p != Path::new("lib") {
                cpio.dir(&p.to_string_lossy())?;
            }
        }
        let data = std::fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        cpio.file(&rel.to_string_lossy(), &data, true)?;
    }
    let mut list = String::new();
    for name in &order {
        let file = format!("{name}.ko");
        cpio.file(&format!("lib/modules/{file}"), &contents[name], false)?;
        list.push_str(&file);
        list.push('\n');
    }
    cpio.file("etc/kagami/modules", list.as_bytes(), false)?;
    let mut out = cpio.finish()?;
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, &initrd_path)?;
    std::fs::copy(&b.kernel, b.out.join("vmlinuz"))
        .with_context(|| format!("copying {}", b.kernel.display()))?;
    Ok(Built {
        initrd_bytes: std::fs::metadata(&initrd_path)?.len(),
        modules: order,
        skipped,
    })
}

/// The agent binary without its debug sections (`strip --strip-debug`, when installed): a
/// debug build is ten times larger, and every byte crosses the network at each boot.
fn stripped(agent: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new()?;
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(tmp.path())
        .arg(agent)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let path = if ok { tmp.path() } else { agent };
    if !ok {
        tracing::warn!(
            "strip is not installed: the agent goes into the ramdisk with its debug sections"
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko =
            b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring,net-failover\0vermagic=6.1\0";
        assert_eq!(depends(ko), ["virtio", "virtio_ring", "net_failover"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing here").is_empty());
    }

    #[test]
    fn newc_entries_are_aligned_and_the_archive_ends_with_a_trailer() {
        let mut cpio = Cpio {
            out: Vec::new(),
            ino: 0,
            written: 0,
        };
        cpio.file("init", b"#!/bin/sh\n", true).expect("file");
        cpio.dir("bin").expect("dir");
        let out = cpio.finish().expect("finish");
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // The first entry's data starts 4-aligned after the 110-byte header and "init\0".
        assert_eq!(&out[116..126], b"#!/bin/sh\n");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
