//! `kagami-agent capture` against a real server, from a loop device: the image is the disk, and
//! a second capture after a small change uploads only the changed blocks.

#[path = "../../server/tests/common/mod.rs"]
mod common;
mod support;

use std::process::Command;

use common::{BLOCK, Server};
use serde_json::Value;
use support::*;

fn capture(s: &Server, disk: &str, name: &str) -> Value {
    let out = Command::new(AGENT)
        .args([
            "capture", "--server", &s.url, "--name", name, "--disk", disk,
        ])
        .env("KAGAMI_TOKEN", &s.token)
        .env("KAGAMI_LOG", "warn")
        .output()
        .expect("kagami-agent capture");
    assert!(
        out.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

#[test]
fn a_capture_is_the_disk_and_a_second_one_uploads_only_what_changed() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let source = image_file(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::copy(&source, &disk).expect("copy");
    let dev = Loop::over(&disk);

    let first = capture(&s, &dev.0, "golden");
    let image = s
        .admin(
            "GET",
            &format!("/v1/images/{}", first["image"].as_str().expect("id")),
            &[],
        )
        .json();
    assert_eq!(image["status"], "active", "{image}");
    assert_eq!(image["digest"], first["digest"]);
    assert_eq!(first["virtual_size"], 40 * MIB);
    assert_eq!(
        first["uploaded_blocks"], first["data_blocks"],
        "a fresh server has nothing"
    );
    assert_eq!(first["known_blocks"], 0);
    // Content-addressed: importing the same bytes names the same image content.
    let imported = s.import(&source, "imported");
    assert_eq!(imported["digest"], first["digest"]);

    // Change four blocks; capture again.
    for offset in [
        0,
        5 * MIB + 3 * BLOCK as u64,
        30 * MIB + 17,
        39 * MIB + 5 * BLOCK as u64,
    ] {
        write_at(&disk, offset, b"changed since the golden image");
    }
    let second = capture(&s, &dev.0, "second");
    assert_eq!(second["uploaded_blocks"], 4, "{second}");
    let uploaded = second["uploaded_bytes"].as_u64().expect("bytes");
    assert!(
        uploaded <= 4 * (BLOCK as u64 + 36),
        "only the changed blocks travel: {uploaded} bytes"
    );
    assert_ne!(second["digest"], first["digest"]);
    drop(dev);
    let raw = dir.path().join("second.raw");
    s.cli(&[
        "image",
        "download",
        second["image"].as_str().expect("id"),
        "-o",
        raw.to_str().expect("path"),
    ]);
    assert!(
        same_prefix(&raw, &disk, 40 * MIB),
        "the second image is the changed disk"
    );
}
