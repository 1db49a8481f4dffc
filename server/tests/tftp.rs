//! The TFTP server, black box: the real `kagami serve` with `--tftp-listen` and `--boot-dir`,
//! driven by real clients (curl, atftp, tftp-hpa) and by a raw UDP socket for what clients
//! never send: traversal names, malformed packets, lost and duplicate ACKs.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Server, noise, same_bytes, write_file};
use kagami_images::fuzzing::Rng;

const SMALL: usize = 1000;

struct Lab {
    server: Server,
    port: u16,
    _tmp: tempfile::TempDir,
    boot: PathBuf,
    out: PathBuf,
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A boot directory with files of telling sizes and symlinks in and out, and a server on it.
fn lab(env: &[(&str, &str)]) -> Lab {
    let tmp = tempfile::tempdir().expect("tmp");
    let boot = tmp.path().join("boot");
    let outside = tmp.path().join("outside");
    let out = tmp.path().join("out");
    for d in [&boot, &outside, &out, &boot.join("sub")] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    write_file(&boot.join("small.bin"), &noise(1, SMALL));
    write_file(&boot.join("exact1468.bin"), &noise(2, 4 * 1468));
    write_file(&boot.join("exact512.bin"), &noise(3, 8 * 512));
    write_file(&boot.join("empty.bin"), b"");
    write_file(&boot.join("sub/nested.bin"), &noise(4, 3000));
    write_file(&boot.join("text.txt"), b"one\ntwo\r\nbare\rcr\n\nlast");
    write_file(&outside.join("secret"), b"outside the boot directory");
    std::os::unix::fs::symlink("/etc/passwd", boot.join("escape_abs")).expect("symlink");
    std::os::unix::fs::symlink("../outside/secret", boot.join("escape_rel")).expect("symlink");
    std::os::unix::fs::symlink("/", boot.join("rootlink")).expect("symlink");
    std::os::unix::fs::symlink("small.bin", boot.join("alias.bin")).expect("symlink");
    let fifo = Command::new("mkfifo")
        .arg(boot.join("fifo"))
        .status()
        .expect("mkfifo");
    assert!(fifo.success());
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_with_args(
        env,
        &[
            "--tftp-listen",
            &listen,
            "--boot-dir",
            boot.to_str().expect("utf-8"),
        ],
    );
    Lab {
        server,
        port,
        _tmp: tmp,
        boot,
        out,
    }
}

impl Lab {
    fn out(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    fn curl(&self, name: &str, out: &Path, extra: &[&str]) -> Output {
        Command::new("curl")
            .args(["-s", "-S", "--max-time", "120", "-o"])
            .arg(out)
            .args(extra)
            .arg(format!("tftp://127.0.0.1:{}/{name}", self.port))
            .output()
            .expect("run curl")
    }

    fn atftp(&self, name: &str, out: &Path, options: &[&str]) -> Output {
        let mut cmd = Command::new("atftp");
        cmd.args(["-g", "-r", name, "-l"]).arg(out);
        for o in options {
            cmd.args(["--option", o]);
        }
        cmd.args(["127.0.0.1", &self.port.to_string()])
            .output()
            .expect("run atftp (apt-get install atftp)")
    }

    /// tftp-hpa: `tftp HOST PORT -m MODE -c get|put …`.
    fn tftp_hpa(&self, mode: &str, command: &[&str]) -> Output {
        Command::new("tftp")
            .args(["127.0.0.1", &self.port.to_string(), "-m", mode, "-c"])
            .args(command)
            .output()
            .expect("run tftp (apt-get install tftp-hpa)")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }

    /// The server's log without its colour codes.
    fn log(&self) -> String {
        let text = self.server.log_text();
        let mut plain = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find('\x1b') {
            plain.push_str(&rest[..at]);
            rest = &rest[at..];
            rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
        }
        plain.push_str(rest);
        plain
    }
}

fn ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same(a: &Path, b: &Path) {
    assert!(
        same_bytes(a, b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// No bytes arrived: no file, or an empty one.
fn nothing_in(path: &Path) {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, 0, "{} got bytes", path.display());
}

// ---------- a raw client ----------

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

fn request(op: u16, name: &[u8], mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = op.to_be_bytes().to_vec();
    p.extend_from_slice(name);
    p.push(0);
    p.extend_from_slice(mode.as_bytes());
    p.push(0);
    for (n, v) in options {
        p.extend_from_slice(n.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(1, name.as_bytes(), "octet", options)
}

fn ack(block: u16) -> Vec<u8> {
    let mut p = vec![0, 4];
    p.extend_from_slice(&block.to_be_bytes());
    p
}

fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some((buf, from))
}

fn recv_within(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let got = recv(s);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    got
}

fn opcode(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[0], p[1]])
}

fn block(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[2], p[3]])
}

/// The code and message of an ERROR packet; panics on anything else.
fn error_of(p: &[u8]) -> (u16, String) {
    assert_eq!(opcode(p), 5, "expected an ERROR, got {p:?}");
    let msg = p[4..].split(|&b| b == 0).next().unwrap_or_default();
    (block(p), String::from_utf8_lossy(msg).to_string())
}

/// The name/value pairs of an OACK.
fn oack_of(p: &[u8]) -> Vec<(String, String)> {
    assert_eq!(opcode(p), 6, "expected an OACK, got {p:?}");
    let strings: Vec<String> = p[2..]
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect();
    strings
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// Sends a request and returns the first answer, or an error code.
fn ask(lab: &Lab, packet: &[u8]) -> (Vec<u8>, SocketAddr) {
    let s = socket();
    s.send_to(packet, lab.addr()).expect("send");
    recv(&s).expect("an answer")
}

fn refused_with(lab: &Lab, packet: &[u8]) -> (u16, String) {
    let (answer, _) = ask(lab, packet);
    error_of(&answer)
}

// ---------- real clients ----------

#[test]
fn real_clients_fetch_files_byte_for_byte() {
    let lab = lab(&[]);
    let small = lab.boot.join("small.bin");
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("curl, default options", "small.bin", vec![]),
        ("curl, no options", "small.bin", vec!["--tftp-no-options"]),
        (
            "curl, blksize 1468",
            "exact1468.bin",
            vec!["--tftp-blksize", "1468"],
        ),
        // Asked for more than tftp.max_blksize: the OACK grants 1468 and curl follows.
        (
            "curl, blksize 8192",
            "exact1468.bin",
            vec!["--tftp-blksize", "8192"],
        ),
        (
            "curl, exact multiple of 512",
            "exact512.bin",
            vec!["--tftp-no-options"],
        ),
        // (Not the empty file: curl 7.88 fails on one with any server, atftpd's too, with
        // "getpeername() failed"; atftp and tftp-hpa fetch it below.)
        ("curl, nested", "sub/nested.bin", vec![]),
    ];
    for (i, (what, name, extra)) in cases.iter().enumerate() {
        let out = lab.out(&format!("curl{i}"));
        ok(what, &lab.curl(name, &out, extra));
        same(&lab.boot.join(name), &out);
    }

    for (i, (name, options)) in [
        ("small.bin", vec![]),
        ("exact1468.bin", vec!["blksize 1468", "windowsize 16"]),
        ("exact512.bin", vec!["windowsize 4", "tsize 0"]),
        (
            "/sub/nested.bin",
            vec!["blksize 1000", "windowsize 2", "timeout 3"],
        ),
        ("empty.bin", vec!["windowsize 16"]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = lab.out(&format!("atftp{i}"));
        ok(
            &format!("atftp {name} {options:?}"),
            &lab.atftp(name, &out, &options),
        );
        same(&lab.boot.join(name.trim_start_matches('/')), &out);
    }

    for (i, name) in ["small.bin", "exact512.bin", "/alias.bin", "empty.bin"]
        .into_iter()
        .enumerate()
    {
        let out = lab.out(&format!("hpa{i}"));
        let got = lab.tftp_hpa("octet", &["get", name, out.to_str().expect("utf-8")]);
        ok(&format!("tftp-hpa {name}"), &got);
        same(&lab.boot.join(name.trim_start_matches('/')), &out);
    }
    same(&small, &lab.out("hpa2"));

    // One line per transfer, with the file, bytes, block and window sizes.
    let log = lab.log();
    let line = log
        .lines()
        .find(|l| {
            l.contains("tftp transfer done")
                && l.contains("exact1468.bin")
                && l.contains("windowsize=16")
        })
        .unwrap_or_else(|| panic!("no transfer line in:\n{log}"));
    assert!(
        line.contains("bytes=5872") && line.contains("blksize=1468"),
        "{line}"
    );
}

#[test]
fn a_file_past_65535_blocks_wraps_the_block_number() {
    let lab = lab(&[]);
    let big = lab.boot.join("big.bin");
    write_file(&big, &noise(9, (33 << 20) + 77));
    // 512-byte blocks: 67,585 of them, so the block number wraps past 65535.
    let out = lab.out("big-curl");
    ok(
        "curl big",
        &lab.curl("big.bin", &out, &["--tftp-no-options"]),
    );
    same(&big, &out);
    let out = lab.out("big-atftp");
    ok(
        "atftp big",
        &lab.atftp("big.bin", &out, &["blksize 512", "windowsize 16"]),
    );
    same(&big, &out);
}

#[test]
fn netascii_round_trips_through_tftp_hpa() {
    let lab = lab(&[]);
    let out = lab.out("text");
    let got = lab.tftp_hpa(
        "netascii",
        &["get", "text.txt", out.to_str().expect("utf-8")],
    );
    ok("tftp-hpa netascii", &got);
    same(&lab.boot.join("text.txt"), &out);
    // On the wire, lines end in CR LF and a bare CR is CR NUL.
    let s = socket();
    s.send_to(&request(1, b"text.txt", "NETASCII", &[]), lab.addr())
        .expect("send");
    let (data, _) = recv(&s).expect("data");
    assert_eq!(&data[4..], b"one\r\ntwo\r\0\r\nbare\r\0cr\r\n\r\nlast");
}

#[test]
fn parallel_transfers_all_arrive_whole() {
    let lab = lab(&[]);
    let mut names = Vec::new();
    for i in 0..8 {
        let name = format!("p{i}.bin");
        write_file(
            &lab.boot.join(&name),
            &noise(100 + i, (2 << 20) + i as usize * 1111),
        );
        names.push(name);
    }
    std::thread::scope(|scope| {
        for (i, name) in names.iter().enumerate() {
            let lab = &lab;
            scope.spawn(move || {
                let out = lab.out(name);
                let got = match i % 3 {
                    0 => lab.curl(name, &out, &["--tftp-blksize", "1468"]),
                    1 => lab.atftp(name, &out, &["blksize 1468", "windowsize 16"]),
                    _ => lab.tftp_hpa("octet", &["get", name, out.to_str().expect("utf-8")]),
                };
                ok(name, &got);
                same(&lab.boot.join(name), &out);
            });
        }
    });
}

// ---------- refusals ----------

#[test]
fn traversal_and_symlinks_out_of_the_boot_directory_are_refused() {
    let lab = lab(&[]);
    for name in [
        "../../etc/passwd",
        "/../etc/passwd",
        "sub/../../outside/secret",
        "../outside/secret",
        "escape_abs",
        "escape_rel",
        "rootlink/etc/passwd",
    ] {
        let (code, message) = refused_with(&lab, &rrq(name, &[]));
        assert_eq!(code, 2, "{name}: {message}");
        assert!(message.contains("access violation"), "{name}: {message}");
    }
    // A leading `/` is relative to the boot directory: /etc/passwd is not there.
    let (code, _) = refused_with(&lab, &rrq("/etc/passwd", &[]));
    assert_eq!(code, 1);

    // Real clients get an error and no bytes.
    let out = lab.out("curl-escape");
    let got = lab.curl("../../etc/passwd", &out, &["--path-as-is"]);
    assert!(!got.status.success());
    nothing_in(&out);
    let out = lab.out("atftp-escape");
    lab.atftp("escape_abs", &out, &[]);
    nothing_in(&out);
    let out = lab.out("hpa-escape");
    let got = lab.tftp_hpa(
        "octet",
        &["get", "../outside/secret", out.to_str().expect("utf-8")],
    );
    assert!(
        String::from_utf8_lossy(&got.stderr).contains("Access violation")
            || String::from_utf8_lossy(&got.stdout).contains("ccess violation"),
        "{got:?}"
    );
    nothing_in(&out);
    assert!(lab.log_has("leaves the boot directory"));

    // DHCP's UEFI file is a symlink out of the folder (as Debian's /usr/lib/ipxe/ipxe.efi
    // is): the operator is told at start-up, and UEFI HTTP boot refuses it as TFTP does.
    let efi = self::lab(&[("KAGAMI__DHCP__EFI_FILE", "escape_abs")]);
    assert!(
        efi.log_has("escape_abs cannot be served (access violation: the path leaves"),
        "{}",
        efi.server.log_text()
    );
    let r = efi.server.curl(None, "GET", "/boot/files/escape_abs", &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(!r.text().contains("root:"), "{}", r.text());
}

#[test]
fn missing_files_directories_fifos_and_unknown_modes_are_errors() {
    let lab = lab(&[]);
    assert_eq!(refused_with(&lab, &rrq("nope.bin", &[])).0, 1);
    assert_eq!(refused_with(&lab, &rrq("sub/nope/deeper", &[])).0, 1);
    assert_eq!(refused_with(&lab, &rrq("sub", &[])).0, 2);
    assert_eq!(refused_with(&lab, &rrq("/", &[])).0, 2);
    // A FIFO neither stalls the server nor is served.
    assert_eq!(refused_with(&lab, &rrq("fifo", &[])).0, 2);
    for mode in ["mail", "binary", ""] {
        let (code, message) = refused_with(&lab, &request(1, b"small.bin", mode, &[]));
        assert_eq!(code, 4, "{mode}: {message}");
    }
    let out = lab.out("missing");
    assert!(!lab.curl("nope.bin", &out, &[]).status.success());
    nothing_in(&out);
}

#[test]
fn write_requests_are_refused() {
    let lab = lab(&[]);
    let (code, message) = refused_with(&lab, &request(2, b"new.bin", "octet", &[]));
    assert_eq!(code, 2, "{message}");
    let local = lab.out("upload.bin");
    write_file(&local, b"an upload");
    let got = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20", "-T"])
        .arg(&local)
        .arg(format!("tftp://127.0.0.1:{}/new.bin", lab.port))
        .output()
        .expect("curl");
    assert!(!got.status.success());
    let got = lab.tftp_hpa("octet", &["put", local.to_str().expect("utf-8"), "new.bin"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(text.contains("ccess violation"), "{text}");
    assert!(!lab.boot.join("new.bin").exists());
    assert!(lab.log_has("write request refused"));
}

// ---------- the protocol under stress ----------

#[test]
fn options_are_negotiated_clamped_or_ignored() {
    let lab = lab(&[]);
    let get = |options: &[(&str, &str)]| ask(&lab, &rrq("exact1468.bin", options)).0;
    let oack = |options: &[(&str, &str)]| oack_of(&get(options));
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        oack(&[
            ("BLKSIZE", "100000"),
            ("tsize", "0"),
            ("windowsize", "5000"),
            ("timeout", "2")
        ]),
        pairs(&[
            ("blksize", "1468"),
            ("timeout", "2"),
            ("tsize", "5872"),
            ("windowsize", "64")
        ])
    );
    assert_eq!(
        oack(&[
            ("blksize", "4"),
            ("timeout", "0"),
            ("windowsize", "8"),
            ("rollover", "0")
        ]),
        pairs(&[("windowsize", "8")])
    );
    assert_eq!(
        oack(&[("timeout", "300"), ("blksize", "600")]),
        pairs(&[("blksize", "600")])
    );
    // No option we accept, or none at all: plain RFC 1350, DATA 1 of 512 bytes.
    for options in [&[][..], &[("multicast", ""), ("blksize", "x")][..]] {
        let data = get(options);
        assert_eq!((opcode(&data), block(&data), data.len()), (3, 1, 516));
    }
    // netascii: no tsize (the size on the wire differs from the file's).
    let (answer, _) = ask(
        &lab,
        &request(
            1,
            b"text.txt",
            "netascii",
            &[("tsize", "0"), ("blksize", "512")],
        ),
    );
    assert_eq!(oack_of(&answer), pairs(&[("blksize", "512")]));

    // A PXE ROM that asks for the size alone ends the transfer after the OACK, with an ERROR.
    let s = socket();
    s.send_to(&rrq("small.bin", &[("tsize", "0")]), lab.addr())
        .expect("send");
    let (answer, tid) = recv(&s).expect("OACK");
    assert_eq!(oack_of(&answer), pairs(&[("tsize", "1000")]));
    s.send_to(b"\x00\x05\x00\x08size only\x00", tid)
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log_has("ended by the client") {
        assert!(Instant::now() < deadline, "{}", lab.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lab.log_has("error=size only"), "{}", lab.log());
    assert!(
        recv_within(&s, Duration::from_millis(300)).is_none(),
        "data after the ERROR"
    );
}

#[test]
fn lost_and_duplicate_acks_neither_stall_nor_duplicate() {
    // A 1 s retransmission timeout: the 150 ms "nothing more comes" windows below keep 850 ms
    // of slack on a loaded machine (at 300 ms a slow test thread saw a legitimate resend).
    let lab = lab(&[("KAGAMI__TFTP__TIMEOUT_MS", "1000")]);
    let expected = std::fs::read(lab.boot.join("exact512.bin")).expect("read");
    let s = socket();
    s.send_to(&rrq("exact512.bin", &[]), lab.addr())
        .expect("send");
    let (first, tid) = recv(&s).expect("DATA 1");
    assert_eq!(block(&first), 1);
    // No ACK: DATA 1 comes again after the timeout.
    let started = Instant::now();
    let (again, _) = recv(&s).expect("DATA 1 again");
    assert_eq!((opcode(&again), block(&again)), (3, 1));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // ACK 1 twice: DATA 2 comes once, not twice (the Sorcerer's Apprentice).
    s.send_to(&ack(1), tid).expect("ack");
    s.send_to(&ack(1), tid).expect("ack");
    let (second, _) = recv(&s).expect("DATA 2");
    assert_eq!(block(&second), 2);
    assert!(
        recv_within(&s, Duration::from_millis(150)).is_none(),
        "DATA 2 was duplicated"
    );
    // A stranger on the transfer's port is told so, and the transfer goes on.
    let stranger = socket();
    stranger.send_to(&ack(2), tid).expect("send");
    assert_eq!(error_of(&recv(&stranger).expect("error").0).0, 5);
    // Garbage from the client itself is ignored.
    s.send_to(b"\x00\x09garbage", tid).expect("send");
    let mut got = first[4..].to_vec();
    got.extend_from_slice(&second[4..]);
    let mut n = 2u16;
    loop {
        s.send_to(&ack(n), tid).expect("ack");
        let (data, _) = recv(&s).expect("DATA");
        if block(&data) != n + 1 {
            continue; // a retransmission of one already held
        }
        n += 1;
        got.extend_from_slice(&data[4..]);
        if data.len() < 516 {
            s.send_to(&ack(n), tid).expect("ack");
            break;
        }
    }
    assert_eq!(got, expected);

    // A window with a hole: ACK inside the window restarts it after the acknowledged block.
    let s = socket();
    s.send_to(&rrq("exact512.bin", &[("windowsize", "4")]), lab.addr())
        .expect("send");
    let (oack, tid) = recv(&s).expect("OACK");
    assert_eq!(
        oack_of(&oack),
        vec![("windowsize".to_string(), "4".to_string())]
    );
    s.send_to(&ack(0), tid).expect("ack");
    let window: Vec<u16> = (0..4).map(|_| block(&recv(&s).expect("DATA").0)).collect();
    assert_eq!(window, [1, 2, 3, 4]);
    s.send_to(&ack(2), tid).expect("ack");
    let window: Vec<u16> = (0..4).map(|_| block(&recv(&s).expect("DATA").0)).collect();
    assert_eq!(window, [3, 4, 5, 6]);
    // An old ACK changes nothing; the next window follows the window's last ACK.
    s.send_to(&ack(1), tid).expect("ack");
    assert!(recv_within(&s, Duration::from_millis(150)).is_none());
    s.send_to(&ack(6), tid).expect("ack");
    let window: Vec<u16> = (0..3).map(|_| block(&recv(&s).expect("DATA").0)).collect();
    assert_eq!(window, [7, 8, 9]);
    s.send_to(&ack(9), tid).expect("ack");
}

#[test]
fn a_silent_client_is_dropped_after_bounded_retries() {
    let lab = lab(&[
        ("KAGAMI__TFTP__TIMEOUT_MS", "100"),
        ("KAGAMI__TFTP__RETRIES", "3"),
    ]);
    let s = socket();
    s.send_to(&rrq("small.bin", &[]), lab.addr()).expect("send");
    let mut copies = 0;
    // 100 + 200 + 400 + 800 ms of waiting, then nothing.
    while let Some((p, _)) = recv_within(&s, Duration::from_millis(2500)) {
        assert_eq!((opcode(&p), block(&p)), (3, 1));
        copies += 1;
    }
    assert_eq!(copies, 4, "the first send and three retransmissions");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log_has("stopped answering") {
        assert!(Instant::now() < deadline, "{}", lab.server.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server still serves.
    let out = lab.out("after");
    ok(
        "curl after a dropped transfer",
        &lab.curl("small.bin", &out, &[]),
    );
}

#[test]
fn malformed_packets_are_answered_or_ignored_and_service_goes_on() {
    let lab = lab(&[]);
    let s = socket();
    let mut long_name = vec![0, 1];
    long_name.extend(std::iter::repeat_n(b'a', 2000));
    long_name.extend_from_slice(b"\0octet\0");
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 1],
        b"\x00\x01small.bin".to_vec(),
        b"\x00\x01small.bin\0".to_vec(),
        b"\x00\x01\0octet\0".to_vec(),
        b"\x00\x01small.bin\0octet\0blksize\0".to_vec(),
        b"\x00\x01small.bin\0octet\0blksize".to_vec(),
        long_name,
        b"\x00\x09hello".to_vec(),
        b"\x00\x03\x00\x01data".to_vec(),
        b"\x00\x04\x00\x01".to_vec(),
        b"\x00\x05\x00\x01oops\0".to_vec(),
        b"\x00\x06blksize\x00512\x00".to_vec(),
        vec![0xff; 600],
    ];
    for p in &garbage {
        s.send_to(p, lab.addr()).expect("send");
        if let Some((answer, _)) = recv_within(&s, Duration::from_millis(300)) {
            assert_eq!(opcode(&answer), 5, "{p:?} answered with {answer:?}");
        }
    }
    // Thousands of mutated requests, as fast as they go.
    let seeds = [
        // A missing name, so that mutants rarely start transfers that would hold slots.
        rrq("nope.bin", &[("blksize", "1468"), ("tsize", "0")]),
        request(2, b"x", "octet", &[]),
        ack(1),
    ];
    let mut rng = Rng(0x1350_2347);
    let noise_socket = socket();
    for _ in 0..3000 {
        let mut p = seeds[rng.below(seeds.len())].clone();
        for _ in 0..=rng.below(3) {
            match rng.below(3) {
                0 if !p.is_empty() => {
                    let i = rng.below(p.len());
                    p[i] ^= 1 << rng.below(8);
                }
                1 => p.truncate(rng.below(p.len() + 1)),
                _ => {
                    let i = rng.below(p.len() + 1);
                    p.insert(i, rng.next_u64() as u8);
                }
            }
        }
        // Mutants that still name a real file may start transfers: fine, they time out.
        let _ = noise_socket.send_to(&p, lab.addr());
    }
    let out = lab.out("after");
    ok("curl after the garbage", &lab.curl("small.bin", &out, &[]));
    same(&lab.boot.join("small.bin"), &out);
}

#[test]
fn tftp_is_off_unless_asked_for() {
    let server = Server::start();
    assert!(!server.log_text().contains("tftp"), "{}", server.log_text());
}
