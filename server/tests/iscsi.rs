//! The read-only iSCSI target against real clients: libiscsi's `iscsi-ls` (discovery, with and
//! without CHAP), `iscsi-inq` (standard and VPD pages), `iscsi-readcapacity16`, and `qemu-img
//! convert iscsi://…` (byte-identical copies); CHAP credentials derived from tokens, refused
//! when wrong; a write and hostile or broken sessions from a hand-made client. Needs
//! libiscsi-bin and qemu-utils with qemu-block-extra (scripts/test and scripts/lab-setup
//! install them).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BLOCK, Server, ok, qemu_img_copy, run, sparse_file};

const SEGMENT: u64 = 64 * BLOCK as u64;
const IQN: &str = "iqn.2026-11.io.kagami:";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A server with iSCSI on a free loopback port and one imported sparse image whose size is not
/// a multiple of 512: (server, port, image id, the imported file).
fn with_image() -> (Server, u16, String, PathBuf) {
    let port = free_port();
    let s = Server::start_with_args(&[], &["--iscsi-listen", &format!("127.0.0.1:{port}")]);
    let size = 2 * SEGMENT + 5 * BLOCK as u64 + 300;
    let disk = sparse_file(
        s.dir.path(),
        "d.raw",
        size,
        &[
            (0, 2 * BLOCK),
            (5 * BLOCK as u64 + 100, 3 * BLOCK),
            (SEGMENT + 7 * BLOCK as u64, 20 * BLOCK),
            (size - 500, 500),
        ],
        13,
    );
    let image = s.import(&disk, "iscsi");
    let id = image["id"].as_str().expect("id").to_string();
    (s, port, id, disk)
}

/// What `kagami image export-iscsi` printed: (URL, CHAP name, CHAP secret, libiscsi URL).
fn export(s: &Server, token: &str, id: &str) -> (String, String, String, String) {
    let out = s.cli_as(token, &["image", "export-iscsi", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    let after = |l: &str| l.rsplit(": ").next().expect("value").trim().to_string();
    (
        lines[0].to_string(),
        after(lines[1]),
        after(lines[2]),
        after(lines[3]),
    )
}

/// The file as the target serves it: padded with zeros to a multiple of 512.
fn padded(disk: &Path) -> Vec<u8> {
    let mut data = std::fs::read(disk).expect("read");
    data.resize(data.len().div_ceil(512) * 512, 0);
    data
}

#[test]
fn clients_discover_inquire_and_read_the_image() {
    let (s, port, id, disk) = with_image();
    let (url, name, secret, chap_url) = export(&s, &s.token, &id);
    assert_eq!(url, format!("iscsi://127.0.0.1:{port}/{IQN}{id}/0"));
    assert!(name.starts_with("kagami-"), "{name}");
    assert_eq!(
        chap_url,
        format!("iscsi://{name}%{secret}@127.0.0.1:{port}/{IQN}{id}/0")
    );
    assert!(!secret.contains(&s.token) && !s.token.contains(&secret));
    let exports = s.admin("GET", "/v1/exports", &[]).json();
    assert_eq!(exports["iscsi"], format!("127.0.0.1:{port}"), "{exports}");

    // Discovery with CHAP lists the target and its LUN; without, a private image is not there.
    let portal = format!("iscsi://{name}%{secret}@127.0.0.1:{port}");
    let listed = ok(Command::new("iscsi-ls").args(["-s", &portal]));
    let want = padded(&disk);
    assert!(
        listed.contains(&format!("Target:{IQN}{id} Portal:127.0.0.1:{port},1")),
        "{listed}"
    );
    assert!(
        listed.contains("Lun:0") && listed.contains("DIRECT_ACCESS"),
        "{listed}"
    );
    let anonymous = ok(Command::new("iscsi-ls").arg(format!("iscsi://127.0.0.1:{port}")));
    assert!(
        !anonymous.contains(&id),
        "a private image listed without CHAP: {anonymous}"
    );

    let inq = ok(Command::new("iscsi-inq").arg(&chap_url));
    assert!(
        inq.contains("Vendor:KAGAMI") && inq.contains("DIRECT_ACCESS"),
        "{inq}"
    );
    let pages = ok(Command::new("iscsi-inq").args(["-e", "1", &chap_url]));
    for page in [
        "UNIT_SERIAL_NUMBER",
        "DEVICE_IDENTIFICATION",
        "BLOCK_LIMITS",
    ] {
        assert!(pages.contains(page), "{pages}");
    }
    let serial = ok(Command::new("iscsi-inq").args(["-e", "1", "-c", "128", &chap_url]));
    assert!(serial.contains(&id.replace('-', "")), "{serial}");
    let ident = ok(Command::new("iscsi-inq").args(["-e", "1", "-c", "131", &chap_url]));
    assert!(ident.contains(&format!("{IQN}{id}")), "{ident}");

    let cap = ok(Command::new("iscsi-readcapacity16").arg(&chap_url));
    assert!(
        cap.contains(&format!("Total size:{}", want.len())),
        "padded to 512-byte blocks: {cap}"
    );
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");

    // Several whole copies at once, each byte-identical to the file (and its zero padding).
    let copies: Vec<_> = (0..3)
        .map(|i| {
            let out = s.dir.path().join(format!("copy{i}.raw"));
            let child = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &chap_url])
                .arg(&out)
                .spawn()
                .expect("qemu-img");
            (child, out)
        })
        .collect();
    for (mut child, out) in copies {
        assert!(child.wait().expect("wait").success());
        assert!(std::fs::read(&out).expect("copy") == want, "a copy differs");
    }
    // No secret in the log.
    let log = s.log_text();
    assert!(!log.contains(&s.token) && !log.contains(&secret));
}

#[test]
fn credentials_are_checked_and_public_images_need_none() {
    let (s, port, id, disk) = with_image();
    let (_, name, secret, chap_url) = export(&s, &s.token, &id);
    let wrong: String = secret.chars().rev().collect();
    let target = format!("127.0.0.1:{port}/{IQN}{id}/0");
    for (url, why) in [
        (format!("iscsi://{name}%{wrong}@{target}"), "a wrong secret"),
        (
            format!("iscsi://kagami-0000000000000000%{secret}@{target}"),
            "an unknown name",
        ),
        (format!("iscsi://{target}"), "no CHAP on a private image"),
    ] {
        let out = run(Command::new("iscsi-inq").arg(&url));
        assert!(!out.status.success(), "{why} was accepted");
    }
    // Another project's token has valid credentials, but not for this image: not found, and
    // discovery does not list it.
    let other = s.member_of("other");
    let out = s.cli_as(&other, &["image", "export-iscsi", &id]);
    assert!(!out.status.success(), "another project may not export it");
    let (o_name, o_secret) = chap_of(&s, &other);
    let out = run(Command::new("iscsi-inq").arg(format!("iscsi://{o_name}%{o_secret}@{target}")));
    assert!(!out.status.success());
    let listed =
        ok(Command::new("iscsi-ls").arg(format!("iscsi://{o_name}%{o_secret}@127.0.0.1:{port}")));
    assert!(!listed.contains(&id), "{listed}");
    // A revoked token's credentials stop working.
    let tokens = s.cli_json(&["token", "list"]);
    let other_id = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["project"] == "other")
        .and_then(|t| t["id"].as_str())
        .expect("token id")
        .to_string();
    s.cli(&["token", "revoke", &other_id]);
    let out =
        run(Command::new("iscsi-ls").arg(format!("iscsi://{o_name}%{o_secret}@127.0.0.1:{port}")));
    assert!(
        !out.status.success(),
        "a revoked token's CHAP still logs in"
    );

    // Made public, the image is listed and read without authentication.
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    let anonymous = ok(Command::new("iscsi-ls").arg(format!("iscsi://127.0.0.1:{port}")));
    assert!(anonymous.contains(&format!("{IQN}{id}")), "{anonymous}");
    let copy = s.dir.path().join("anon.raw");
    qemu_img_copy(&format!("iscsi://{target}"), &copy);
    assert!(std::fs::read(&copy).expect("copy") == padded(&disk));
    // CHAP still works for it.
    ok(Command::new("iscsi-inq").arg(&chap_url));
}

/// The CHAP credentials of `token` as the CLI derives them (through an image it may export).
fn chap_of(s: &Server, token: &str) -> (String, String) {
    let disk = sparse_file(s.dir.path(), "mine.raw", 1 << 20, &[(0, 4096)], 3);
    let out = s.cli_as(
        token,
        &[
            "image",
            "import",
            disk.to_str().expect("path"),
            "--name",
            "mine",
            "--output",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let (_, name, secret, _) = export(s, token, image["id"].as_str().expect("id"));
    (name, secret)
}

/// An initiator by hand, for what real clients never send.
struct Raw {
    stream: TcpStream,
    cmd_sn: u32,
    /// The StatSN the target's next status-carrying PDU will have (after login).
    stat_sn: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn bhs(opcode: u8, flags: u8, data_len: usize) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Raw {
            stream,
            cmd_sn: 1,
            stat_sn: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    fn pdu(&mut self, mut header: Vec<u8>, data: &[u8]) {
        header.extend_from_slice(data);
        header.resize(48 + data.len().div_ceil(4) * 4, 0);
        self.send(&header);
    }

    /// Reads one PDU: (header, data).
    fn read(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut h = vec![0u8; 48];
        self.stream.read_exact(&mut h).expect("read header");
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        self.stream.read_exact(&mut data).expect("read data");
        data.truncate(len);
        (h, data)
    }

    /// Whether the server closes the connection within the timeout (answers before are fine).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Logs in without authentication, straight to the full feature phase, to `target`.
    fn login(port: u16, target: &str) -> Raw {
        let mut raw = Raw::connect(port);
        let text = format!(
            "InitiatorName=iqn.2026-11.test:raw\0SessionType=Normal\0TargetName={target}\0AuthMethod=None\0"
        );
        let mut h = bhs(0x43, 0x80 | 3, text.len());
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        raw.pdu(h, text.as_bytes());
        let (r, _) = raw.read();
        assert_eq!(r[0], 0x23, "a login response");
        assert_eq!((r[36], r[37]), (0, 0), "login accepted");
        assert_eq!(r[1] & 0x83, 0x83, "in full feature phase");
        raw.stat_sn = be32(&r, 24) + 1;
        raw
    }

    /// Logs in to a discovery session without authentication.
    fn discover(port: u16) -> Raw {
        let mut raw = Raw::connect(port);
        let text = "InitiatorName=iqn.2026-11.test:disc\0SessionType=Discovery\0AuthMethod=None\0";
        let mut h = bhs(0x43, 0x80 | 3, text.len());
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 2]);
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        raw.pdu(h, text.as_bytes());
        let (r, _) = raw.read();
        assert_eq!(
            (r[0], r[36], r[37]),
            (0x23, 0, 0),
            "discovery login accepted"
        );
        raw
    }

    /// Reads a command's Data-In PDUs up to the one with GOOD status; returns their data.
    fn data_in(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let (h, data) = self.read();
            assert_eq!(h[0], 0x25, "Data-In");
            got.extend_from_slice(&data);
            if h[1] & 0x01 != 0 {
                assert_eq!(h[3], 0, "GOOD");
                return got;
            }
        }
    }

    /// A SCSI command with `cdb` and immediate `data`; returns the response PDU.
    fn command(&mut self, itt: u32, flags: u8, cdb: &[u8], expected: u32, data: &[u8]) {
        let mut h = bhs(0x01, 0x80 | flags, data.len());
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&expected.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn += 1;
        self.pdu(h, data);
    }

    /// Reads a SCSI response: (status, sense key, ASC).
    fn check(&mut self, itt: u32) -> (u8, u8, u8) {
        let (h, data) = self.read();
        assert_eq!(h[0], 0x21, "a SCSI response");
        assert_eq!(u32::from_be_bytes(h[16..20].try_into().expect("4")), itt);
        let sense = &data[2..];
        (h[3], sense[2] & 0x0f, sense[12])
    }
}

#[test]
fn writes_are_refused_and_broken_sessions_end_cleanly() {
    let (s, port, id, disk) = with_image();
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    let target = format!("{IQN}{id}");

    // WRITE (10) of one block with its data: CHECK CONDITION, DATA PROTECT / WRITE PROTECTED.
    let mut raw = Raw::login(port, &target);
    raw.command(
        1,
        0x20,
        &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        512,
        &[0x55; 512],
    );
    assert_eq!(raw.check(1), (0x02, 0x07, 0x27));
    // An unknown opcode: ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    raw.command(2, 0, &[0xc5], 0, &[]);
    assert_eq!(raw.check(2), (0x02, 0x05, 0x20));
    // A read past the end: ILLEGAL REQUEST / LBA OUT OF RANGE.
    raw.command(3, 0x40, &[0x28, 0, 0xff, 0, 0, 0, 0, 0, 1, 0], 512, &[]);
    assert_eq!(raw.check(3), (0x02, 0x05, 0x21));
    // A good READ (10) of the first 8 blocks, in Data-In PDUs with the status in the last.
    raw.command(4, 0x40, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096, &[]);
    let got = raw.data_in();
    assert_eq!(got, std::fs::read(&disk).expect("read")[..4096]);
    // A NOP-Out ping is answered with its data.
    let mut h = bhs(0x40, 0x80, 4);
    h[16..20].copy_from_slice(&9u32.to_be_bytes());
    h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    raw.pdu(h, b"ping");
    let (h, data) = raw.read();
    assert_eq!((h[0], data.as_slice()), (0x20, &b"ping"[..]));
    // Garbage: a target's opcode from the initiator closes the connection.
    raw.send(&[0x25; 48]);
    assert!(raw.closed(), "garbage header");

    // Not a login first; a data segment past the limit; a truncated PDU; HTTP.
    let mut raw = Raw::connect(port);
    raw.pdu(bhs(0x01, 0x80, 0), &[]);
    assert!(raw.closed(), "a command before login");
    let mut raw = Raw::connect(port);
    let mut h = bhs(0x43, 0x83, 0);
    h[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    raw.send(&h);
    assert!(raw.closed(), "16 MiB of login text");
    let mut raw = Raw::connect(port);
    raw.send(&bhs(0x43, 0x83, 100)[..30]);
    drop(raw);
    let mut raw = Raw::connect(port);
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n");
    assert!(raw.closed(), "HTTP");
    // A login to a target that does not exist: "not found", then closed.
    let mut raw = Raw::connect(port);
    let text =
        format!("InitiatorName=iqn.x\0TargetName={IQN}00000000-0000-4000-8000-000000000000\0");
    let h = bhs(0x43, 0x80 | 3, text.len());
    raw.pdu(h, text.as_bytes());
    let (r, _) = raw.read();
    assert_eq!((r[36], r[37]), (2, 3), "target not found");
    assert!(raw.closed());

    // Still serving, correctly.
    let copy = s.dir.path().join("after.raw");
    qemu_img_copy(&format!("iscsi://127.0.0.1:{port}/{target}/0"), &copy);
    assert!(std::fs::read(&copy).expect("copy") == padded(&disk));
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

#[test]
fn the_cli_says_when_iscsi_is_off() {
    common::cli_says_when_off("export-iscsi", "--iscsi-listen");
}

#[test]
fn open_sessions_are_listed_to_those_who_may_see_them() {
    let (s, port, id, disk) = with_image();
    let other = s.member_of("other");
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    let target = format!("{IQN}{id}");

    // An anonymous normal session that reads 8 blocks and stays open, and a discovery session.
    let mut raw = Raw::login(port, &target);
    let peer = raw.stream.local_addr().expect("local addr").to_string();
    raw.command(4, 0x40, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096, &[]);
    let got = raw.data_in();
    assert_eq!(got, std::fs::read(&disk).expect("read")[..4096]);
    let discovery = Raw::discover(port);
    let listed = s.sessions_until("both sessions are listed", |l| {
        l.len() == 2 && l[0]["bytes_read"] == 4096
    });
    let (normal, disc) = (&listed[0], &listed[1]);
    assert_eq!(normal["protocol"], "iscsi", "{normal}");
    assert_eq!(normal["peer"], peer.as_str(), "{normal}");
    assert_eq!(normal["image"], id.as_str(), "{normal}");
    assert_eq!(normal["who"], serde_json::json!({"kind": "anonymous"}));
    assert_eq!(normal["initiator"], "iqn.2026-11.test:raw", "{normal}");
    assert_eq!(normal["commands"], 1, "{normal}");
    assert_eq!(
        disc["peer"],
        discovery.stream.local_addr().expect("addr").to_string()
    );
    assert!(disc["image"].is_null(), "a discovery session: {disc}");
    assert_eq!(
        (disc["bytes_read"].as_u64(), disc["commands"].as_u64()),
        (Some(0), Some(0))
    );

    // Anonymous sessions belong to no project: another project's member sees neither.
    assert_eq!(s.sessions(&other), Vec::<serde_json::Value>::new());
    let table = s.cli(&["export", "list"]);
    assert!(
        table.contains(&format!("iscsi\t{peer}\t{id}\tanonymous\t")),
        "{table}"
    );
    assert!(table.contains("\t(discovery)\tanonymous\t"), "{table}");

    // A session that logs out and one whose initiator hangs up both leave the list.
    drop(discovery);
    let mut h = bhs(0x46, 0x80, 0);
    h[16..20].copy_from_slice(&77u32.to_be_bytes());
    raw.pdu(h, &[]);
    let (r, _) = raw.read();
    assert_eq!(r[0], 0x26, "a logout response");
    s.sessions_until("both sessions are gone", |l| l.is_empty());

    // A session with CHAP credentials is its token's: its project sees it, others do not.
    s.cli(&["image", "update", &id, "--visibility", "private"]);
    let (o_name, o_secret) = chap_of(&s, &other);
    let mine = s.cli_as(
        &other,
        &["image", "list", "--name", "mine", "--output", "json"],
    );
    let mine: serde_json::Value = serde_json::from_slice(&mine.stdout).expect("json");
    let mine_id = mine[0]["id"].as_str().expect("id").to_string();
    let mut reader = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read 0 4096",
            "-c",
            "sleep 3000",
            &format!("iscsi://{o_name}%{o_secret}@127.0.0.1:{port}/{IQN}{mine_id}/0"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let listed = s.sessions_until("the CHAP session is listed", |l| l.len() == 1);
    assert_eq!(
        listed[0]["who"],
        serde_json::json!({"kind": "token", "project": "other", "role": "member"})
    );
    assert_eq!(listed[0]["image"], mine_id.as_str());
    assert_eq!(s.sessions(&other).len(), 1);
    let third = s.member_of("third");
    assert_eq!(s.sessions(&third), Vec::<serde_json::Value>::new());
    let _ = reader.kill();
    let _ = reader.wait();
    s.sessions_until("the CHAP session is gone", |l| l.is_empty());
}

/// A server whose iSCSI target pings after 1 s of silence and waits 2 s for an answer.
fn pinging() -> (Server, u16, String, PathBuf) {
    let port = free_port();
    let s = Server::start_with_args(
        &[
            ("KAGAMI__ISCSI__NOP_INTERVAL_SECS", "1"),
            ("KAGAMI__ISCSI__NOP_TIMEOUT_SECS", "2"),
            ("KAGAMI_LOG", "info,kagami::stream::iscsi=debug"),
        ],
        &["--iscsi-listen", &format!("127.0.0.1:{port}")],
    );
    let disk = sparse_file(s.dir.path(), "p.raw", 4 << 20, &[(0, 2 * BLOCK)], 5);
    let image = s.import(&disk, "pinged");
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    (s, port, id, disk)
}

impl Raw {
    /// Waits for a NOP-In ping and checks its fields (RFC 7143 §11.19): F set, no data, ITT
    /// reserved, a TTT of the target's, LUN 0, and the next StatSN, which it does not advance.
    /// Returns its header and how long it took to come.
    fn ping(&mut self) -> (Vec<u8>, Duration) {
        let waited = Instant::now();
        let (h, data) = self.read();
        let took = waited.elapsed();
        assert_eq!((h[0], h[1]), (0x20, 0x80), "a NOP-In: {h:02x?}");
        assert!(data.is_empty());
        assert_eq!(be32(&h, 16), u32::MAX, "ITT reserved");
        assert_ne!(be32(&h, 20), u32::MAX, "a TTT to echo");
        assert_eq!(&h[8..16], &[0; 8], "LUN 0");
        assert_eq!(be32(&h, 24), self.stat_sn, "StatSN: the next, not advanced");
        assert_eq!(be32(&h, 28), self.cmd_sn, "ExpCmdSN");
        (h, took)
    }

    /// The NOP-Out answering ping `h`: immediate, ITT reserved, its TTT and LUN echoed.
    fn answer(&mut self, h: &[u8]) {
        let mut out = bhs(0x40, 0x80, 0);
        out[8..16].copy_from_slice(&h[8..16]);
        out[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        out[20..24].copy_from_slice(&h[20..24]);
        out[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        out[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
        self.pdu(out, &[]);
    }
}

#[test]
fn silent_sessions_are_pinged_and_closed_when_they_do_not_answer() {
    let (s, port, id, disk) = pinging();
    let target = format!("{IQN}{id}");
    let mut raw = Raw::login(port, &target);
    s.sessions_until("the session is listed", |l| l.len() == 1);

    // Idle: pinged after about a second; answered, it stays open and is pinged again with a
    // new tag; the pings never advance StatSN.
    let (first, took) = raw.ping();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "{took:?}"
    );
    raw.answer(&first);
    let (second, _) = raw.ping();
    assert_ne!(be32(&first, 20), be32(&second, 20), "a new tag per ping");
    raw.answer(&second);
    // Commands go on as before; the response carries the StatSN the pings did not use.
    raw.command(1, 0x40, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096, &[]);
    assert_eq!(
        raw.data_in(),
        std::fs::read(&disk).expect("read")[..4096],
        "a read after the pings"
    );
    raw.stat_sn += 1;
    let (third, _) = raw.ping();
    raw.answer(&third);
    assert_eq!(s.sessions(&s.token).len(), 1, "answered: still open");

    // A ping left unanswered: the connection closes within the 2 s timeout (plus slack), and
    // the session is gone.
    raw.ping();
    let waited = Instant::now();
    assert!(raw.closed(), "an unanswered ping closes the connection");
    let took = waited.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    s.sessions_until("the silent session is gone", |l| l.is_empty());
    let log = s.log_text();
    assert!(log.contains("no answer to NOP-In ping"), "{log}");

    // libiscsi answers the pings: qemu-io reads, sleeps through several intervals, reads again.
    let url = format!("iscsi://127.0.0.1:{port}/{target}/0");
    let answered = log.matches("answered").count();
    let out = ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0 131072 65536",
        "-c",
        "sleep 4000",
        "-c",
        "read -P 0 1048576 65536",
        &url,
    ]));
    assert_eq!(out.matches("read 65536/65536 bytes").count(), 2, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(
        s.log_text().matches("answered").count() > answered,
        "libiscsi answered no ping: {}",
        s.log_text()
    );
    // And a whole copy with qemu-img is unaffected.
    let copy = s.dir.path().join("pinged.raw");
    qemu_img_copy(&url, &copy);
    assert!(std::fs::read(&copy).expect("copy") == padded(&disk));
}

impl Raw {
    /// One Login Request of a login in the operational stage: `flags` beyond CSG 1 (T, C, NSG)
    /// and its part of the text; returns the response.
    fn login_part(&mut self, flags: u8, text: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut h = bhs(0x43, 0x04 | flags, text.len());
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 3]);
        h[16..20].copy_from_slice(&5u32.to_be_bytes());
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        self.pdu(h, text);
        let (r, data) = self.read();
        assert_eq!(r[0], 0x23, "a login response");
        (r, data)
    }

    /// One Text Request (`flags`: F, C) with `ttt`; returns the response.
    fn text(&mut self, itt: u32, flags: u8, ttt: u32, text: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut h = bhs(0x04, flags, text.len());
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&ttt.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        h[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
        self.cmd_sn += 1;
        self.pdu(h, text);
        let (r, data) = self.read();
        assert_eq!(r[0], 0x24, "a text response: {r:02x?}");
        assert_eq!(be32(&r, 16), itt);
        assert_eq!(be32(&r, 24), self.stat_sn, "StatSN");
        self.stat_sn += 1;
        (r, data)
    }
}

/// `key=value` pairs of text.
fn pairs(text: &[u8]) -> Vec<(String, String)> {
    text.split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let p = String::from_utf8_lossy(p);
            let (k, v) = p.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn login_and_text_split_over_several_pdus() {
    let (s, port, id, _) = with_image();
    // Enough public targets that SendTargets needs several 512-byte PDUs.
    let mut ids = vec![id.clone()];
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    for i in 0..6 {
        let disk = sparse_file(s.dir.path(), &format!("t{i}.raw"), 1 << 20, &[(0, 4096)], i);
        let image = s.import(&disk, &format!("t{i}"));
        let other = image["id"].as_str().expect("id").to_string();
        s.cli(&["image", "update", &other, "--visibility", "public"]);
        ids.push(other);
    }

    // A discovery login whose text comes in three parts, pairs cut across them: each part but
    // the last gets an empty response (neither T nor C, success), StatSN counting up.
    let text = b"InitiatorName=iqn.2026-11.test:split\0SessionType=Discovery\0\
                 MaxRecvDataSegmentLength=512\0";
    let mut raw = Raw::connect(port);
    for (i, part) in [&text[..10], &text[10..40]].into_iter().enumerate() {
        let (r, data) = raw.login_part(0x40, part);
        assert_eq!(r[1], 0x04, "no T, no C, CSG 1: {r:02x?}");
        assert!(data.is_empty(), "an empty response");
        assert_eq!((r[36], r[37]), (0, 0), "success");
        assert_eq!(be32(&r, 24), i as u32, "StatSN");
    }
    let (r, data) = raw.login_part(0x80 | 3, &text[40..]);
    assert_eq!((r[36], r[37]), (0, 0), "login accepted");
    assert_eq!(r[1], 0x80 | 0x04 | 3, "T, to full feature");
    assert_eq!(be32(&r, 24), 2, "StatSN");
    assert!(
        pairs(&data)
            .iter()
            .any(|(k, _)| k == "MaxRecvDataSegmentLength"),
        "negotiated once whole: {:?}",
        pairs(&data)
    );
    raw.stat_sn = 3;
    raw.cmd_sn = 1;

    // SendTargets=All split over two Text Requests: the first gets an empty response with a
    // tag (neither F nor C), the second echoes it. The answer, past 512 bytes, comes in parts
    // with C set, each asked for with an empty request carrying the target's tag.
    let (r, data) = raw.text(1, 0x40, u32::MAX, b"SendTarg");
    assert_eq!(r[1], 0, "neither F nor C");
    assert!(data.is_empty());
    let tag = be32(&r, 20);
    assert_ne!(tag, u32::MAX, "a tag to echo");
    let (mut r, mut answer) = raw.text(1, 0x80, tag, b"ets=All\0");
    let mut parts = 1;
    while r[1] & 0x80 == 0 {
        assert_eq!(r[1], 0x40, "C until the last part");
        assert!(answer.len().is_multiple_of(512), "full 512-byte parts");
        let tag = be32(&r, 20);
        assert_ne!(tag, u32::MAX);
        let (next, data) = raw.text(2, 0x80, tag, b"");
        answer.extend_from_slice(&data);
        r = next;
        parts += 1;
        assert!(parts < 100, "the answer never ends");
    }
    assert_eq!(be32(&r, 20), u32::MAX, "the last part: F, reserved tag");
    assert!(parts >= 2, "split: {parts} part(s)");
    let names: Vec<String> = pairs(&answer)
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect();
    for id in &ids {
        assert!(
            names.contains(&format!("{IQN}{id}")),
            "{id} not in {names:?}"
        );
    }
    assert_eq!(names.len(), ids.len(), "{names:?}");

    // A continuation with a tag the target did not give is rejected; the session goes on.
    let mut h = bhs(0x04, 0x80, 0);
    h[16..20].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&0x1234u32.to_be_bytes());
    h[24..28].copy_from_slice(&raw.cmd_sn.to_be_bytes());
    raw.cmd_sn += 1;
    raw.pdu(h, &[]);
    let (r, _) = raw.read();
    assert_eq!((r[0], r[2]), (0x3f, 0x04), "Reject, protocol error");
    raw.stat_sn += 1;
    let (r, data) = raw.text(
        4,
        0x80,
        u32::MAX,
        format!("SendTargets={IQN}{id}\0").as_bytes(),
    );
    assert_eq!(r[1], 0x80);
    assert!(pairs(&data).contains(&("TargetName".into(), format!("{IQN}{id}"))));

    // Login text past the 64 KiB budget: an initiator error, then closed.
    let mut raw = Raw::connect(port);
    let filler = format!("X-kagami-filler={}\0", "f".repeat(8000)).repeat(5);
    let (r, _) = raw.login_part(0x40, filler.as_bytes());
    assert_eq!((r[36], r[37]), (0, 0), "the first 40 KB are fine");
    let (r, _) = raw.login_part(0x40, filler.as_bytes());
    assert_eq!((r[36], r[37]), (2, 0), "initiator error");
    assert!(raw.closed());
    assert!(
        s.log_text().contains("longer than 65536 bytes"),
        "{}",
        s.log_text()
    );
    // C and T together: an initiator error too.
    let mut raw = Raw::connect(port);
    let (r, _) = raw.login_part(0xc0 | 3, text);
    assert_eq!((r[36], r[37]), (2, 0));
    assert!(raw.closed());
}

/// A read whose answer is still being delivered is not idle: an initiator taking its Data-In
/// slowly (it cannot see a ping queued behind them) is neither pinged nor closed while the
/// target's writes go on, however long they take.
#[test]
fn slow_readers_of_long_answers_are_not_closed() {
    let port = free_port();
    let s = Server::start_with_args(
        &[
            ("KAGAMI__ISCSI__NOP_INTERVAL_SECS", "1"),
            ("KAGAMI__ISCSI__NOP_TIMEOUT_SECS", "3"),
        ],
        &["--iscsi-listen", &format!("127.0.0.1:{port}")],
    );
    let size = 32u64 << 20;
    let disk = sparse_file(
        s.dir.path(),
        "slow.raw",
        size,
        &[
            (0, 4 * BLOCK),
            ((20 << 20) + 777, 3 * BLOCK),
            (size - 4096, 4096),
        ],
        9,
    );
    let image = s.import(&disk, "slow");
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["image", "update", &id, "--visibility", "public"]);
    let mut raw = Raw::login(port, &format!("{IQN}{id}"));
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Four reads of 8 MiB (the whole connection budget), taken at about 4 MiB/s: the target has
    // them all read at once and spends seconds writing them.
    let blocks = 16384u32;
    for itt in 0..4u32 {
        let lba = itt * blocks;
        let mut cdb = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        raw.command(itt + 1, 0x40, &cdb, blocks * 512, &[]);
    }
    let want = std::fs::read(&disk).expect("read");
    let mut got = vec![Vec::new(); 4];
    let mut done = 0;
    let started = Instant::now();
    while done < 4 {
        let mut h = vec![0u8; 48];
        if let Err(e) = raw.stream.read_exact(&mut h) {
            panic!(
                "the connection ended after {:?} with {done} reads done: {e}",
                started.elapsed()
            );
        }
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        raw.stream.read_exact(&mut data).expect("read data");
        data.truncate(len);
        match h[0] {
            0x20 => raw.answer(&h),
            0x25 => {
                let itt = be32(&h, 16) as usize - 1;
                got[itt].extend_from_slice(&data);
                if h[1] & 0x01 != 0 {
                    assert_eq!(h[3], 0, "GOOD");
                    raw.stat_sn = be32(&h, 24) + 1;
                    done += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            other => panic!("unexpected PDU {other:#x}"),
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "slow enough to outlast a ping's interval and timeout: {:?}",
        started.elapsed()
    );
    for (i, part) in got.iter().enumerate() {
        assert!(part[..] == want[i << 23..(i + 1) << 23], "read {i}");
    }
    // Idle now: pinged, answered, still open.
    let (ping, _) = raw.ping();
    raw.answer(&ping);
    assert_eq!(s.sessions(&s.token).len(), 1, "still open");
}
