//! The systemd units: `systemd-analyze verify` accepts them, and `kagami serve` speaks the
//! `Type=notify` protocol the unit relies on (READY=1 once listening, STOPPING=1 on SIGTERM).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tmp");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let agent = common::kagami().with_file_name("kagami-agent");
    for (unit, binary) in [
        ("kagami.service", common::kagami()),
        ("kagami-agent.service", agent),
    ] {
        // The units name the installed paths; point them at the binaries just built.
        let text = std::fs::read_to_string(units.join(unit)).expect("unit");
        let text = text.replace(
            &format!(
                "/usr/local/bin/{}",
                binary.file_name().expect("name").to_string_lossy()
            ),
            binary.to_str().expect("path"),
        );
        std::fs::write(dir.path().join(unit), text).expect("write");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("kagami.service"))
        .arg(dir.path().join("kagami-agent.service"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze (the systemd package)");
    let errors = String::from_utf8_lossy(&out.stderr);
    // Only complaints about our units count (the host's own units may be imperfect).
    let ours: Vec<&str> = errors.lines().filter(|l| l.contains("kagami")).collect();
    assert!(out.status.success() && ours.is_empty(), "{errors}");
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut child = Command::new(common::kagami())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("KAGAMI__GC__INTERVAL_SECS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kagami serve");
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains("STATUS=serving http://127.0.0.1:"),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("MAINPID={}", child.id())),
        "{ready}"
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let n = socket.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let status = child.wait().expect("exit");
    assert!(status.success(), "a SIGTERM is a clean stop: {status}");
}
