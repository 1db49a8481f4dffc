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
    capture_with(s, &["--name", name, "--disk", disk])
}

fn capture_with(s: &Server, args: &[&str]) -> Value {
    let out = Command::new(AGENT)
        .args(["capture", "--server", &s.url])
        .args(args)
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

/// A host with a system and a data disk, captured as one whole-machine image; 1 % of the data
/// disk changes; the second capture uploads only those blocks and follows the first in the
/// lineage; the image deploys back onto two other disks byte for byte.
#[test]
fn a_whole_machine_capture_is_differential_keeps_its_lineage_and_deploys_back() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let system = dir.path().join("system.img");
    std::fs::copy(image_file(dir.path()), &system).expect("copy");
    // The data disk: 24 MiB, 384 blocks, every one of them data.
    let data = dirty_disk(dir.path(), "data.img", 24 * MIB);
    let (a, b) = (Loop::over(&system), Loop::over(&data));
    let whole = |s: &Server| {
        capture_with(
            s,
            &[
                "--name",
                "rack1-u07",
                "--kind",
                "whole",
                "--disk",
                &a.0,
                "--disk",
                &b.0,
                "--source",
                "rack1-u07",
            ],
        )
    };
    let first = whole(&s);
    let id = first["image"].as_str().expect("id").to_string();
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["kind"], "whole", "{image}");
    assert_eq!(image["status"], "active", "{image}");
    assert_eq!(image["virtual_size"], 64 * MIB, "{image}");
    let members: Vec<String> = image["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.as_str().expect("id").to_string())
        .collect();
    assert_eq!(members.len(), 2, "{image}");
    for (i, (m, kind, disk)) in [(0, "system", &a.0), (1, "data", &b.0)]
        .into_iter()
        .map(|(i, k, d)| (i, (&members[i], k, d)))
    {
        let member = s.admin("GET", &format!("/v1/images/{m}"), &[]).json();
        assert_eq!(member["kind"], kind, "{member}");
        assert_eq!(member["parent"], id.as_str(), "{member}");
        assert_eq!(member["disk_index"], i, "{member}");
        assert_eq!(member["source_host"], "rack1-u07", "{member}");
        assert_eq!(member["source_disk"], disk.as_str(), "{member}");
        assert_eq!(member["name"], format!("rack1-u07-disk{i}"), "{member}");
    }

    // 1 % of the data disk (4 of its 384 blocks) changes.
    for block in [3u64, 100, 200, 383] {
        write_at(
            &data,
            block * BLOCK as u64 + 7,
            b"changed since the first capture",
        );
    }
    let second = whole(&s);
    assert_eq!(second["uploaded_blocks"], 4, "{second}");
    let uploaded = second["uploaded_bytes"].as_u64().expect("bytes");
    assert!(
        uploaded as f64 <= 1.1 * 4.0 * BLOCK as f64,
        "at most 1.1x the changed blocks travel: {uploaded} bytes"
    );
    let second_id = second["image"].as_str().expect("id").to_string();
    let history = s
        .admin("GET", &format!("/v1/images/{second_id}/history"), &[])
        .json();
    let chain: Vec<&str> = history
        .as_array()
        .expect("chain")
        .iter()
        .map(|i| i["id"].as_str().expect("id"))
        .collect();
    assert_eq!(chain, [second_id.as_str(), id.as_str()], "{history}");
    let shown = s.cli(&["image", "history", &second_id]);
    assert!(shown.contains(&id) && shown.contains(&second_id), "{shown}");
    let second_image = s
        .admin("GET", &format!("/v1/images/{second_id}"), &[])
        .json();
    let second_members = second_image["members"].as_array().expect("members").clone();
    let data_member = s
        .admin(
            "GET",
            &format!("/v1/images/{}", second_members[1].as_str().expect("id")),
            &[],
        )
        .json();
    assert_eq!(
        data_member["previous"],
        members[1].as_str(),
        "{data_member}"
    );

    // Restore onto two other disks (full of noise): each disk image onto its own disk.
    let system2 = dirty_disk(dir.path(), "system2.img", 48 * MIB);
    let data2 = dirty_disk(dir.path(), "data2.img", 24 * MIB);
    let (c, d) = (Loop::over(&system2), Loop::over(&data2));
    for (member, dev) in second_members.iter().zip([&c.0, &d.0]) {
        report(&agent(&s, &s.url, member.as_str().expect("id"), dev, &[]));
    }
    drop((a, b, c, d));
    assert!(same_prefix(&system2, &system, 40 * MIB), "the system disk");
    assert!(same_prefix(&data2, &data, 24 * MIB), "the data disk");

    // A disk image goes only with its whole-machine image, and takes nothing else along.
    let member = second_members[0].as_str().expect("id");
    let refused = s.admin("DELETE", &format!("/v1/images/{member}"), &[]);
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(
        refused.text().contains("in_whole_image"),
        "{}",
        refused.text()
    );
    let deleted = s.admin("DELETE", &format!("/v1/images/{second_id}"), &[]);
    assert!(deleted.status < 300, "{}", deleted.text());
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{member}"), &[]).status,
        404
    );
    let first_again = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(first_again["members"].as_array().map(Vec::len), Some(2));
}

/// Quiescing: a disk whose file system is mounted read-write is refused, with the reason and
/// the way out; mounted read-only it is captured (its content cannot change under the reader).
#[test]
fn a_read_write_mount_is_refused_and_a_read_only_one_is_captured() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let fs_file = dir.path().join("fs.img");
    std::fs::File::create(&fs_file)
        .expect("create")
        .set_len(16 * MIB)
        .expect("len");
    let dev = Loop::over(&fs_file);
    let ok = |cmd: &mut Command| assert!(cmd.status().expect("run").success(), "{cmd:?}");
    ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]));
    let mnt = tempfile::tempdir().expect("mnt");
    ok(Command::new("mount").arg(&dev.0).arg(mnt.path()));
    let refused = Command::new(AGENT)
        .args([
            "capture", "--server", &s.url, "--name", "busy", "--disk", &dev.0,
        ])
        .env("KAGAMI_TOKEN", &s.token)
        .output()
        .expect("capture");
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    ok(Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(mnt.path()));
    let captured = Command::new(AGENT)
        .args([
            "capture", "--server", &s.url, "--name", "quiet", "--disk", &dev.0,
        ])
        .env("KAGAMI_TOKEN", &s.token)
        .env("KAGAMI_LOG", "warn")
        .output()
        .expect("capture");
    let _ = Command::new("umount").arg(mnt.path()).status();
    assert!(!refused.status.success());
    assert!(
        err.contains("is mounted read-write at") && err.contains("remount it read-only"),
        "{err}"
    );
    assert!(
        captured.status.success(),
        "{}",
        String::from_utf8_lossy(&captured.stderr)
    );
    let report: Value = serde_json::from_slice(&captured.stdout).expect("report");
    assert_eq!(report["virtual_size"], 16 * MIB, "{report}");
}
