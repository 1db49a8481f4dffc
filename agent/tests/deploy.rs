//! Hosts and deployments end to end, minus the firmware: enroll a host, assign an image to a
//! disk, fetch the host's iPXE script as iPXE would, then run `kagami-agent run` with the
//! per-boot token the script carries — as the ramdisk does — onto a loop device.

#[path = "../../server/tests/common/mod.rs"]
mod common;
mod support;

use std::process::{Command, Output};

use common::Server;
use serde_json::Value;
use support::*;

const MAC: &str = "52:54:00:12:34:56";

/// Puts stand-in kernel and initrd files where the server serves the agent ramdisk from.
fn ramdisk(s: &Server) {
    let dir = s.data_dir().join("ramdisk");
    std::fs::create_dir_all(&dir).expect("ramdisk dir");
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").expect("kernel");
    std::fs::write(dir.join("initrd.img"), vec![7u8; 100_000]).expect("initrd");
}

/// GET /boot/ipxe as iPXE does (no token).
fn script(s: &Server, mac: &str) -> String {
    let r = s.curl(None, "GET", &format!("/boot/ipxe?mac={mac}"), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// The per-boot token in a script's kernel line.
fn token_in(script: &str) -> String {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kagami.token="))
        .unwrap_or_else(|| panic!("no token in {script}"))
        .to_string()
}

fn run_agent(s: &Server, token: &str, extra: &[&str]) -> Output {
    Command::new(AGENT)
        .args([
            "run",
            "--server",
            &s.url,
            "--token",
            token,
            "--retry-for",
            "20s",
        ])
        .args(extra)
        .env("KAGAMI_LOG", "warn")
        .output()
        .expect("kagami-agent run")
}

fn host(s: &Server, key: &str) -> Value {
    s.cli_json(&["host", "show", key])
}

#[test]
fn hosts_are_enrolled_by_mac_and_bad_input_is_refused() {
    let s = Server::start();
    let h = s.cli_json(&["host", "add", "52-54-00-AB-CD-EF", "--name", "rack1-u7"]);
    assert_eq!(h["mac"], "52:54:00:ab:cd:ef");
    assert_eq!(h["state"], "discovered");
    assert_eq!(host(&s, "rack1-u7")["id"], h["id"]);
    assert_eq!(host(&s, "52:54:00:ab:cd:ef")["id"], h["id"]);

    let post = |body: &str| {
        s.admin(
            "POST",
            "/v1/hosts",
            &["-H", "content-type: application/json", "-d", body],
        )
    };
    let r = post(r#"{"mac": "52:54:00:ab:cd:ef"}"#);
    assert_eq!((r.status, r.code()), (409, "host_exists".into()));
    let r = post(r#"{"mac": "not-a-mac"}"#);
    assert_eq!((r.status, r.code()), (400, "invalid_mac".into()));
    let r = post(r#"{"mac": "52:54:00:00:00:01", "name": "bad name"}"#);
    assert_eq!((r.status, r.code()), (400, "invalid_name".into()));
    let member = s.member_of("team");
    let r = s.curl(Some(&member), "GET", "/v1/hosts", &[]);
    assert_eq!(r.status, 403, "hosts are infrastructure: admin only");

    // A machine Kagami has never seen is recorded at its first boot and sent to its disk.
    let text = script(&s, "52:54:00:99:99:99");
    assert!(
        text.starts_with("#!ipxe\n") && text.ends_with("exit\n"),
        "{text}"
    );
    assert_eq!(host(&s, "52:54:00:99:99:99")["state"], "discovered");
    let r = s.curl(None, "GET", "/boot/ipxe?mac=%0Ashell", &[]);
    assert_eq!(r.status, 400);

    // Deploying needs an active image the caller can see.
    let r = s.admin(
        "POST",
        "/v1/hosts/rack1-u7/deploy",
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"image": "00000000-0000-0000-0000-000000000000"}"#,
        ],
    );
    assert_eq!(r.status, 404, "{}", r.text());
    s.cli(&["host", "forget", "rack1-u7"]);
    let r = s.admin("GET", "/v1/hosts/rack1-u7", &[]);
    assert_eq!(r.status, 404);
}

#[test]
fn a_deployment_boots_the_agent_which_writes_the_disk_and_the_host_turns_deployed() {
    let mut s = Server::start();
    ramdisk(&s);
    let dir = tempfile::tempdir().expect("tmp");
    let source = image_file(dir.path());
    let image = s.import(&source, "os");
    let id = image["id"].as_str().expect("id").to_string();
    let other = s.import(&dirty_disk(dir.path(), "other.raw", 4 * MIB), "other");
    let disk = dirty_disk(dir.path(), "disk.img", 48 * MIB);
    let dev = Loop::over(&disk);

    s.cli(&["host", "add", MAC, "--name", "node1"]);
    // Nothing assigned: the host boots its own disk.
    assert!(script(&s, MAC).ends_with("exit\n"));
    let deployment = s.cli_json(&[
        "host",
        "deploy",
        "node1",
        "--disk",
        &format!("{}={id}", dev.0),
    ]);
    assert_eq!(deployment["state"], "pending");
    assert_eq!(host(&s, "node1")["state"], "deploying");
    // Deploying again while one is in flight is refused.
    let r = s.admin(
        "POST",
        "/v1/hosts/node1/deploy",
        &[
            "-H",
            "content-type: application/json",
            "-d",
            &format!(r#"{{"image": "{id}"}}"#),
        ],
    );
    assert_eq!((r.status, r.code()), (409, "host_busy".into()));

    // The server restarts before the host boots: nothing is lost.
    s.restart();
    let text = script(&s, MAC);
    assert!(
        text.contains(&format!(
            "kernel {}/boot/ramdisk/vmlinuz initrd=initrd.img kagami.url={}",
            s.url, s.url
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("initrd {}/boot/ramdisk/initrd.img", s.url)),
        "{text}"
    );
    let token = token_in(&text);
    let r = s.curl(None, "GET", "/boot/ramdisk/initrd.img", &[]);
    assert_eq!((r.status, r.body.len()), (200, 100_000));
    assert_eq!(
        s.curl(
            None,
            "GET",
            "/boot/ramdisk/../catalog.db",
            &["--path-as-is"]
        )
        .status,
        404
    );

    // The per-boot token opens the agent API and its own image only.
    assert_eq!(s.curl(Some(&token), "GET", "/v1/images", &[]).status, 401);
    assert_eq!(s.curl(Some(&token), "GET", "/v1/hosts", &[]).status, 401);
    let r = s.curl(
        Some(&token),
        "GET",
        &format!(
            "/v1/agent/images/{}/manifest",
            other["id"].as_str().expect("id")
        ),
        &[],
    );
    assert_eq!(r.status, 404, "another image is invisible to the agent");
    assert_eq!(
        s.curl(Some(&s.token), "GET", "/v1/agent/task", &[]).status,
        401,
        "a project token is not an agent token"
    );

    let out = run_agent(&s, &token, &["--verify"]);
    assert!(
        out.status.success(),
        "agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(dev);
    assert!(
        same_prefix(&source, &disk, 40 * MIB),
        "the disk is the image"
    );

    let h = host(&s, "node1");
    assert_eq!(h["state"], "deployed", "{h}");
    let d = &h["deployment"];
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["disks"][0]["phase"], "done");
    assert_eq!(d["disks"][0]["bytes_done"], 40 * MIB);
    assert_eq!(d["disks"][0]["bytes_total"], 40 * MIB);
    assert!(d["timings"]["write"].as_f64().expect("timing") > 0.0, "{d}");
    assert!(
        h["inventory"]["disks"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{h}"
    );
    let states: Vec<&str> = h["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["discovered", "deploying", "deployed"], "{h}");
    // Deployed: the next boot is from the disk, and the finished boot's token reads nothing.
    assert!(script(&s, MAC).ends_with("exit\n"));
    let r = s.curl(
        Some(&token),
        "GET",
        &format!("/v1/agent/images/{id}/manifest"),
        &[],
    );
    assert_eq!(r.status, 404);
}

#[test]
fn a_failed_write_leaves_the_host_failed_with_the_reason() {
    let s = Server::start();
    ramdisk(&s);
    let dir = tempfile::tempdir().expect("tmp");
    let image = s.import(&image_file(dir.path()), "os");
    let id = image["id"].as_str().expect("id");
    let small = dirty_disk(dir.path(), "small.img", 8 * MIB);
    let dev = Loop::over(&small);
    s.cli(&["host", "add", MAC]);
    s.cli(&["host", "deploy", MAC, "--disk", &format!("{}={id}", dev.0)]);
    let token = token_in(&script(&s, MAC));
    let out = run_agent(&s, &token, &[]);
    assert!(!out.status.success());
    let h = host(&s, MAC);
    assert_eq!(h["state"], "failed", "{h}");
    let reason = h["state_reason"].as_str().expect("reason");
    assert!(reason.contains("holds 8388608 bytes"), "{reason}");
    assert_eq!(h["deployment"]["state"], "failed");
    // A failed host boots its disk until an operator deploys again; release makes it ready.
    assert!(script(&s, MAC).ends_with("exit\n"));
    s.cli(&["host", "release", MAC]);
    assert_eq!(host(&s, MAC)["state"], "ready");
}

/// `kagami host capture`: the host boots the agent, which reads its two disks with its
/// per-boot token into a whole-machine image of the operator's project, uploads only what the
/// store lacks, and the host returns to its state; the token then writes nothing more.
#[test]
fn a_host_captures_its_disks_into_a_whole_machine_image_with_its_boot_token() {
    let s = Server::start();
    ramdisk(&s);
    let dir = tempfile::tempdir().expect("tmp");
    let system = dir.path().join("system.img");
    std::fs::copy(image_file(dir.path()), &system).expect("copy");
    let data = dirty_disk(dir.path(), "data.img", 8 * MIB);
    let (a, b) = (Loop::over(&system), Loop::over(&data));
    // The system disk's content is in the store already: only the data disk travels.
    s.import(&system, "known");
    s.cli(&["host", "add", MAC, "--name", "node7"]);
    let before = host(&s, MAC)["state"].clone();
    let assigned = s.cli_json(&[
        "host",
        "capture",
        "node7",
        "--name",
        "node7-backup",
        "--kind",
        "whole",
        "--disk",
        &a.0,
        "--disk",
        &b.0,
    ]);
    assert_eq!(assigned["action"], "capture", "{assigned}");
    assert_eq!(host(&s, MAC)["state"], "capturing");
    // Busy: no deployment meanwhile.
    let busy = s.cli_as(&s.token, &["host", "deploy", MAC, "--image", "x"]);
    assert!(!busy.status.success());

    let token = token_in(&script(&s, MAC));
    // What the agent may make: private system/data/whole images of the operator's project,
    // which it may delete again.
    let make = |body: &str| {
        s.curl(
            Some(&token),
            "POST",
            "/v1/agent/images",
            &["-H", "content-type: application/json", "-d", body],
        )
    };
    let iso = make(r#"{"name": "x", "kind": "iso"}"#);
    assert_eq!(iso.status, 400, "{}", iso.text());
    let made = make(r#"{"name": "x", "visibility": "public", "protected": true}"#);
    assert_eq!(made.status, 201, "{}", made.text());
    let made = made.json();
    assert_eq!(made["visibility"], "private", "{made}");
    assert_eq!(made["protected"], false, "{made}");
    let gone = s.curl(
        Some(&token),
        "DELETE",
        &format!("/v1/agent/images/{}", made["id"].as_str().expect("id")),
        &[],
    );
    assert_eq!(gone.status, 204, "{}", gone.text());
    let out = run_agent(&s, &token, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("made (128 blocks uploaded"), "{said}");
    let h = host(&s, MAC);
    assert_eq!(h["state"], before, "back to where it was: {h}");
    let d = &h["deployment"];
    assert_eq!(d["state"], "succeeded", "{d}");
    let id = d["capture"]["image"].as_str().expect("image").to_string();
    let progress = &d["capture"]["progress"];
    assert_eq!(progress["phase"], "done", "{d}");
    assert_eq!(progress["bytes_done"], 48 * MIB, "both disks read: {d}");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["kind"], "whole", "{image}");
    assert_eq!(image["name"], "node7-backup");
    assert_eq!(image["source_host"], "node7", "{image}");
    assert_eq!(image["owner"], "admin", "the operator's project: {image}");
    let members = image["members"].as_array().expect("members").clone();
    for (member, disk, size) in [
        (&members[0], &system, 40 * MIB),
        (&members[1], &data, 8 * MIB),
    ] {
        let raw = dir.path().join("member.raw");
        s.cli(&[
            "image",
            "download",
            member.as_str().expect("id"),
            "-o",
            raw.to_str().expect("path"),
        ]);
        assert!(same_prefix(&raw, disk, size), "{member} is its disk");
    }

    // The finished capture's token uploads nothing and makes no image.
    let refused = s.curl(
        Some(&token),
        "POST",
        "/v1/blocks/missing",
        &["--data-binary", "@/dev/null"],
    );
    assert!(
        refused.status == 401 || refused.status == 403,
        "{}",
        refused.text()
    );
    let refused = s.curl(
        Some(&token),
        "POST",
        "/v1/agent/images",
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"x"}"#,
        ],
    );
    assert!(
        refused.status == 401 || refused.status == 403,
        "{}",
        refused.text()
    );
}
