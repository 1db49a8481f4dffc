//! Disk formats through the real binary: `kagami image inspect` on images qemu-img made, good
//! and hostile.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `kagami image inspect` with no server and no token; returns (exit ok, JSON verdict).
fn inspect(file: &Path, format: Option<&str>) -> (bool, Value) {
    let mut cmd = Command::new(common::KAGAMI);
    cmd.args(["image", "inspect"])
        .arg(file)
        .args(["--output", "json"]);
    if let Some(f) = format {
        cmd.args(["--format", f]);
    }
    let out = cmd.env_remove("KAGAMI_TOKEN").output().expect("kagami");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), v)
}

#[test]
fn inspect_accepts_real_images_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().expect("path").to_string();
    for (fmt, name) in [("qcow2", "a.qcow2"), ("vmdk", "a.vmdk")] {
        qemu_img(&["create", "-q", "-f", fmt, &p(name), "256M"]);
        let (ok, v) = inspect(&d.join(name), None);
        assert!(ok, "{v}");
        assert_eq!(v["verdict"], "accepted");
        assert_eq!(v["info"]["format"], fmt);
        assert_eq!(v["info"]["virtual_size"], 256u64 << 20);
    }
    // Claimed wrongly, or hostile: refused with a specific code, and the exit status says so.
    let (ok, v) = inspect(&d.join("a.qcow2"), Some("raw"));
    assert!(!ok);
    assert_eq!(v["code"], "format_mismatch");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &p("backed.qcow2"),
        "1M",
    ]);
    let (ok, v) = inspect(&d.join("backed.qcow2"), Some("qcow2"));
    assert!(!ok);
    assert_eq!(v["code"], "backing_file");
    assert!(
        v["reason"]
            .as_str()
            .expect("reason")
            .contains("/etc/passwd")
    );
    std::fs::write(d.join("shadow.vmdk"), b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/shadow\" 0\n").expect("write");
    let (ok, v) = inspect(&d.join("shadow.vmdk"), None);
    assert!(!ok);
    assert_eq!(v["code"], "external_extent");
    // A plain raw file is raw.
    std::fs::write(d.join("disk.raw"), vec![1u8; 4096]).expect("write");
    let (ok, v) = inspect(&d.join("disk.raw"), None);
    assert!(ok, "{v}");
    assert_eq!(v["info"]["format"], "raw");
}

#[test]
fn the_api_dry_run_explains_its_verdict_and_keeps_nothing() {
    let s = common::Server::start();
    let d = s.dir.path();
    let p = |n: &str| d.join(n).to_str().expect("path").to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        &p("ok.vmdk"),
        "64M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &p("evil.qcow2"),
        "1M",
    ]);
    let r = s.admin(
        "POST",
        "/v1/formats/inspect?disk_format=vmdk",
        &["--data-binary", &format!("@{}", p("ok.vmdk"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["verdict"], "accepted");
    assert_eq!(v["info"]["virtual_size"], 64u64 << 20);
    let r = s.admin(
        "POST",
        "/v1/formats/inspect",
        &["--data-binary", &format!("@{}", p("evil.qcow2"))],
    );
    let v = r.json();
    assert_eq!(
        (v["verdict"].as_str(), v["code"].as_str()),
        (Some("refused"), Some("backing_file"))
    );
    let r = s.admin(
        "POST",
        "/v1/formats/inspect?disk_format=floppy",
        &["--data-binary", "x"],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_query".to_string()));
    // Nothing staged survives the request.
    let staging = s.data_dir().join("staging");
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0
    );
    assert_eq!(
        s.curl(None, "POST", "/v1/formats/inspect", &["--data-binary", "x"])
            .status,
        401
    );
}
