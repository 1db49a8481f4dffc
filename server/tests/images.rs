//! Images end to end: import, download, dedup, ranges, delete + GC, crash recovery.

mod common;

use common::{BLOCK, Server, data_blocks, noise, same_bytes, sparse_file};
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::FileExt;

const GIB: u64 = 1 << 30;

#[test]
fn sparse_gigabyte_round_trips_and_stores_only_its_data() {
    let s = Server::start();
    let dir = s.dir.path();
    // 1 GiB, mostly holes: 24 MiB at 100 MiB, 3 MiB + 100 bytes straddling blocks near the end.
    let disk = sparse_file(
        dir,
        "disk.raw",
        GIB,
        &[
            (100 << 20, 24 << 20),
            (GIB - (5 << 20) + 1234, (3 << 20) + 100),
        ],
        1,
    );
    let image = s.import(&disk, "sparse");
    assert_eq!(image["status"], "active");
    assert_eq!(image["virtual_size"], GIB);
    let (blocks, bytes) = data_blocks(&disk);
    assert_eq!(
        image["data_blocks"], blocks,
        "holes must not be counted as data"
    );
    assert_eq!(image["data_size"], bytes);
    let stats = s.store_stats();
    assert_eq!(
        stats["blocks"], blocks,
        "every data block stored once, no hole stored"
    );
    assert_eq!(stats["block_bytes"], bytes);
    // Packs hold the data plus a 4 KiB header per batch (one per 4 MiB segment): under 1 %.
    let packed = stats["pack_bytes"].as_u64().expect("pack bytes");
    assert!(
        packed >= bytes && packed < bytes + bytes / 100,
        "packs hold {packed} bytes for {bytes} of data"
    );

    // Download with curl: byte-identical, with the digest in a header that the CLI also checks.
    let id = image["id"].as_str().expect("id");
    let out = dir.join("out.raw");
    let r = s.curl_into(
        Some(&s.token),
        "GET",
        &format!("/v1/images/{id}/file"),
        &[],
        &out,
    );
    assert_eq!(r.status, 200);
    assert!(
        same_bytes(&disk, &out),
        "download differs from the imported file"
    );
    assert_eq!(
        r.header("x-kagami-digest").as_deref(),
        image["digest"].as_str()
    );
    let cli_out = dir.join("cli.raw");
    s.cli(&[
        "image",
        "download",
        id,
        "-o",
        cli_out.to_str().expect("path"),
    ]);
    assert!(same_bytes(&disk, &cli_out));
    // Holes stay holes: the CLI leaves the image's all-zero blocks out of the file.
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&cli_out.metadata().expect("stat")) * 512;
    assert!(
        allocated < bytes + (1 << 20),
        "{allocated} bytes allocated for {bytes} of data"
    );
}

#[test]
fn same_content_stores_nothing_new_and_one_changed_block_stores_one() {
    let s = Server::start();
    let dir = s.dir.path();
    let disk = sparse_file(
        dir,
        "a.raw",
        64 << 20,
        &[(0, 8 << 20), (40 << 20, 5 << 20)],
        7,
    );
    let first = s.import(&disk, "a");
    let before = s.store_stats();

    let second = s.import(&disk, "a-again");
    assert_eq!(second["digest"], first["digest"]);
    let after = s.store_stats();
    assert_eq!(after["blocks"], before["blocks"]);
    assert_eq!(
        after["pack_bytes"], before["pack_bytes"],
        "a re-import must write no block bytes"
    );

    // Change one byte in one 64 KiB block: exactly one new block.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open");
    f.write_all_at(&[0xAB], (41 << 20) + 17).expect("write");
    let third = s.import(&disk, "a-changed");
    assert_ne!(third["digest"], first["digest"]);
    let changed = s.store_stats();
    assert_eq!(
        changed["blocks"].as_u64(),
        before["blocks"].as_u64().map(|b| b + 1)
    );
    assert_eq!(
        changed["block_bytes"].as_u64(),
        before["block_bytes"].as_u64().map(|b| b + BLOCK as u64)
    );
}

#[test]
fn ranges_return_exact_bytes_and_bad_ranges_are_416() {
    let s = Server::start();
    let dir = s.dir.path();
    let size: u64 = 10 * BLOCK as u64 + 333; // a short last block
    let disk = sparse_file(
        dir,
        "r.raw",
        size,
        &[(BLOCK as u64 - 10, 3 * BLOCK), (size - 300, 300)],
        3,
    );
    let image = s.import(&disk, "ranged");
    let id = image["id"].as_str().expect("id");
    let content = std::fs::read(&disk).expect("read");
    let path = format!("/v1/images/{id}/file");
    for (spec, start, end) in [
        ("0-0", 0u64, 1u64),
        ("65530-65545", 65530, 65546), // across a block boundary, data into data
        ("100000-300000", 100_000, 300_001), // data into a hole
        (&format!("{}-", size - 500), size - 500, size), // open-ended, through the short last block
        ("-7", size - 7, size),        // suffix
        (&format!("{}-{}", size - 1, size + 1000), size - 1, size), // clipped at the end
    ] {
        let r = s.admin("GET", &path, &["-H", &format!("Range: bytes={spec}")]);
        assert_eq!(r.status, 206, "range {spec}");
        assert_eq!(
            r.body,
            content[start as usize..end as usize],
            "range {spec}"
        );
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{}/{size}", end - 1)),
            "range {spec}"
        );
    }
    for bad in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=-0".to_string(),
    ] {
        let r = s.admin("GET", &path, &["-H", &format!("Range: {bad}")]);
        assert_eq!(r.status, 416, "{bad}");
        assert_eq!(r.code(), "range_not_satisfiable");
        assert_eq!(r.header("content-range"), Some(format!("bytes */{size}")));
    }
}

#[test]
fn protected_images_resist_delete_and_gc_keeps_shared_blocks() {
    let s = Server::start();
    let dir = s.dir.path();
    // a and b share 2 MiB; deleting a leaves under a quarter of the pack live.
    let shared = noise(11, 2 << 20);
    let only_a = noise(12, 10 << 20);
    let only_b = noise(13, 1 << 20);
    let a = dir.join("a.raw");
    let b = dir.join("b.raw");
    common::write_file(&a, &[shared.clone(), only_a].concat());
    common::write_file(&b, &[shared, only_b].concat());
    let img_a = s.cli_json(&[
        "image",
        "import",
        a.to_str().expect("path"),
        "--name",
        "a",
        "--protected",
    ]);
    let img_b = s.import(&b, "b");
    let id_a = img_a["id"].as_str().expect("id");
    let all = s.store_stats();
    assert_eq!(all["blocks"], (2 + 10 + 1) * 16);

    let r = s.admin("DELETE", &format!("/v1/images/{id_a}"), &[]);
    assert_eq!(r.status, 409);
    assert_eq!(r.code(), "image_protected");
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id_a}"), &[]).status,
        200,
        "a refused delete changes nothing"
    );

    s.cli(&["image", "update", id_a, "--protected", "false"]);
    s.cli(&["image", "delete", id_a]);
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id_a}"), &[]).status,
        404
    );
    // Released blocks wait for GC; nothing is dropped before it runs.
    assert_eq!(s.store_stats()["unreferenced_blocks"], 10 * 16);
    let report = s.gc_now();
    assert_eq!(report["dropped_blocks"], 10 * 16);
    // One pack per store lane, both mostly dead now.
    assert_eq!(report["packs_rewritten"], 2);
    let after = s.store_stats();
    assert_eq!(
        after["blocks"],
        (2 + 1) * 16,
        "b's blocks (shared ones included) stay"
    );
    let (before_bytes, after_bytes) = (
        all["pack_bytes"].as_u64().expect("n"),
        after["pack_bytes"].as_u64().expect("n"),
    );
    assert!(
        after_bytes < before_bytes / 3,
        "the mostly dead pack is rewritten: {before_bytes} -> {after_bytes}"
    );
    // b is intact after the rewrite.
    let id_b = img_b["id"].as_str().expect("id");
    let out = dir.join("b.out");
    s.cli(&["image", "download", id_b, "-o", out.to_str().expect("path")]);
    assert!(same_bytes(&b, &out));
}

#[test]
fn an_upload_killed_mid_way_never_becomes_active_and_gc_reclaims_it() {
    let mut s = Server::start();
    let dir = s.dir.path().to_path_buf();
    let keep = dir.join("keep.raw");
    common::write_file(&keep, &noise(21, 3 << 20));
    let kept = s.import(&keep, "keep");
    let big = dir.join("big.raw");
    common::write_file(&big, &noise(22, 64 << 20));
    let image = s.cli_json(&["image", "create", "--name", "interrupted"]);
    let id = image["id"].as_str().expect("id").to_string();

    // A slow upload (4 MiB/s) of 64 MiB; kill the server once some of its blocks are on disk.
    let mut upload = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--limit-rate",
            "4M",
            "-X",
            "PUT",
            "-T",
        ])
        .arg(&big)
        .args([
            "-H",
            &format!("Authorization: Bearer {}", s.token),
            &format!("{}/v1/images/{id}/file", s.url),
        ])
        .spawn()
        .expect("curl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.store_stats()["unreferenced_blocks"].as_u64().unwrap_or(0) < 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "upload never stored blocks"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "saving"
    );
    s.kill();
    let _ = upload.kill();
    let _ = upload.wait();
    s.restart();

    let after = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(after["status"], "failed");
    assert!(
        after["status_reason"]
            .as_str()
            .expect("reason")
            .contains("stopped during the upload")
    );
    let r = s.admin("GET", &format!("/v1/images/{id}/file"), &[]);
    assert_eq!(r.status, 409);
    assert_eq!(r.code(), "not_active");
    // The orphan blocks go; the committed image's stay and still read back.
    let report = s.gc_now();
    assert!(report["dropped_blocks"].as_u64().expect("n") >= 64);
    let stats = s.store_stats();
    assert_eq!(stats["unreferenced_blocks"], 0);
    assert_eq!(stats["blocks"], 3 * 16);
    let out = dir.join("keep.out");
    s.cli(&[
        "image",
        "download",
        kept["id"].as_str().expect("id"),
        "-o",
        out.to_str().expect("path"),
    ]);
    assert!(same_bytes(&keep, &out));
    // A failed image may be uploaded again, and then it is whole.
    let small = dir.join("small.raw");
    common::write_file(&small, &noise(23, 1 << 20));
    s.cli(&["image", "upload", &id, small.to_str().expect("path")]);
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "active"
    );
}

#[test]
fn a_truncated_upload_fails_with_a_reason() {
    let s = Server::start();
    let image = s.cli_json(&["image", "create", "--name", "short"]);
    let id = image["id"].as_str().expect("id");
    // Claim 2 MiB, send 1 MiB, then hang up: the server must not commit the half.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let head = format!(
        "PUT /v1/images/{id}/file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 2097152\r\n\r\n",
        s.token
    );
    conn.write_all(head.as_bytes()).expect("send head");
    conn.write_all(&noise(5, 1 << 20)).expect("send half");
    drop(conn);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
        if now["status"] == "failed" {
            break;
        }
        assert_ne!(now["status"], "active", "a truncated upload became active");
        assert!(
            std::time::Instant::now() < deadline,
            "upload never failed: {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn gc_rounds_over_small_packs_never_lose_live_data() {
    // 1 MiB packs: every import spans several packs, and deletes leave them part-dead.
    let s = Server::start_with(&[("KAGAMI__STORE__PACK_BYTES", "1048576")]);
    let dir = s.dir.path();
    let shared = noise(40, 1 << 20);
    let files: Vec<_> = (0..3u64)
        .map(|i| {
            let path = dir.join(format!("{i}.raw"));
            common::write_file(
                &path,
                &[
                    noise(41 + i, 3 << 20),
                    shared.clone(),
                    noise(50 + i, BLOCK + 7),
                ]
                .concat(),
            );
            path
        })
        .collect();
    let ids: Vec<String> = files
        .iter()
        .map(|f| s.import(f, "x")["id"].as_str().expect("id").to_string())
        .collect();
    let check = |alive: &[usize]| {
        for &i in alive {
            let out = dir.join(format!("{i}.out"));
            s.cli(&[
                "image",
                "download",
                &ids[i],
                "-o",
                out.to_str().expect("path"),
            ]);
            assert!(same_bytes(&files[i], &out), "image {i} damaged by GC");
        }
    };
    s.cli(&["image", "delete", &ids[1]]);
    let first = s.gc_now();
    assert!(
        first["packs_removed"].as_u64().expect("n") + first["packs_rewritten"].as_u64().expect("n")
            > 0,
        "{first}"
    );
    check(&[0, 2]);
    s.cli(&["image", "delete", &ids[0]]);
    s.gc_now();
    check(&[2]);
    // A second run with nothing to drop changes nothing that matters.
    s.gc_now();
    check(&[2]);
    let again = s.import(&files[0], "back");
    let out = dir.join("back.out");
    s.cli(&[
        "image",
        "download",
        again["id"].as_str().expect("id"),
        "-o",
        out.to_str().expect("path"),
    ]);
    assert!(same_bytes(&files[0], &out));
}

#[test]
fn empty_and_stalled_uploads_fail_clearly() {
    let s = Server::start_with(&[("KAGAMI__LIMITS__UPLOAD_IDLE_SECS", "1")]);
    let image = s.cli_json(&["image", "create", "--name", "empty"]);
    let id = image["id"].as_str().expect("id");
    let r = s.admin(
        "PUT",
        &format!("/v1/images/{id}/file"),
        &["--data-binary", ""],
    );
    assert_eq!((r.status, r.code()), (400, "empty_image".to_string()));
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "failed"
    );

    // A client that sends part of the body and then goes quiet (but keeps the connection).
    let image = s.cli_json(&["image", "create", "--name", "stalled"]);
    let id = image["id"].as_str().expect("id");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let head = format!(
        "PUT /v1/images/{id}/file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 9000000\r\n\r\n",
        s.token
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(&noise(9, 5 << 20)).expect("part");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let now = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
        if now["status"] == "failed" {
            assert!(
                now["status_reason"]
                    .as_str()
                    .expect("reason")
                    .contains("no data for 1 s"),
                "{now}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a stalled upload stayed {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(conn);
}

#[test]
fn the_raw_path_takes_only_raw_and_iso_images_only_isos() {
    let s = Server::start();
    let dir = s.dir.path();
    // A qcow2 whose backing file is /etc/passwd, sent as raw bytes: refused, never active.
    let q = dir.join("evil.qcow2");
    let q_path = q.to_str().expect("utf-8 path");
    common::backed_qcow2(q_path, "/etc/passwd");
    let image = s.cli_json(&["image", "create", "--name", "evil"]);
    let id = image["id"].as_str().expect("id");
    let r = s.admin(
        "PUT",
        &format!("/v1/images/{id}/file"),
        &["--data-binary", &format!("@{}", q.display())],
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "format_mismatch".to_string()),
        "{}",
        r.text()
    );
    let now = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(now["status"], "failed");
    assert!(
        now["status_reason"]
            .as_str()
            .expect("reason")
            .contains("qcow2"),
        "{now}"
    );

    // An ISO image must hold an ISO; a minimal ISO 9660 volume is accepted as kind=iso.
    let iso_image = s.cli_json(&["image", "create", "--name", "rescue", "--kind", "iso"]);
    let iso_id = iso_image["id"].as_str().expect("id");
    let not_iso = dir.join("not.iso");
    common::write_file(&not_iso, &noise(3, 1 << 20));
    let r = s.admin(
        "PUT",
        &format!("/v1/images/{iso_id}/file"),
        &["--data-binary", &format!("@{}", not_iso.display())],
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "format_mismatch".to_string()),
        "{}",
        r.text()
    );
    let mut iso = vec![0u8; 64 * 2048];
    let pvd = 16 * 2048;
    iso[pvd] = 1;
    iso[pvd + 1..pvd + 6].copy_from_slice(b"CD001");
    iso[pvd + 80..pvd + 84].copy_from_slice(&64u32.to_le_bytes());
    iso[pvd + 84..pvd + 88].copy_from_slice(&64u32.to_be_bytes());
    iso[pvd + 128..pvd + 130].copy_from_slice(&2048u16.to_le_bytes());
    iso[pvd + 130..pvd + 132].copy_from_slice(&2048u16.to_be_bytes());
    iso[17 * 2048] = 255;
    iso[17 * 2048 + 1..17 * 2048 + 6].copy_from_slice(b"CD001");
    iso[40 * 2048..41 * 2048].fill(0x5a);
    let iso_file = dir.join("real.iso");
    common::write_file(&iso_file, &iso);
    let r = s.admin(
        "PUT",
        &format!("/v1/images/{iso_id}/file"),
        &["--data-binary", &format!("@{}", iso_file.display())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["virtual_size"], 64 * 2048);
    // ...and an ISO is not a raw disk.
    let raw = s.cli_json(&["image", "create", "--name", "iso-as-raw"]);
    let raw_id = raw["id"].as_str().expect("id");
    let r = s.admin(
        "PUT",
        &format!("/v1/images/{raw_id}/file"),
        &["--data-binary", &format!("@{}", iso_file.display())],
    );
    assert_eq!((r.status, r.code()), (400, "format_mismatch".to_string()));
}

/// A whole-machine image groups active disk images of its project, once each; it holds no data
/// of its own, and a deployment of it is a deployment of its disks, in order.
#[test]
fn whole_machine_images_group_disk_images_and_deploy_as_their_disks() {
    let s = Server::start();
    let d = s.dir.path();
    let a = s.import(&sparse_file(d, "a.raw", 8 << 20, &[(0, 4096)], 1), "a");
    let b = s.import(&sparse_file(d, "b.raw", 4 << 20, &[(0, 4096)], 2), "b");
    let (a, b) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));
    let create = |body: String| {
        s.admin(
            "POST",
            "/v1/images",
            &["-H", "content-type: application/json", "-d", &body],
        )
    };
    let whole = |members: &[&str]| {
        create(serde_json::json!({"name": "w", "kind": "whole", "members": members}).to_string())
    };
    let refused = |r: common::Response, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{}", r.text());
    };
    refused(whole(&[]), 400, "invalid_members");
    refused(whole(&[a, a]), 400, "invalid_members");
    let queued = create(r#"{"name": "q"}"#.into()).json();
    refused(
        whole(&[a, queued["id"].as_str().expect("id")]),
        409,
        "not_active",
    );
    refused(
        create(serde_json::json!({"name": "s", "members": [a]}).to_string()),
        400,
        "invalid_members",
    );

    let w = whole(&[a, b]);
    assert!(w.status < 300, "{}", w.text());
    let w = w.json();
    let id = w["id"].as_str().expect("id");
    assert_eq!(w["status"], "active", "{w}");
    assert_eq!(w["virtual_size"], 12 << 20, "{w}");
    assert_eq!(w["members"], serde_json::json!([a, b]), "{w}");
    let member = s.admin("GET", &format!("/v1/images/{b}"), &[]).json();
    assert_eq!(member["parent"], id, "{member}");
    assert_eq!(member["disk_index"], 1, "{member}");
    refused(whole(&[a]), 409, "in_whole_image");
    refused(
        s.admin("GET", &format!("/v1/images/{id}/manifest"), &[]),
        409,
        "whole_image",
    );
    refused(
        s.admin(
            "PUT",
            &format!("/v1/images/{id}/file"),
            &["--data-binary", "@/dev/null"],
        ),
        409,
        "whole_image",
    );

    // Deployed: its disks in order, onto the host's disks in order (no device named).
    s.cli(&["host", "add", "52:54:00:4b:47:77"]);
    let dep = s.cli_json(&["host", "deploy", "52:54:00:4b:47:77", "--image", id]);
    let disks: Vec<(&Value, &Value)> = dep["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| (&d["image_id"], &d["device"]))
        .collect();
    assert_eq!(
        disks,
        [
            (&Value::from(a), &Value::Null),
            (&Value::from(b), &Value::Null)
        ],
        "{dep}"
    );
    s.cli(&["host", "release", "52:54:00:4b:47:77"]);
    let mapped = s.admin(
        "POST",
        "/v1/hosts/52:54:00:4b:47:77/deploy",
        &[
            "-H",
            "content-type: application/json",
            "-d",
            &serde_json::json!({"disks": [{"device": "/dev/sdb", "image": id}]}).to_string(),
        ],
    );
    refused(mapped, 400, "invalid_device");
}
