//! The read-only NBD export against real clients: `nbdinfo` (size, `--map` holes), `nbdcopy`
//! and `qemu-img convert` (byte-identical copies), export names that carry a token, and hostile
//! or broken sessions that must not take the server down. Needs libnbd-bin and qemu-utils
//! (scripts/test installs them).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{BLOCK, Server, ok, qemu_img_copy, run, same_bytes, sparse_file};

const SEGMENT: u64 = 64 * BLOCK as u64;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A server with NBD on a free loopback port and one imported sparse image:
/// (server, NBD port, image id, the imported file).
fn with_image() -> (Server, u16, String, std::path::PathBuf) {
    let port = free_port();
    let s = Server::start_with_args(&[], &["--nbd-listen", &format!("127.0.0.1:{port}")]);
    // Data at the start, an unaligned run across blocks, a whole hole segment, data at the
    // end of a short last block. (A multiple of 512: qemu rounds a disk's size up to one.)
    let size = 3 * SEGMENT + 5 * BLOCK as u64 + 4096;
    let disk = sparse_file(
        s.dir.path(),
        "d.raw",
        size,
        &[
            (0, 2 * BLOCK),
            (5 * BLOCK as u64 + 100, 3 * BLOCK),
            (2 * SEGMENT + 7 * BLOCK as u64, 20 * BLOCK),
            (size - 500, 500),
        ],
        11,
    );
    let image = s.import(&disk, "nbd");
    let id = image["id"].as_str().expect("id").to_string();
    (s, port, id, disk)
}

/// The file's allocation at 64 KiB granularity as nbdinfo prints it: (offset, length, type).
fn expected_map(path: &Path) -> Vec<(u64, u64, u32)> {
    let data = std::fs::read(path).expect("read");
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (i, chunk) in data.chunks(BLOCK).enumerate() {
        let kind = if chunk.iter().all(|&b| b == 0) { 3 } else { 0 };
        match out.last_mut() {
            Some((_, len, k)) if *k == kind => *len += chunk.len() as u64,
            _ => out.push(((i * BLOCK) as u64, chunk.len() as u64, kind)),
        }
    }
    out
}

#[test]
fn clients_read_the_image_and_its_holes() {
    let (s, port, id, disk) = with_image();
    let url = s.cli(&["image", "export-nbd", &id]).trim().to_string();
    assert_eq!(url, format!("nbd://127.0.0.1:{port}/{id}/{}", s.token));

    let info: serde_json::Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &url])))
            .expect("nbdinfo json");
    let export = &info["exports"][0];
    let size = std::fs::metadata(&disk).expect("size").len();
    assert_eq!(export["export-size"].as_u64(), Some(size), "{info}");
    assert_eq!(export["is_read_only"].as_bool(), Some(true), "{info}");
    assert_eq!(export["can_multi_conn"].as_bool(), Some(true), "{info}");

    let map = ok(Command::new("nbdinfo").args(["--map", &url]));
    let got: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind = f[2].parse().expect("type");
            assert_eq!(f[3], if kind == 3 { "hole,zero" } else { "data" }, "{l}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                kind,
            )
        })
        .collect();
    assert_eq!(got, expected_map(&disk), "nbdinfo --map:\n{map}");

    let copy = s.dir.path().join("nbdcopy.raw");
    ok(Command::new("nbdcopy").arg(&url).arg(&copy));
    assert!(same_bytes(&disk, &copy), "nbdcopy's copy differs");

    let converted = s.dir.path().join("qemu.raw");
    qemu_img_copy(&url, &converted);
    assert!(same_bytes(&disk, &converted), "qemu-img's copy differs");

    // Several clients at once, each with several connections (multi-conn).
    let copies: Vec<_> = (0..3)
        .map(|i| {
            let out = s.dir.path().join(format!("para{i}.raw"));
            let child = Command::new("nbdcopy")
                .args(["--connections=4", &url])
                .arg(&out)
                .spawn()
                .expect("nbdcopy");
            (child, out)
        })
        .collect();
    for (mut child, out) in copies {
        assert!(child.wait().expect("wait").success());
        assert!(same_bytes(&disk, &out), "a concurrent copy differs");
    }
    // Not a secret anywhere in the log.
    assert!(!s.log_text().contains(&s.token));
}

#[test]
fn export_names_without_a_good_token_are_refused() {
    let (s, port, id, _) = with_image();
    let base = format!("nbd://127.0.0.1:{port}");
    let member = s.member_of("other");
    for (name, why) in [
        (format!("{id}/kgm_wrong"), "a wrong token"),
        (id.clone(), "no token"),
        (format!("{id}/"), "an empty token"),
        (format!("{id}/{member}"), "another project's token"),
        (format!("not-an-id/{}", s.token), "not an image id"),
        (format!("{}/{}", uuid_like(), s.token), "a missing image"),
    ] {
        let out = run(Command::new("nbdinfo").arg(format!("{base}/{name}")));
        assert!(!out.status.success(), "{why} was accepted");
    }
    // The old-style EXPORT_NAME option is refused by closing, as the protocol says.
    let out = run(Command::new("qemu-img").args([
        "info",
        "-f",
        "raw",
        &format!("{base}/{id}/kgm_wrong"),
    ]));
    assert!(!out.status.success());
    // Listing names nothing: every export name carries a token.
    let list = ok(Command::new("nbdinfo").args(["--list", "--json", &base]));
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list["exports"].as_array().map(Vec::len), Some(0), "{list}");
    // The server is still serving.
    let url = s.cli(&["image", "export-nbd", &id]).trim().to_string();
    ok(Command::new("nbdinfo").args(["--size", &url]));
}

fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}

/// A client speaking the protocol by hand, for what real clients never send.
struct Raw(TcpStream);

impl Raw {
    fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut raw = Raw(stream);
        let greeting = raw.read(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        raw
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.0.read_exact(&mut buf).expect("read");
        buf
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).expect("write");
    }

    /// Whether the server closes the connection (rather than answering) within the timeout.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // an error reply before the close is fine
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = b"IHAVEOPT".to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    /// Reads option replies until one that is not NBD_REP_INFO; returns its type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let h = self.read(20);
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
            self.read(len as usize);
            if kind != 3 {
                return kind;
            }
        }
    }

    /// Fixed newstyle, no zeroes, simple replies, OPT_GO on `name`.
    fn go(port: u16, name: &str) -> Raw {
        let mut raw = Raw::connect(port);
        raw.send(&3u32.to_be_bytes());
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        raw.option(7, &data);
        assert_eq!(raw.final_reply(), 1, "GO is acknowledged");
        raw
    }

    fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        self.send(&out);
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.read(16);
        assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().expect("4")),
            u64::from_be_bytes(r[8..16].try_into().expect("8")),
        )
    }
}

#[test]
fn garbage_and_broken_sessions_end_cleanly_and_the_server_keeps_serving() {
    let (s, port, id, disk) = with_image();
    let name = format!("{id}/{}", s.token);

    // Garbage instead of client flags; unknown client flags; a bad option magic.
    let mut raw = Raw::connect(port);
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(raw.closed(), "garbage flags");
    let mut raw = Raw::connect(port);
    raw.send(&0x8000_0001u32.to_be_bytes());
    assert!(raw.closed(), "unknown flags");
    let mut raw = Raw::connect(port);
    raw.send(&1u32.to_be_bytes());
    raw.send(&[0xAAu8; 64]);
    assert!(raw.closed(), "bad option magic");

    // Truncated: half an option header, then hang up; a huge option length.
    let mut raw = Raw::connect(port);
    raw.send(&1u32.to_be_bytes());
    raw.send(b"IHAVEOPT\0\0");
    drop(raw);
    let mut raw = Raw::connect(port);
    raw.send(&1u32.to_be_bytes());
    raw.send(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff");
    let h = raw.read(20);
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().expect("4")),
        (1 << 31) + 9,
        "ERR_TOO_BIG"
    );
    assert!(raw.closed(), "an option too big to read ends the session");

    // A malformed GO (its name length runs past the option) is ERR_INVALID; then LIST and an
    // unknown option are answered and the session goes on to a good GO.
    let mut raw = Raw::connect(port);
    raw.send(&1u32.to_be_bytes());
    raw.option(7, &[0, 0, 0, 200, b'x']);
    assert_eq!(raw.final_reply(), (1 << 31) + 3, "ERR_INVALID");
    raw.option(3, &[]);
    assert_eq!(raw.final_reply(), 1, "LIST: ACK, no exports");
    raw.option(77, b"??");
    assert_eq!(raw.final_reply(), (1 << 31) + 1, "ERR_UNSUP");
    raw.option(7, &{
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&[0, 0]);
        d
    });
    assert_eq!(raw.final_reply(), 1);
    // BLOCK_STATUS without structured replies and a context: EINVAL.
    raw.request(0, 7, 5, 0, 4096);
    assert_eq!(raw.simple_reply(), (22, 5));
    drop(raw);

    // Transmission: a write (its payload drained) is EPERM, an unknown command and a read
    // past the end EINVAL; then a good read; then a request with a bad magic closes.
    let size = std::fs::metadata(&disk).expect("size").len();
    let mut raw = Raw::go(port, &name);
    raw.request(0, 1, 1, 0, 4096);
    raw.send(&[0x55u8; 4096]);
    assert_eq!(raw.simple_reply(), (1, 1), "write: EPERM");
    raw.request(0, 4, 2, 0, 4096);
    assert_eq!(raw.simple_reply(), (1, 2), "trim: EPERM");
    raw.request(0, 99, 3, 0, 1);
    assert_eq!(raw.simple_reply(), (22, 3), "unknown command: EINVAL");
    raw.request(0, 0, 4, size - 10, 11);
    assert_eq!(raw.simple_reply(), (22, 4), "past the end: EINVAL");
    raw.request(0, 0, 6, BLOCK as u64 - 7, 100);
    assert_eq!(raw.simple_reply(), (0, 6));
    let want = std::fs::read(&disk).expect("read");
    assert_eq!(raw.read(100), &want[BLOCK - 7..BLOCK + 93]);
    raw.send(&[0u8; 28]);
    assert!(raw.closed(), "bad request magic");

    // Truncated request, and a write whose payload never comes.
    let mut raw = Raw::go(port, &name);
    raw.send(&0x2560_9513u32.to_be_bytes());
    drop(raw);
    let mut raw = Raw::go(port, &name);
    raw.request(0, 1, 9, 0, 1 << 20);
    raw.send(&[1, 2, 3]);
    drop(raw);
    // A write larger than any request closes the connection rather than draining 4 GiB.
    let mut raw = Raw::go(port, &name);
    raw.request(0, 1, 9, 0, u32::MAX);
    assert!(raw.closed());

    // Still serving, correctly.
    let url = format!("nbd://127.0.0.1:{port}/{name}");
    let copy = s.dir.path().join("after.raw");
    ok(Command::new("nbdcopy").arg(&url).arg(&copy));
    assert!(same_bytes(&disk, &copy));
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

#[test]
fn the_cli_says_when_nbd_is_off() {
    common::cli_says_when_off("export-nbd", "--nbd-listen");
}

#[test]
fn open_connections_are_listed_to_those_who_may_see_them() {
    let (s, port, id, disk) = with_image();
    let team = s.member_of("team");
    let other = s.member_of("other");
    s.cli(&["image", "update", &id, "--visibility", "public"]);

    // A connection opened with team's token, which reads 4096 bytes and stays open.
    let mut raw = Raw::go(port, &format!("{id}/{team}"));
    let peer = raw.0.local_addr().expect("local addr").to_string();
    raw.request(0, 0, 1, BLOCK as u64 - 7, 4096);
    assert_eq!(raw.simple_reply(), (0, 1));
    let want = std::fs::read(&disk).expect("read");
    assert_eq!(raw.read(4096), &want[BLOCK - 7..BLOCK - 7 + 4096]);
    let listed = s.sessions_until("the connection is listed with its read", |l| {
        l.len() == 1 && l[0]["bytes_read"] == 4096
    });
    let session = &listed[0];
    assert_eq!(session["protocol"], "nbd", "{session}");
    assert_eq!(session["peer"], peer.as_str(), "{session}");
    assert_eq!(session["image"], id.as_str(), "{session}");
    assert_eq!(
        session["who"],
        serde_json::json!({"kind": "token", "project": "team", "role": "member"})
    );
    assert_eq!(session["commands"], 1, "{session}");
    assert!(session.get("initiator").is_none(), "{session}");
    assert!(
        session["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{session}"
    );
    // The token itself is never shown.
    assert!(!session.to_string().contains(&team));

    // Its project sees it; another project does not; the CLI prints it.
    assert_eq!(s.sessions(&team).len(), 1);
    assert_eq!(s.sessions(&other), Vec::<serde_json::Value>::new());
    let table = s.cli(&["export", "list"]);
    assert!(
        table.contains(&format!("nbd\t{peer}\t{id}\tteam/member\t")),
        "{table}"
    );
    assert!(table.contains("4.0 KiB read\t1 commands"), "{table}");
    let out = s.cli_as(&other, &["export", "list", "--output", "json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    // Gone once the client hangs up.
    drop(raw);
    s.sessions_until("the connection is gone", |l| l.is_empty());
}
