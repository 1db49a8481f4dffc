//! systemd's readiness protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET` saying
//! `READY=1` once every listener is up, and `STOPPING=1` when shutdown begins. Written out here
//! (a dozen lines over std's Unix datagram socket) rather than taken from a crate; without
//! `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        // An abstract socket (Linux): '@' stands for the leading NUL byte.
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {path}: {e}");
    }
}

/// Every listener is up: systemd may start what depends on us.
pub fn ready(status: &str) {
    send(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}\n",
        std::process::id()
    ));
}

/// Shutdown began.
pub fn stopping() {
    send("STOPPING=1\n");
}
