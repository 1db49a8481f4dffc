//! ISO transitional boots (`kagami host boot-iso`): only an active ISO image boots; the host's
//! iPXE script `sanboot`s the ISO's content route with a per-boot token that reads that image
//! only and dies with the boot; `--until next-boot` and `kagami host release` return the host to
//! the state it had; an ISO is never deployed onto a disk or exported as a disk format. With
//! `--via iscsi` the script logs in to the iSCSI target with CHAP credentials of the boot that
//! list, open and read that ISO only (libiscsi's `iscsi-ls`/`iscsi-inq`, `qemu-img`) and stop
//! working when the boot's token dies.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;

use common::{Response, Server, noise, qemu_img_copy, run, sparse_file};
use serde_json::{Value, json};

const MAC: &str = "52:54:00:4b:49:01";

/// A minimal ISO 9660 volume (a primary and a terminator descriptor) of 64 sectors, with
/// noise in sector 40; what it holds is only read back, never booted here.
fn iso_file(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
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
    iso[40 * 2048..41 * 2048].copy_from_slice(&noise(9, 2048));
    let path = dir.join("rescue.iso");
    common::write_file(&path, &iso);
    (path, iso)
}

/// The server with an ISO image and a raw one: (server, iso id, iso bytes, raw id).
fn with_images() -> (Server, String, Vec<u8>, String) {
    with_images_on(Server::start())
}

fn with_images_on(s: Server) -> (Server, String, Vec<u8>, String) {
    let (path, bytes) = iso_file(s.dir.path());
    let iso = s.cli_json(&[
        "image",
        "import",
        path.to_str().expect("path"),
        "--name",
        "rescue",
        "--kind",
        "iso",
    ]);
    assert_eq!(iso["kind"], "iso", "{iso}");
    assert_eq!(iso["status"], "active", "{iso}");
    let raw = s.import(
        &sparse_file(s.dir.path(), "d.raw", 1 << 20, &[(0, 4096)], 4),
        "disk",
    );
    let id = |v: &Value| v["id"].as_str().expect("id").to_string();
    (s, id(&iso), bytes, id(&raw))
}

fn post(s: &Server, path: &str, body: Value) -> Response {
    s.admin(
        "POST",
        path,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ],
    )
}

fn boot_iso(s: &Server, image: &str, until: &str) -> Response {
    post(
        s,
        &format!("/v1/hosts/{MAC}/boot-iso"),
        json!({"image": image, "until": until}),
    )
}

fn refused(r: &Response, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (status, code),
        "{}",
        r.text()
    );
}

/// The host's next iPXE script, as the machine fetches it (no token).
fn script(s: &Server) -> String {
    let r = s.curl(None, "GET", &format!("/boot/ipxe?mac={MAC}"), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// The token in a script's `sanboot` URL for `image`.
fn sanboot_token(script: &str, s: &Server, image: &str) -> String {
    let prefix = format!(
        "sanboot --no-describe {}/v1/images/{image}/content?token=",
        s.url
    );
    let at = script
        .find(&prefix)
        .unwrap_or_else(|| panic!("no sanboot of {image} in:\n{script}"));
    script[at + prefix.len()..]
        .split_whitespace()
        .next()
        .expect("token")
        .to_string()
}

fn read(s: &Server, image: &str, token: &str, range: &str) -> Response {
    s.curl(
        None,
        "GET",
        &format!("/v1/images/{image}/content?token={token}"),
        &["-H", &format!("Range: bytes={range}")],
    )
}

#[test]
fn only_an_active_iso_boots_and_an_iso_is_never_a_disk() {
    let (s, iso, bytes, raw) = with_images();
    s.cli(&["host", "add", MAC]);

    refused(&boot_iso(&s, &raw, "release"), 400, "not_iso");
    let queued = s.cli_json(&["image", "create", "--name", "later", "--kind", "iso"]);
    refused(
        &boot_iso(&s, queued["id"].as_str().expect("id"), "release"),
        409,
        "not_active",
    );
    refused(&boot_iso(&s, &iso, "forever"), 400, "invalid_body");
    let r = post(
        &s,
        "/v1/hosts/52:54:00:00:00:09/boot-iso",
        json!({"image": iso}),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // Hosts are an admin's business.
    let member = s.member_of("other");
    let r = s.curl(
        Some(&member),
        "POST",
        &format!("/v1/hosts/{MAC}/boot-iso"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            &json!({"image": iso}).to_string(),
        ],
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // Not onto a disk, not as a disk format; as itself, yes.
    let r = post(
        &s,
        &format!("/v1/hosts/{MAC}/deploy"),
        json!({"image": iso}),
    );
    refused(&r, 409, "iso_image");
    assert!(r.text().contains("boot-iso"), "{}", r.text());
    for format in ["qcow2", "vmdk", "vhd"] {
        let r = s.admin(
            "GET",
            &format!("/v1/images/{iso}/file?format={format}"),
            &[],
        );
        refused(&r, 409, "iso_image");
    }
    for q in ["", "?format=raw", "?format=iso"] {
        let r = s.admin("GET", &format!("/v1/images/{iso}/file{q}"), &[]);
        assert_eq!((r.status, r.body == bytes), (200, true), "{q}");
    }
    let h = s.cli_json(&["host", "show", MAC]);
    assert_eq!(h["state"], "discovered", "nothing changed: {h}");
}

#[test]
fn an_iso_boot_sanboots_with_a_token_for_that_image_only_until_released() {
    let (s, iso, bytes, raw) = with_images();
    // A deployed host: deploy, the agent's script, its result.
    let ramdisk = s.data_dir().join("ramdisk");
    std::fs::create_dir_all(&ramdisk).expect("ramdisk");
    for f in ["vmlinuz", "initrd.img"] {
        common::write_file(&ramdisk.join(f), b"x");
    }
    s.cli(&["host", "add", MAC]);
    let dep = s.cli_json(&["host", "deploy", MAC, "--image", &raw]);
    let agent = script(&s)
        .split("kagami.token=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("agent token")
        .to_string();
    let r = s.curl(
        Some(&agent),
        "POST",
        "/v1/agent/result",
        &[
            "-H",
            "content-type: application/json",
            "-d",
            &json!({"deployment": dep["id"]}).to_string(),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let h = s.cli_json(&["host", "boot-iso", MAC, "--image", &iso]);
    assert_eq!(h["state"], "iso", "{h}");
    assert_eq!(h["iso_boot"]["image"], iso.as_str(), "{h}");
    assert_eq!(h["iso_boot"]["until"], "release", "{h}");
    assert_eq!(h["iso_boot"]["return_state"], "deployed", "{h}");
    // Busy: no deployment, capture or second ISO on top.
    refused(&boot_iso(&s, &iso, "release"), 409, "host_busy");
    let r = post(
        &s,
        &format!("/v1/hosts/{MAC}/deploy"),
        json!({"image": raw}),
    );
    refused(&r, 409, "host_busy");

    let first = script(&s);
    assert!(
        first.contains(&format!("boots ISO image {iso} until released")),
        "{first}"
    );
    let t1 = sanboot_token(&first, &s, &iso);
    // What iPXE does: HEAD for the size, then ranges.
    let head = s.curl(
        None,
        "HEAD",
        &format!("/v1/images/{iso}/content?token={t1}"),
        &["-I"],
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(bytes.len().to_string()));
    let r = read(&s, &iso, &t1, "81920-83967");
    assert_eq!(r.status, 206, "{}", r.text());
    assert!(r.body == bytes[40 * 2048..41 * 2048]);
    // That image only, that route only: no other image, no API, not the agent's.
    assert_eq!(read(&s, &raw, &t1, "0-0").status, 404);
    assert_eq!(
        s.curl(Some(&t1), "GET", &format!("/v1/images/{iso}"), &[])
            .status,
        401
    );
    assert_eq!(s.curl(Some(&t1), "GET", "/v1/agent/task", &[]).status, 401);
    assert_eq!(
        s.curl(Some(&t1), "GET", &format!("/v1/images/{iso}/content"), &[])
            .status,
        401
    );

    // Every boot boots it again, with a new token; the earlier boot's dies.
    let t2 = sanboot_token(&script(&s), &s, &iso);
    assert_ne!(t1, t2);
    assert_eq!(read(&s, &iso, &t1, "0-0").status, 401);
    assert_eq!(read(&s, &iso, &t2, "0-0").status, 206);
    assert_eq!(s.cli_json(&["host", "show", MAC])["state"], "iso");

    // Released: back to deployed, the token dead, the next script the local disk.
    let out = s.cli(&["host", "release", MAC]);
    assert!(out.contains("it is deployed"), "{out}");
    assert_eq!(read(&s, &iso, &t2, "0-0").status, 401);
    let next = script(&s);
    assert!(
        !next.contains("sanboot") && next.ends_with("exit\n"),
        "{next}"
    );
    assert!(
        next.contains("is deployed; booting the local disk"),
        "{next}"
    );
    let h = s.cli_json(&["host", "show", MAC]);
    assert_eq!(h["state"], "deployed", "{h}");
    assert!(h.get("iso_boot").is_none(), "{h}");
    let reasons: Vec<&str> = h["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&format!("boots ISO image {iso} until released").as_str())
            && reasons
                .iter()
                .any(|r| r.contains("released by an operator; back to deployed")),
        "{reasons:?}"
    );
}

#[test]
fn until_next_boot_returns_the_host_once_its_script_is_served() {
    let (s, iso, _, _) = with_images();
    s.cli(&["host", "add", MAC]);
    let h = s.cli_json(&[
        "host",
        "boot-iso",
        MAC,
        "--image",
        &iso,
        "--until",
        "next-boot",
    ]);
    assert_eq!(
        (&h["state"], &h["iso_boot"]["until"]),
        (&json!("iso"), &json!("next-boot")),
        "{h}"
    );
    let first = script(&s);
    assert!(first.contains("once (until next-boot)"), "{first}");
    let token = sanboot_token(&first, &s, &iso);
    // The host is back at once; the boot in progress still reads its ISO.
    let h = s.cli_json(&["host", "show", MAC]);
    assert_eq!(h["state"], "discovered", "{h}");
    assert!(h.get("iso_boot").is_none(), "{h}");
    assert_eq!(read(&s, &iso, &token, "0-2047").status, 206);
    // Its next boot is its own again, and ends the reads.
    let next = script(&s);
    assert!(!next.contains("sanboot"), "{next}");
    assert_eq!(read(&s, &iso, &token, "0-0").status, 401);
    // A release after the fact has nothing to end: the host is as it was.
    let out = s.cli(&["host", "release", MAC]);
    assert!(out.contains("it is discovered"), "{out}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The value of `set NAME …` in a script.
fn setting(script: &str, name: &str) -> String {
    let prefix = format!("set {name} ");
    script
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{script}"))
        .to_string()
}

#[test]
fn an_iscsi_iso_boot_logs_in_with_chap_credentials_for_that_image_only() {
    // Without an iSCSI target, --via iscsi is refused and says what to do.
    let (plain, iso, _, _) = with_images();
    plain.cli(&["host", "add", MAC]);
    let r = post(
        &plain,
        &format!("/v1/hosts/{MAC}/boot-iso"),
        json!({"image": iso, "via": "iscsi"}),
    );
    refused(&r, 409, "iscsi_off");
    assert!(r.text().contains("--iscsi-listen"), "{}", r.text());
    drop(plain);

    let port = free_port();
    let (s, iso, bytes, raw) = with_images_on(Server::start_with_args(
        &[],
        &["--iscsi-listen", &format!("127.0.0.1:{port}")],
    ));
    s.cli(&["host", "add", MAC]);
    refused(
        &post(
            &s,
            &format!("/v1/hosts/{MAC}/boot-iso"),
            json!({"image": iso, "via": "ftp"}),
        ),
        400,
        "invalid_body",
    );
    let h = s.cli_json(&["host", "boot-iso", MAC, "--image", &iso, "--via", "iscsi"]);
    assert_eq!(
        (&h["state"], &h["iso_boot"]["via"]),
        (&json!("iso"), &json!("iscsi")),
        "{h}"
    );

    let text = script(&s);
    let target = format!("iqn.2026-11.io.kagami:{iso}");
    assert!(
        text.contains(&format!(
            "sanboot --no-describe iscsi:127.0.0.1::{port}:0:{target} ||"
        )),
        "{text}"
    );
    assert!(
        !text.contains("token="),
        "no bearer token in an iSCSI script: {text}"
    );
    let (name, secret) = (setting(&text, "username"), setting(&text, "password"));
    assert!(name.starts_with("kagami-") && secret.len() == 32, "{text}");
    let portal = format!("iscsi://{name}%{secret}@127.0.0.1:{port}");

    // Discovery lists the ISO only, though the raw image is there too.
    let listed = run(Command::new("iscsi-ls").args(["-s", &portal]));
    let listed_text = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.status.success(), "{listed:?}");
    assert!(listed_text.contains(&target), "{listed_text}");
    assert!(!listed_text.contains(&raw), "{listed_text}");

    // The ISO reads back byte for byte; the raw image does not open.
    let copy = s.dir.path().join("iso-copy.raw");
    qemu_img_copy(&format!("{portal}/{target}/0"), &copy);
    assert!(
        std::fs::read(&copy).expect("copy") == bytes,
        "the copy differs"
    );
    let other =
        run(Command::new("iscsi-inq").arg(format!("{portal}/iqn.2026-11.io.kagami:{raw}/0")));
    assert!(!other.status.success(), "another image opened: {other:?}");
    // A wrong secret for the same name is refused.
    let wrong = run(Command::new("iscsi-inq").arg(format!(
        "iscsi://{name}%{}@127.0.0.1:{port}/{target}/0",
        "0".repeat(32)
    )));
    assert!(
        !wrong.status.success(),
        "a wrong secret logged in: {wrong:?}"
    );

    // The next boot's script mints new credentials: the old ones die with their token.
    let next = script(&s);
    let (name2, secret2) = (setting(&next, "username"), setting(&next, "password"));
    assert_ne!((&name2, &secret2), (&name, &secret));
    let old = run(Command::new("iscsi-inq").arg(format!("{portal}/{target}/0")));
    assert!(
        !old.status.success(),
        "an earlier boot's credentials logged in: {old:?}"
    );
    let url2 = format!("iscsi://{name2}%{secret2}@127.0.0.1:{port}/{target}/0");
    let inq = run(Command::new("iscsi-inq").arg(&url2));
    assert!(inq.status.success(), "{inq:?}");

    // A release ends the boot: its credentials no longer log in.
    s.cli(&["host", "release", MAC]);
    let released = run(Command::new("iscsi-inq").arg(&url2));
    assert!(
        !released.status.success(),
        "released credentials logged in: {released:?}"
    );
    let listed = run(Command::new("iscsi-ls")
        .args(["-s", &format!("iscsi://{name2}%{secret2}@127.0.0.1:{port}")]));
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&target),
        "{listed:?}"
    );
}

/// Sends one iSCSI PDU: a 48-byte header with `flags` and `data` (padded to 4 bytes).
fn send_pdu(stream: &mut TcpStream, opcode: u8, flags: u8, cmd_sn: u32, data: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 48];
    h[0] = opcode;
    h[1] = flags;
    h[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    if opcode == 0x43 {
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 2]); // a login's ISID; else LUN 0
    }
    h[16..20].copy_from_slice(&cmd_sn.to_be_bytes()); // ITT
    h[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    h.extend_from_slice(data);
    h.resize(48 + data.len().div_ceil(4) * 4, 0);
    stream.write_all(&h).expect("write");
    h
}

/// Reads one PDU: (header, data).
fn read_pdu(stream: &mut TcpStream) -> (Vec<u8>, Vec<u8>) {
    let mut h = vec![0u8; 48];
    stream.read_exact(&mut h).expect("read header");
    let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
    let mut data = vec![0u8; len.div_ceil(4) * 4];
    stream.read_exact(&mut data).expect("read data");
    data.truncate(len);
    (h, data)
}

/// The value of `key` in a login response's text.
fn key<'a>(data: &'a [u8], key: &str) -> &'a str {
    std::str::from_utf8(data)
        .expect("text")
        .split('\0')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {:?}", String::from_utf8_lossy(data)))
}

/// Logs in to `target` with CHAP (`name`, `secret`) by hand, to the full feature phase.
fn chap_login(port: u16, target: &str, name: &str, secret: &str) -> TcpStream {
    use md5::{Digest as _, Md5};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let first = format!(
        "InitiatorName=iqn.2026-11.test:boot\0SessionType=Normal\0TargetName={target}\0AuthMethod=CHAP\0"
    );
    send_pdu(&mut stream, 0x43, 0, 0, first.as_bytes());
    let (_, data) = read_pdu(&mut stream);
    assert_eq!(key(&data, "AuthMethod"), "CHAP");
    send_pdu(&mut stream, 0x43, 0, 0, b"CHAP_A=5\0");
    let (_, data) = read_pdu(&mut stream);
    let id: u8 = key(&data, "CHAP_I").parse().expect("CHAP_I");
    let challenge = hex::decode(&key(&data, "CHAP_C")[2..]).expect("CHAP_C");
    let mut md5 = Md5::new();
    md5.update([id]);
    md5.update(secret.as_bytes());
    md5.update(&challenge);
    let response = hex::encode(md5.finalize());
    let answer = format!("CHAP_N={name}\0CHAP_R=0x{response}\0");
    // T, CSG security (0), NSG full feature (3).
    send_pdu(&mut stream, 0x43, 0x83, 0, answer.as_bytes());
    let (h, _) = read_pdu(&mut stream);
    assert_eq!((h[36], h[37]), (0, 0), "login accepted");
    assert_eq!(h[1] & 0x83, 0x83, "in full feature phase");
    stream
}

#[test]
fn an_open_iscsi_session_of_an_iso_boot_ends_when_its_token_dies() {
    let port = free_port();
    let (s, iso, _, _) = with_images_on(Server::start_with_args(
        &[],
        &["--iscsi-listen", &format!("127.0.0.1:{port}")],
    ));
    s.cli(&["host", "add", MAC]);
    s.cli(&["host", "boot-iso", MAC, "--image", &iso, "--via", "iscsi"]);
    let text = script(&s);
    let target = format!("iqn.2026-11.io.kagami:{iso}");
    let (name, secret) = (setting(&text, "username"), setting(&text, "password"));
    let mut stream = chap_login(port, &target, &name, &secret);
    // TEST UNIT READY: GOOD while the boot lasts.
    let tur = |stream: &mut TcpStream, sn: u32| send_pdu(stream, 0x01, 0x80, sn, &[]);
    tur(&mut stream, 1);
    let (h, _) = read_pdu(&mut stream);
    assert_eq!((h[0], h[3]), (0x21, 0), "a GOOD SCSI response");

    s.cli(&["host", "release", MAC]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    tur(&mut stream, 2);
    let mut buf = [0u8; 64];
    let got = stream.read(&mut buf);
    assert!(
        matches!(got, Ok(0)) || got.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the session went on after its token died"
    );
}
