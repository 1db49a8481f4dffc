//! Helpers shared by the agent's black-box tests.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the helpers"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{BLOCK, Server, noise, sparse_file};
use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_kagami-agent");
pub const MIB: u64 = 1 << 20;
pub const SEGMENT: u64 = 4 * MIB;

/// A loop device over a file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn over(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(
            String::from_utf8(out.stdout)
                .expect("utf-8")
                .trim()
                .to_string(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A 40 MiB image: data and holes inside segments, whole hole segments, data near the end.
pub fn image_file(dir: &Path) -> PathBuf {
    sparse_file(
        dir,
        "image.raw",
        40 * MIB,
        &[
            (0, 300_000),
            (5 * MIB, MIB as usize),
            (12 * MIB + 4096, 200_000),
            (30 * MIB, 2 * MIB as usize),
            (39 * MIB + 5 * BLOCK as u64, 3 * BLOCK),
        ],
        11,
    )
}

/// A disk file of `size` bytes full of noise, so holes the agent fails to zero would show.
pub fn dirty_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, noise(99, size as usize)).expect("disk");
    path
}

pub fn agent(s: &Server, url: &str, image: &str, disk: &str, extra: &[&str]) -> Output {
    Command::new(AGENT)
        .args([
            "write", "--server", url, "--image", image, "--disk", disk, "--json",
        ])
        .args(extra)
        .env("KAGAMI_TOKEN", &s.token)
        .env("KAGAMI_LOG", "warn")
        .output()
        .expect("run kagami-agent")
}

pub fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

/// True when the first `len` bytes of `a` and `b` are equal.
pub fn same_prefix(a: &Path, b: &Path, len: u64) -> bool {
    Command::new("cmp")
        .args(["-s", "-n", &len.to_string()])
        .arg(a)
        .arg(b)
        .status()
        .expect("cmp")
        .success()
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read");
    buf
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(data, offset)
        .expect("write");
}
