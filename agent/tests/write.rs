//! `kagami-agent write` against a real `kagami serve`, onto loop devices (losetup over sparse
//! files) and plain files. Faults come from a real HTTP proxy between the two (a Python script
//! that can delay segment answers, flip a byte in one, and survive the server's restart).

#[path = "../../server/tests/common/mod.rs"]
mod common;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BLOCK, Server, sparse_file};
use support::*;

#[test]
fn a_full_write_to_a_loop_device_is_the_image_byte_for_byte() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let image = s.import(&image_file(dir.path()), "full");
    let id = image["id"].as_str().expect("id");
    let disk = dirty_disk(dir.path(), "disk.img", 48 * MIB);
    let beyond = read_at(&disk, 40 * MIB, 8 * MIB as usize);
    let dev = Loop::over(&disk);

    let r = report(&agent(&s, &s.url, id, &dev.0, &["--verify"]));
    assert_eq!(r["engine"], "io_uring");
    assert_eq!(r["block_device"], true);
    assert_eq!(r["direct_io"], true);
    assert_eq!(r["digest"], image["digest"]);
    assert_eq!(r["fetched_blocks"], image["data_blocks"]);
    assert_eq!(r["written_bytes"], image["data_size"]);
    let holes = 40 * MIB - image["data_size"].as_u64().expect("size");
    assert_eq!(r["zeroed_bytes"].as_u64(), Some(holes), "every hole zeroed");
    assert_eq!(r["verified_bytes"].as_u64(), Some(40 * MIB));
    drop(dev);

    let raw = dir.path().join("download.raw");
    s.cli(&["image", "download", id, "-o", raw.to_str().expect("path")]);
    assert!(
        same_prefix(&raw, &disk, 40 * MIB),
        "disk differs from the image"
    );
    assert_eq!(
        read_at(&disk, 40 * MIB, 8 * MIB as usize),
        beyond,
        "bytes past the image are left alone"
    );
}

#[test]
fn a_differential_rewrite_fetches_and_writes_only_the_changed_blocks() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let source = image_file(dir.path());
    let image = s.import(&source, "diff");
    let id = image["id"].as_str().expect("id");
    // A plain file this time (the other tests use loop devices).
    let disk = dirty_disk(dir.path(), "disk.img", 40 * MIB);
    let disk_str = disk.to_str().expect("path");
    report(&agent(&s, &s.url, id, disk_str, &[]));
    assert!(same_prefix(&source, &disk, 40 * MIB));

    // Damage ~1 % of the 640 blocks: four data blocks, and two holes inside data segments.
    for offset in [
        0,
        5 * MIB + 2 * BLOCK as u64,
        30 * MIB + 7 * BLOCK as u64 + 99,
        31 * MIB,
    ] {
        write_at(&disk, offset, b"changed");
    }
    for offset in [10 * BLOCK as u64, 12 * MIB + 20 * BLOCK as u64] {
        write_at(&disk, offset, b"dirty hole");
    }
    // Through the fallback engine (pread/pwrite threads), which must behave the same.
    let r = report(&agent(
        &s,
        &s.url,
        id,
        disk_str,
        &["--mode", "differential", "--verify", "--engine", "threads"],
    ));
    assert_eq!(r["engine"], "threads");
    assert_eq!(r["fetched_blocks"], 4, "{r}");
    assert_eq!(r["written_bytes"].as_u64(), Some(4 * BLOCK as u64));
    let received = r["received_bytes"].as_u64().expect("received");
    assert!(
        received <= 4 * (BLOCK as u64 + 36),
        "only the changed blocks travel: {received} bytes"
    );
    let data_size = image["data_size"].as_u64().expect("size");
    assert!(
        r["unchanged_bytes"].as_u64().expect("unchanged") >= data_size - 4 * BLOCK as u64,
        "{r}"
    );
    assert!(r["zeroed_bytes"].as_u64().expect("zeroed") >= 2 * BLOCK as u64);
    assert!(
        same_prefix(&source, &disk, 40 * MIB),
        "disk differs after the rewrite"
    );

    // Nothing left to do: a second differential pass fetches nothing.
    let again = report(&agent(
        &s,
        &s.url,
        id,
        disk_str,
        &["--mode", "differential"],
    ));
    assert_eq!(again["fetched_blocks"], 0);
    assert_eq!(again["written_bytes"], 0);
}

/// The fault-injecting proxy: forwards GETs to the URL in `<dir>/upstream` (re-read on every
/// request, so the server may move), delays each segment answer by `DELAY` seconds, flips a
/// data byte of segment `CORRUPT`'s answer, and appends each served segment to `<dir>/served`.
const PROXY: &str = r#"
import http.server, os, sys, time, urllib.request, urllib.error
state = sys.argv[1]
delay = float(os.environ.get("DELAY", "0"))
corrupt = os.environ.get("CORRUPT")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        upstream = open(os.path.join(state, "upstream")).read().strip()
        segment = self.path.split("/segments/")[1].split("?")[0] if "/segments/" in self.path else None
        if segment is not None:
            time.sleep(delay)
        req = urllib.request.Request(upstream + self.path,
                                     headers={"Authorization": self.headers.get("Authorization", "")})
        headers = {}
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, headers, body = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        except Exception as e:
            status, body = 502, str(e).encode()
        if segment is not None and status == 200:
            if segment == corrupt and len(body) > 200:
                body = body[:136] + bytes([body[136] ^ 1]) + body[137:]
            with open(os.path.join(state, "served"), "a") as f:
                f.write(segment + "\n")
        self.send_response(status)
        for h in ("Content-Type", "x-kagami-digest", "ETag"):
            if headers and headers.get(h):
                self.send_header(h, headers.get(h))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
with open(os.path.join(state, "port.tmp"), "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(os.path.join(state, "port.tmp"), os.path.join(state, "port"))
srv.serve_forever()
"#;

struct Proxy {
    child: Child,
    state: tempfile::TempDir,
    url: String,
}

impl Proxy {
    fn start(upstream: &str, env: &[(&str, &str)]) -> Proxy {
        let state = tempfile::tempdir().expect("tmp");
        std::fs::write(state.path().join("upstream"), upstream).expect("upstream");
        let child = Command::new("python3")
            .args(["-c", PROXY])
            .arg(state.path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(state.path().join("port")) {
                break p;
            }
            assert!(Instant::now() < deadline, "the proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            state,
        }
    }

    fn served(&self) -> usize {
        std::fs::read_to_string(self.state.path().join("served"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn point_at(&self, upstream: &str) {
        std::fs::write(self.state.path().join("upstream"), upstream).expect("upstream");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_write_survives_the_server_restarting_mid_way_and_resumes_where_it_stopped() {
    let mut s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    // 24 segments, each with data, so the write takes a while through the slowed proxy.
    let extents: Vec<(u64, usize)> = (0..24).map(|i| (i * SEGMENT + 7 * 4096, 150_000)).collect();
    let source = sparse_file(dir.path(), "image.raw", 24 * SEGMENT, &extents, 5);
    let image = s.import(&source, "resume");
    let id = image["id"].as_str().expect("id").to_string();
    let disk = dirty_disk(dir.path(), "disk.img", 24 * SEGMENT);
    let dev = Loop::over(&disk);
    let proxy = Proxy::start(&s.url, &[("DELAY", "0.1")]);

    let child = Command::new(AGENT)
        .args([
            "write", "--server", &proxy.url, "--image", &id, "--disk", &dev.0,
        ])
        .args(["--json", "--jobs", "1"])
        .env("KAGAMI_TOKEN", &s.token)
        .env("KAGAMI_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.served() < 4 {
        assert!(Instant::now() < deadline, "the agent made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill();
    std::thread::sleep(Duration::from_millis(1500));
    s.restart();
    proxy.point_at(&s.url);
    let out = child.wait_with_output().expect("agent");
    let r = report(&out);
    assert!(r["retries"].as_u64().expect("retries") >= 1, "{r}");
    assert_eq!(
        r["fetched_blocks"], image["data_blocks"],
        "segments written before the restart are not fetched again"
    );
    assert_eq!(r["written_bytes"], image["data_size"]);
    let served_before_and_after = proxy.served();
    assert_eq!(
        served_before_and_after, 24,
        "each segment served exactly once"
    );
    drop(dev);
    assert!(
        same_prefix(&source, &disk, 24 * SEGMENT),
        "disk differs after resuming"
    );
}

#[test]
fn a_corrupted_block_is_never_written_and_the_error_names_it() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let source = image_file(dir.path());
    let image = s.import(&source, "corrupt");
    let id = image["id"].as_str().expect("id");
    let disk = dirty_disk(dir.path(), "disk.img", 40 * MIB);
    let before = read_at(&disk, 5 * MIB, BLOCK);
    let dev = Loop::over(&disk);
    // Segment 1 (4–8 MiB): its first data block is block 80, at byte 5 MiB.
    let proxy = Proxy::start(&s.url, &[("CORRUPT", "1")]);
    let out = agent(&s, &proxy.url, id, &dev.0, &[]);
    drop(dev);
    assert!(!out.status.success(), "a corrupt block must stop the write");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("block 80 (byte 5242880) came back corrupt"),
        "the error names the block: {err}"
    );
    assert_eq!(
        read_at(&disk, 5 * MIB, BLOCK),
        before,
        "the corrupt block's place on the disk is untouched"
    );
}

#[test]
fn a_disk_too_small_or_mounted_is_refused_and_left_untouched() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let image = s.import(&image_file(dir.path()), "refusals");
    let id = image["id"].as_str().expect("id");

    let small = dirty_disk(dir.path(), "small.img", 16 * MIB);
    let small_before = std::fs::read(&small).expect("read");
    let dev = Loop::over(&small);
    let out = agent(&s, &s.url, id, &dev.0, &[]);
    drop(dev);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds 16777216 bytes") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(std::fs::read(&small).expect("read") == small_before);

    let fs_file = dir.path().join("fs.img");
    std::fs::File::create(&fs_file)
        .expect("create")
        .set_len(48 * MIB)
        .expect("len");
    let dev = Loop::over(&fs_file);
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", &dev.0])
            .status()
            .expect("mkfs.ext4")
            .success()
    );
    let mnt = tempfile::tempdir().expect("mnt");
    assert!(
        Command::new("mount")
            .arg(&dev.0)
            .arg(mnt.path())
            .status()
            .expect("mount")
            .success()
    );
    let out = agent(&s, &s.url, id, &dev.0, &[]);
    let _ = Command::new("umount").arg(mnt.path()).status();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is mounted read-write at") && err.contains("--force"),
        "{err}"
    );
    drop(dev);
    // The file system is intact: fsck finds it clean.
    assert!(
        Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&fs_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("e2fsck")
            .success()
    );
}
