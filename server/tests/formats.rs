//! Disk formats through the real binary: `kagami image inspect` on images qemu-img made, good
//! and hostile.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::qemu_img;

/// qemu's verdict that `image` (of qemu format `fmt`) is the same disk as the raw file.
fn qemu_compare(raw: &str, fmt: &str, image: &str) {
    qemu_img(&["compare", "-q", "-f", "raw", "-F", fmt, raw, image]);
}

/// Runs `kagami image inspect` with no server and no token; returns (exit ok, JSON verdict).
fn inspect(file: &Path, format: Option<&str>) -> (bool, Value) {
    let mut cmd = Command::new(common::kagami());
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
    common::backed_qcow2(&p("backed.qcow2"), "/etc/passwd");
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
    common::backed_qcow2(&p("evil.qcow2"), "/etc/passwd");
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

#[test]
fn qcow2_imports_become_the_same_disk_and_hostile_ones_leave_nothing() {
    let s = common::Server::start();
    let d = s.dir.path();
    let p = |n: &str| d.join(n).to_str().expect("path").to_string();
    // A 48 MiB disk with data, holes and an unaligned tail.
    let mut disk = vec![0u8; (48 << 20) + 4096 + 512];
    for (i, chunk) in disk.chunks_mut(3 << 20).enumerate() {
        if i % 2 == 0 {
            chunk.copy_from_slice(&common::noise(i as u64, chunk.len()));
        }
    }
    std::fs::write(p("disk.raw"), &disk).expect("write");
    for (name, opts) in [("plain.qcow2", vec![]), ("compressed.qcow2", vec!["-c"])] {
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(&opts);
        let (src, dst) = (p("disk.raw"), p(name));
        args.extend_from_slice(&[&src, &dst]);
        qemu_img(&args);
        // The CLI recognises the qcow2 and sends it through the server's import.
        let image = s.import(&d.join(name), name);
        assert_eq!(image["status"], "active");
        assert_eq!(image["virtual_size"], disk.len() as u64);
        let out = d.join(format!("{name}.out"));
        s.cli(&[
            "image",
            "download",
            image["id"].as_str().expect("id"),
            "-o",
            out.to_str().expect("p"),
        ]);
        assert!(
            common::same_bytes(&d.join("disk.raw"), &out),
            "{name}: imported disk differs"
        );
        // qemu agrees the download is the same disk as its qcow2.
        qemu_compare(out.to_str().expect("p"), "qcow2", &dst);
    }
    let raw_image = s.import(&d.join("disk.raw"), "raw");
    // Every other format qemu makes imports to the very same content.
    for (name, fmt, opts) in [
        ("disk.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("disk-so.vmdk", "vmdk", "subformat=streamOptimized"),
        ("disk.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("disk-fixed.vhd", "vpc", "subformat=fixed,force_size=on"),
        ("disk.vhdx", "vhdx", "subformat=dynamic"),
        ("disk.vdi", "vdi", "static=off"),
        ("disk.qed", "qed", "cluster_size=65536"),
    ] {
        let (src, dst) = (p("disk.raw"), p(name));
        qemu_img(&[
            "convert", "-q", "-f", "raw", "-O", fmt, "-o", opts, &src, &dst,
        ]);
        let image = s.import(&d.join(name), name);
        assert_eq!(
            image["digest"], raw_image["digest"],
            "{name} imports to a different disk"
        );
    }
    let stats = s.store_stats();
    assert_eq!(stats["unreferenced_blocks"], 0);
    let before = stats["blocks"].clone();
    assert_eq!(
        raw_image["digest"],
        s.cli_json(&["image", "list"])[0]["digest"],
        "qcow2 and raw imports of one disk are one content"
    );

    // Hostile and unsupported inputs: refused with the inspector's code, image failed, no blocks kept.
    common::backed_qcow2(&p("evil.qcow2"), "/etc/passwd");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("evil.qcow2"),
        &p("nested.qcow2"),
    ]);
    for (file, claim, code) in [
        ("evil.qcow2", "qcow2", "backing_file"),
        ("disk.raw", "qcow2", "format_mismatch"),
        ("nested.qcow2", "qcow2", "format_mismatch"),
    ] {
        let image = s.cli_json(&["image", "create", "--name", file]);
        let id = image["id"].as_str().expect("id");
        let r = s.admin(
            "POST",
            &format!("/v1/images/{id}/import?disk_format={claim}"),
            &["--data-binary", &format!("@{}", p(file))],
        );
        // What the inspector sees in the file is refused at once; what it sees only in the
        // converted disk (a qcow2 inside a qcow2) fails the import job, with the same code.
        let code_seen = match r.status {
            202 => {
                let job = r.json();
                let path = format!("/v1/jobs/{}", job["id"].as_str().expect("job id"));
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    let job = s.admin("GET", &path, &[]).json();
                    if job["state"] == "failed" {
                        break job["error_code"].as_str().expect("code").to_string();
                    }
                    assert!(std::time::Instant::now() < deadline, "{job}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            _ => r.code(),
        };
        assert_eq!(code_seen, code, "{file}: {}", r.text());
        assert_eq!(
            s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
            "failed"
        );
    }
    s.gc_now();
    assert_eq!(
        s.store_stats()["blocks"],
        before,
        "refused imports keep no blocks"
    );
    for dir in ["staging", "jobs"] {
        assert_eq!(
            std::fs::read_dir(s.data_dir().join(dir))
                .map(|d| d.count())
                .unwrap_or(0),
            0,
            "{dir}: refused uploads leave no file"
        );
    }
}

#[test]
fn exports_stream_as_qcow2_that_qemu_checks_and_compares_equal() {
    let s = common::Server::start();
    let d = s.dir.path();
    let p = |n: &str| d.join(n).to_str().expect("path").to_string();
    let mut disk = vec![0u8; (40 << 20) + 1024];
    disk[..(3 << 20)].copy_from_slice(&common::noise(1, 3 << 20));
    let tail = disk.len() - 5000;
    disk[tail..].copy_from_slice(&common::noise(2, 5000));
    std::fs::write(p("disk.raw"), &disk).expect("write");
    let image = s.import(&d.join("disk.raw"), "exportable");
    let id = image["id"].as_str().expect("id");
    // curl: a real HTTP client, a declared length, a file qemu accepts.
    let r = s.curl_into(
        Some(&s.token.clone()),
        "GET",
        &format!("/v1/images/{id}/file?format=qcow2"),
        &[],
        &d.join("out.qcow2"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length")
            .and_then(|l| l.parse::<u64>().ok()),
        Some(r.body.len() as u64)
    );
    assert!(
        (r.body.len() as u64) < (4 << 20) + (1 << 20),
        "holes stay holes: {} bytes",
        r.body.len()
    );
    qemu_img(&["check", "-q", "-f", "qcow2", &p("out.qcow2")]);
    qemu_compare(&p("disk.raw"), "qcow2", &p("out.qcow2"));
    // The CLI verifies the qcow2 it wrote by reading it back as a disk.
    s.cli(&[
        "image",
        "download",
        id,
        "--format",
        "qcow2",
        "-o",
        &p("cli.qcow2"),
    ]);
    qemu_compare(&p("disk.raw"), "qcow2", &p("cli.qcow2"));
    // A round trip: the export imports back to the same content.
    let again = s.import(&d.join("cli.qcow2"), "round-trip");
    assert_eq!(again["digest"], image["digest"]);
    // Dynamic VHD, with a declared length; qemu reads the same disk (CHS-rounded, zero tail).
    let r = s.curl_into(
        Some(&s.token.clone()),
        "GET",
        &format!("/v1/images/{id}/file?format=vhd"),
        &[],
        &d.join("out.vhd"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length")
            .and_then(|l| l.parse::<u64>().ok()),
        Some(r.body.len() as u64)
    );
    qemu_compare(&p("disk.raw"), "vpc", &p("out.vhd"));
    let r = s.admin("GET", &format!("/v1/images/{id}/file?format=vhdx"), &[]);
    assert_eq!(
        (r.status, r.code()),
        (400, "unsupported_format".to_string())
    );
}

#[test]
fn an_export_stops_at_a_corrupt_block_and_says_so() {
    let s = common::Server::start();
    let d = s.dir.path();
    let disk = common::noise(5, 3 << 20);
    std::fs::write(d.join("disk.raw"), &disk).expect("write");
    let image = s.import(&d.join("disk.raw"), "to-corrupt");
    let id = image["id"].as_str().expect("id");
    // One byte flipped in the middle of a pack (the run was split between the store's two
    // lanes, a pack each): inside some block's stored bytes.
    let packs: Vec<_> = std::fs::read_dir(s.data_dir().join("packs"))
        .expect("packs")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(packs.len(), 2, "{packs:?}");
    let mut bytes = std::fs::read(&packs[0]).expect("pack");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&packs[0], &bytes).expect("pack");
    for format in ["qcow2", "vhd", "vmdk"] {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-H"])
            .arg(format!("Authorization: Bearer {}", s.token))
            .arg(format!("{}/v1/images/{id}/file?format={format}", s.url))
            .output()
            .expect("curl");
        assert!(
            !out.status.success(),
            "{format}: a corrupt block must never be served whole"
        );
    }
    assert!(
        s.log_text().contains("copy of block") && s.log_text().contains("is corrupt (pack"),
        "{}",
        s.log_text()
    );
}

/// Hostile images name files outside themselves — a qcow2 backing file and external data
/// file, VMDK extents — and every way in refuses them with the reason, without ever opening
/// those files: the CLI's inspection, the API's dry run, an upload to import, a raw upload.
/// inotify watches the named files for any open, by anyone, while the server and the CLI read
/// the images.
#[test]
fn hostile_images_are_refused_without_opening_the_files_they_name() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

    let s = common::Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().expect("path").to_string();
    let canary = p("canary.raw");
    common::write_file(Path::new(&canary), &common::noise(61, 1 << 20));
    common::backed_qcow2(&p("backed.qcow2"), &canary);
    let data_file = format!("data_file={}", p("data.raw"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &data_file,
        &p("split.qcow2"),
        "1M",
    ]);
    let flat = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{canary}\" 0\n"
    );
    std::fs::write(d.join("flat.vmdk"), flat).expect("write");
    let sparse_extent = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicSparse\"\n\nRW 2048 SPARSE \"{}\"\n",
        p("data.raw")
    );
    std::fs::write(d.join("sparse.vmdk"), sparse_extent).expect("write");

    // From here, nothing may open the files the images name.
    let watch = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
    for named in [&canary, &p("data.raw")] {
        watch
            .add_watch(
                named.as_str(),
                AddWatchFlags::IN_OPEN | AddWatchFlags::IN_ACCESS,
            )
            .expect("watch");
    }
    for (name, claimed, code) in [
        ("backed.qcow2", "qcow2", "backing_file"),
        ("split.qcow2", "qcow2", "data_file"),
        ("flat.vmdk", "vmdk", "external_extent"),
        ("sparse.vmdk", "vmdk", "external_extent"),
    ] {
        let file = d.join(name);
        let (ok, v) = inspect(&file, Some(claimed));
        assert!(!ok, "{name}: {v}");
        assert_eq!(v["code"], code, "{name}: {v}");
        let body = format!("@{}", file.display());
        let r = s.admin(
            "POST",
            &format!("/v1/formats/inspect?disk_format={claimed}"),
            &["--data-binary", &body],
        );
        let v = r.json();
        assert_eq!(
            (v["verdict"].as_str(), v["code"].as_str()),
            (Some("refused"), Some(code))
        );
        let image = s.cli_json(&["image", "create", "--name", name]);
        let id = image["id"].as_str().expect("id");
        let path = format!("/v1/images/{id}/import?disk_format={claimed}");
        let r = s.admin("POST", &path, &["--data-binary", &body]);
        assert_eq!((r.status, r.code()), (400, code.to_string()), "{name}");
        let image = s.cli_json(&["image", "create", "--name", name]);
        let id = image["id"].as_str().expect("id");
        let r = s.admin(
            "PUT",
            &format!("/v1/images/{id}/file"),
            &["--data-binary", &body],
        );
        assert_eq!(
            (r.status, r.code()),
            (400, "format_mismatch".to_string()),
            "{name}"
        );
    }
    match watch.read_events() {
        Ok(events) => assert!(events.is_empty(), "named files were opened: {events:?}"),
        Err(nix::errno::Errno::EAGAIN) => {}
        Err(e) => panic!("inotify: {e}"),
    }
    // And the watch does see an open.
    std::fs::read(&canary).expect("read");
    let seen = watch.read_events().expect("an event");
    assert!(!seen.is_empty());
}
