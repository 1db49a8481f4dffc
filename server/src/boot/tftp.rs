//! The TFTP server: read-only, serving only regular files under the boot directory
//! (`boot.dir`), for PXE ROMs that fetch iPXE. RFC 1350 plus option negotiation (RFC 2347):
//! blksize (RFC 2348), timeout and tsize (RFC 2349), windowsize (RFC 7440).
//!
//! # Why our own implementation
//! `async-tftp` 0.4 implements the same RFCs, windowsize included, but it did not meet the
//! goals here: it is built on smol's building blocks (an `async-io` reactor thread and a
//! `blocking` thread pool beside tokio's); its directory handler joins the requested name onto
//! the directory and opens it with `File::open`, so a symlink inside the directory leads
//! anywhere; it retransmits on a fixed timeout with no backoff; and it logs through `log`, with
//! no per-transfer summary. A custom handler could fix the opening, not the rest. The protocol
//! is small, so it is written here on tokio UDP sockets; the packet codec is a pure function
//! with limits in [`packet`], with a fuzz target (`fuzz/fuzz_targets/tftp.rs`) and a seeded
//! property test.
//!
//! # Confinement to the boot directory
//! The directory is opened once at start-up and every file is opened relative to that
//! descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel resolves the
//! whole path, symlinks included, and refuses (`EXDEV`) any step that would leave the directory
//! — `..`, an absolute symlink, a relative symlink that climbs out — atomically, so there is no
//! window between a check and the open as there is with `canonicalize` followed by a prefix test
//! (a symlink swapped in between), and a rename of the directory itself changes nothing.
//! Relative symlinks that stay inside are followed; an absolute symlink is refused even when it
//! points back inside (copy files in with `cp -L`: Debian's `/usr/lib/ipxe/ipxe.efi` is such a
//! symlink). Where `openat2` is missing (Linux < 5.6) or filtered (`ENOSYS`/`EPERM`), the path is
//! walked one component at a time with `openat(O_NOFOLLOW)`, which refuses every symlink.
//! Before any of that, names are taken apart lexically: leading `/` (PXE ROMs send them) is
//! dropped, `.` and empty components are skipped, and a `..` component is an access violation
//! without touching the file system. Files are opened `O_NONBLOCK` (a FIFO cannot stall the
//! open) and served only when `fstat` says they are regular files.
//!
//! # Transfers
//! Each read request gets its own ephemeral UDP socket (its transfer ID, RFC 1350 §4) on the
//! listening address and its own task on the TFTP thread, a single-threaded runtime of its own
//! (see [`Server::run`] for why); `tftp.max_transfers` bounds how many run at once. Files are
//! read off that thread, 256 KiB at a time, the next chunk while the current one goes out.
//! Options are negotiated with an OACK only when the client asked for some we accept: blksize
//! (8 to 65464; larger requests are clamped to `tftp.max_blksize`, smaller ones ignored),
//! timeout (1 to 255 s, else ignored), tsize (the file's size; left out in netascii mode, where
//! the size on the wire differs), windowsize (clamped to `tftp.max_windowsize`, 0 ignored). A
//! client that asks for none gets plain RFC 1350. The sender keeps a window of blocks in memory;
//! an ACK for the window's last block moves it on, an ACK inside the window (the client missed
//! a block) restarts it after the acknowledged block (RFC 7440 §4), and an old or duplicate ACK
//! is ignored: only a timeout retransmits, so a duplicated ACK never duplicates the data that
//! follows it (the Sorcerer's Apprentice bug of RFC 1350). Timeouts back off (doubling, up to
//! eight times the first) and after `tftp.retries` of them in a row the transfer is dropped.
//! Block numbers wrap from 65535 to 0, as tftp-hpa, atftp and curl expect.
//!
//! # Limits worth knowing
//! A transfer socket is bound to the listening address: with a wildcard address (`0.0.0.0`) on
//! a host with several addresses, replies leave from whichever address the route picks, which a
//! strict client may not accept — listen on the provisioning address on such hosts.

pub mod packet;

use std::ffi::OsStr;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::fs::{AtFlags, FileType, Mode as FileMode, OFlags, ResolveFlags};
use rustix::io::Errno;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use self::packet::{
    ERR_ACCESS, ERR_ILLEGAL, ERR_NOT_FOUND, ERR_UNDEFINED, ERR_UNKNOWN_TID, Mode, Packet,
};
use crate::config::Config;

/// Bytes read from the file at a time (then cut into blocks).
const CHUNK: usize = 256 << 10;

/// The tunables of `[tftp]`, checked.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub timeout: Duration,
    pub retries: u32,
    pub max_transfers: usize,
}

/// A listening TFTP server, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    /// Bound here, served on the TFTP thread's own runtime (see [`Server::run`]).
    socket: std::net::UdpSocket,
    dir: Arc<BootDir>,
    settings: Settings,
}

/// What the listening loop needs to start transfers.
struct Listener {
    dir: Arc<BootDir>,
    settings: Settings,
    slots: Arc<Semaphore>,
    /// Transfer sockets are bound to the listening address.
    local: SocketAddr,
}

impl Server {
    /// The server `config` asks for (`tftp.listen`, `boot.dir`), bound; `None` when TFTP is off.
    pub async fn from_config(config: &Config) -> anyhow::Result<Option<Server>> {
        let Some(addr) = config.tftp.listen_addr()? else {
            return Ok(None);
        };
        let dir = BootDir::open(&config.boot.dir).with_context(|| {
            format!(
                "cannot open the boot directory {} (boot.dir / --boot-dir)",
                config.boot.dir.display()
            )
        })?;
        // What DHCP names must be servable; say so at start rather than to a machine's PXE ROM
        // ("PXE-E23") later. A symlink out of the folder (Debian's /usr/lib/ipxe/ipxe.efi
        // points to /boot) is refused like any path that leaves it.
        for name in [&config.dhcp.bios_file, &config.dhcp.efi_file] {
            if let Err(refused) = dir.open_file(Path::new(name)) {
                tracing::warn!(
                    "tftp: {}/{name} cannot be served ({}); copy the file itself into the folder \
                     (e.g. cp -L /usr/lib/ipxe/{name} {}/)",
                    config.boot.dir.display(),
                    refused.message,
                    config.boot.dir.display()
                );
            }
        }
        let settings = Settings {
            max_blksize: config.tftp.max_blksize,
            max_windowsize: config.tftp.max_windowsize,
            timeout: Duration::from_millis(config.tftp.timeout_ms),
            retries: config.tftp.retries,
            max_transfers: config.tftp.max_transfers,
        };
        let server = Server::bind(addr, dir, settings)
            .await
            .with_context(|| format!("cannot listen on {addr} (tftp.listen / --tftp-listen)"))?;
        tracing::info!(
            addr = %server.local_addr()?,
            dir = %config.boot.dir.display(),
            "tftp is serving"
        );
        Ok(Some(server))
    }

    pub async fn bind(
        addr: SocketAddr,
        dir: BootDir,
        settings: Settings,
    ) -> std::io::Result<Server> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        Ok(Server {
            socket,
            dir: Arc::new(dir),
            settings,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Starts answering requests, until the process ends, on a thread of its own with a
    /// single-threaded runtime, and returns at once; each transfer is a task there. Lock-step
    /// TFTP lives on latency: on one thread a packet's arrival and the answer to it involve no
    /// wake-up of another thread, and the API's work (hashing, exports) on the main runtime's
    /// workers does not delay them. (On the main runtime, blksize 1468 without a window ran at
    /// 0.7× dnsmasq's speed; see BENCHMARKS.md.)
    pub async fn run(self) {
        let started = std::thread::Builder::new()
            .name("kagami-tftp".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(self.serve()),
                    Err(e) => tracing::error!("tftp: cannot start its runtime: {e}"),
                }
            });
        if let Err(e) = started {
            tracing::error!("tftp: cannot start its thread: {e}");
        }
    }

    async fn serve(self) {
        let local = match self.socket.local_addr() {
            Ok(addr) => SocketAddr::new(addr.ip(), 0),
            Err(e) => return tracing::error!("tftp: no local address: {e}"),
        };
        let socket = match UdpSocket::from_std(self.socket) {
            Ok(socket) => socket,
            Err(e) => return tracing::error!("tftp: cannot use the socket: {e}"),
        };
        let listener = Listener {
            dir: self.dir,
            settings: self.settings,
            slots: Arc::new(Semaphore::new(self.settings.max_transfers)),
            local,
        };
        let mut buf = vec![0u8; packet::MAX_REQUEST + 1];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    // E.g. an ICMP error reported on the socket: nothing to do but go on.
                    tracing::debug!("tftp: receive failed: {e}");
                    continue;
                }
            };
            if let Some(reply) = listener.request(&buf[..len], peer) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    }
}

impl Listener {
    /// Handles one datagram sent to the listening port; returns an error packet to send back,
    /// if any (a transfer answers from its own socket).
    fn request(&self, datagram: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
        let req = match packet::decode(datagram) {
            Ok(Packet::Read(req)) => req,
            Ok(Packet::Write(req)) => {
                tracing::warn!(%peer, file = %lossy(req.filename), "tftp: write request refused");
                return Some(packet::error(
                    ERR_ACCESS,
                    "access violation: this server is read-only",
                ));
            }
            Ok(other) => {
                tracing::debug!(%peer, ?other, "tftp: not a request, ignored");
                return None;
            }
            Err(e) => {
                // Noise is ignored; a request that fails to decode is told why.
                return match packet::opcode(datagram) {
                    Some(packet::RRQ | packet::WRQ) => {
                        tracing::warn!(%peer, "tftp: malformed request refused: {e}");
                        Some(packet::error(
                            ERR_ILLEGAL,
                            &format!("malformed request: {e}"),
                        ))
                    }
                    _ => {
                        tracing::debug!(%peer, "tftp: malformed packet ignored: {e}");
                        None
                    }
                };
            }
        };
        let name = lossy(req.filename);
        let Some(mode) = req.mode() else {
            tracing::warn!(%peer, file = %name, mode = %lossy(req.mode), "tftp: unknown mode refused");
            return Some(packet::error(
                ERR_ILLEGAL,
                "illegal operation: unknown transfer mode",
            ));
        };
        let relative = match relative_name(req.filename) {
            Ok(path) => path,
            Err(refusal) => {
                tracing::warn!(%peer, file = %name, "tftp: refused: {}", refusal.message);
                return Some(refusal.packet());
            }
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, file = %name, "tftp: refused: too many transfers at once");
            return Some(packet::error(
                ERR_UNDEFINED,
                "too many transfers at once, try again",
            ));
        };
        let local = self.local;
        let transfer = Transfer {
            peer,
            name,
            relative,
            mode,
            options: req.known_options(),
            settings: self.settings,
            dir: self.dir.clone(),
        };
        tokio::spawn(async move {
            transfer.run(local).await;
            drop(slot);
        });
        None
    }
}

/// The boot directory, opened once; files are opened beneath it only.
#[derive(Debug)]
pub struct BootDir {
    fd: OwnedFd,
}

/// Why a request is refused: the TFTP error code and the message sent (and logged).
#[derive(Debug)]
pub struct Refusal {
    code: u16,
    pub message: String,
}

impl Refusal {
    fn new(code: u16, message: &str) -> Refusal {
        Refusal {
            code,
            message: message.to_string(),
        }
    }

    fn packet(&self) -> Vec<u8> {
        packet::error(self.code, &self.message)
    }
}

/// The requested name as a path relative to the boot directory, taken apart lexically.
fn relative_name(name: &[u8]) -> Result<PathBuf, Refusal> {
    let mut path = PathBuf::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(Refusal::new(
                    ERR_ACCESS,
                    "access violation: the path leaves the boot directory",
                ));
            }
            part => path.push(OsStr::from_bytes(part)),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(Refusal::new(
            ERR_ACCESS,
            "access violation: not a regular file",
        ));
    }
    Ok(path)
}

impl BootDir {
    pub fn open(path: &Path) -> std::io::Result<BootDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FileMode::empty(),
        )?;
        Ok(BootDir { fd })
    }

    /// Opens a regular file beneath the directory, and returns it with its size.
    pub fn open_file(&self, relative: &Path) -> Result<(File, u64), Refusal> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let opened = match rustix::fs::openat2(
            &self.fd,
            relative,
            flags,
            FileMode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::NOSYS | Errno::PERM) => self.walk(relative, flags),
            other => other,
        };
        let file = File::from(opened.map_err(|e| match e {
            Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG => {
                Refusal::new(ERR_NOT_FOUND, "file not found")
            }
            Errno::XDEV | Errno::LOOP => Refusal::new(
                ERR_ACCESS,
                "access violation: the path leaves the boot directory",
            ),
            Errno::ACCESS | Errno::PERM => {
                Refusal::new(ERR_ACCESS, "access violation: permission denied")
            }
            other => Refusal::new(ERR_UNDEFINED, &format!("cannot open the file: {other}")),
        })?);
        let meta = file
            .metadata()
            .map_err(|e| Refusal::new(ERR_UNDEFINED, &format!("cannot read the file: {e}")))?;
        if !meta.is_file() {
            return Err(Refusal::new(
                ERR_ACCESS,
                "access violation: not a regular file",
            ));
        }
        Ok((file, meta.len()))
    }

    /// The fallback without `openat2`: one component at a time, never following a symlink.
    fn walk(&self, relative: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let parts: Vec<&OsStr> = relative
            .components()
            .map(|c| match c {
                Component::Normal(part) => Ok(part),
                _ => Err(Errno::XDEV),
            })
            .collect::<Result<_, _>>()?;
        let mut current: Option<OwnedFd> = None;
        for (i, part) in parts.iter().enumerate() {
            let base = current.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            let step = if i + 1 == parts.len() {
                flags | OFlags::NOFOLLOW
            } else {
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            current = Some(
                rustix::fs::openat(base, *part, step, FileMode::empty()).map_err(|e| {
                    // O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: call it a symlink.
                    let link = rustix::fs::statat(base, *part, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                    if link { Errno::LOOP } else { e }
                })?,
            );
        }
        current.ok_or(Errno::NOENT)
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One read request, from its acceptance to its last ACK.
struct Transfer {
    peer: SocketAddr,
    name: String,
    relative: PathBuf,
    mode: Mode,
    options: packet::Options,
    settings: Settings,
    dir: Arc<BootDir>,
}

/// What the negotiation settled.
#[derive(Clone, Copy, Debug)]
struct Agreed {
    blksize: usize,
    windowsize: u64,
    timeout: Duration,
}

/// How a transfer ended, when not with its last ACK.
#[derive(Debug)]
enum Ended {
    TimedOut(u64),
    ClientError(u16, String),
    Io(std::io::Error),
}

impl Transfer {
    async fn run(self, local: SocketAddr) {
        let socket = match UdpSocket::bind(local).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %self.peer, file = %self.name, "tftp: no socket for the transfer: {e}");
                return;
            }
        };
        let dir = self.dir.clone();
        let relative = self.relative.clone();
        let opened = tokio::task::spawn_blocking(move || dir.open_file(&relative))
            .await
            .unwrap_or_else(|e| Err(Refusal::new(ERR_UNDEFINED, &format!("open failed: {e}"))));
        let (file, size) = match opened {
            Ok(opened) => opened,
            Err(refusal) => {
                tracing::warn!(peer = %self.peer, file = %self.name, "tftp: refused: {}", refusal.message);
                let _ = socket.send_to(&refusal.packet(), self.peer).await;
                return;
            }
        };
        let (agreed, oack) = self.negotiate(size);
        let started = Instant::now();
        let mut sender = Sender {
            socket,
            peer: self.peer,
            agreed,
            retries: self.settings.retries,
            retransmits: 0,
            stream: Stream {
                file: Arc::new(file),
                raw_offset: 0,
                netascii: self.mode == Mode::Netascii,
                buf: Vec::new(),
                start: 0,
                eof: false,
                next: None,
            },
        };
        let result = sender.send_all(oack).await;
        let ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(bytes) => tracing::info!(
                peer = %self.peer,
                file = %self.name,
                bytes,
                blksize = agreed.blksize,
                windowsize = agreed.windowsize,
                ms,
                retransmits = sender.retransmits,
                "tftp transfer done"
            ),
            Err(Ended::TimedOut(block)) => tracing::warn!(
                peer = %self.peer,
                file = %self.name,
                block,
                ms,
                "tftp transfer dropped: the client stopped answering"
            ),
            // Some PXE ROMs ask for the size (tsize) alone, then end the transfer.
            Err(Ended::ClientError(code, message)) => tracing::info!(
                peer = %self.peer,
                file = %self.name,
                code,
                error = %message,
                ms,
                "tftp transfer ended by the client"
            ),
            Err(Ended::Io(e)) => tracing::warn!(
                peer = %self.peer,
                file = %self.name,
                ms,
                "tftp transfer failed: {e}"
            ),
        }
    }

    /// The options accepted, and the OACK that says so (none when nothing was accepted).
    fn negotiate(&self, size: u64) -> (Agreed, Option<Vec<u8>>) {
        let o = self.options;
        let mut agreed = Agreed {
            blksize: 512,
            windowsize: 1,
            timeout: self.settings.timeout,
        };
        let mut oack: Vec<(&[u8], String)> = Vec::new();
        if let Some(b) = o.blksize.filter(|&b| b >= 8) {
            let b = b.min(u64::from(self.settings.max_blksize)).min(65464);
            agreed.blksize = b as usize;
            oack.push((b"blksize", b.to_string()));
        }
        if let Some(t) = o.timeout.filter(|t| (1..=255).contains(t)) {
            agreed.timeout = Duration::from_secs(t);
            oack.push((b"timeout", t.to_string()));
        }
        if o.tsize.is_some() && self.mode == Mode::Octet {
            oack.push((b"tsize", size.to_string()));
        }
        if let Some(w) = o.windowsize.filter(|&w| w >= 1) {
            let w = w.min(u64::from(self.settings.max_windowsize));
            agreed.windowsize = w;
            oack.push((b"windowsize", w.to_string()));
        }
        if oack.is_empty() {
            return (agreed, None);
        }
        let pairs: Vec<(&[u8], &[u8])> = oack.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        let mut out = Vec::new();
        Packet::Oack(pairs).encode(&mut out);
        (agreed, Some(out))
    }
}

/// The bytes on the wire, from the file (converted in netascii mode), kept from the oldest
/// unacknowledged block on so a window can be sent again without reading it again.
struct Stream {
    file: Arc<File>,
    raw_offset: u64,
    netascii: bool,
    buf: Vec<u8>,
    /// Offset in the stream of `buf[0]`.
    start: u64,
    eof: bool,
    /// The next chunk, being read at `raw_offset` while blocks already held go out.
    next: Option<tokio::task::JoinHandle<std::io::Result<Vec<u8>>>>,
}

impl Stream {
    /// Drops what comes before `keep` and reads until `end` is held (or the file ends).
    async fn fill(&mut self, keep: u64, end: u64) -> std::io::Result<()> {
        if !self.eof && self.start + (self.buf.len() as u64) < end {
            self.read_until(keep, end).await?;
        }
        // Less than a chunk left beyond this window: read the next one in the background.
        if !self.eof
            && self.next.is_none()
            && self.start + (self.buf.len() as u64) < end + CHUNK as u64
        {
            let file = self.file.clone();
            let offset = self.raw_offset;
            self.next = Some(tokio::task::spawn_blocking(move || {
                read_chunk(&file, offset)
            }));
        }
        Ok(())
    }

    async fn read_until(&mut self, keep: u64, end: u64) -> std::io::Result<()> {
        // Only now, before reading more: dropping moves what is kept to the front.
        if keep > self.start {
            let drop = ((keep - self.start) as usize).min(self.buf.len());
            self.buf.drain(..drop);
            self.start += drop as u64;
        }
        while !self.eof && self.start + (self.buf.len() as u64) < end {
            let next = match self.next.take() {
                Some(next) => next,
                None => {
                    let file = self.file.clone();
                    let offset = self.raw_offset;
                    tokio::task::spawn_blocking(move || read_chunk(&file, offset))
                }
            };
            let chunk = next.await.map_err(std::io::Error::other)??;
            self.eof = chunk.len() < CHUNK;
            self.raw_offset += chunk.len() as u64;
            if self.netascii {
                // RFC 764: a line ends in CR LF, and a bare CR is sent as CR NUL.
                for b in chunk {
                    match b {
                        b'\n' => self.buf.extend_from_slice(b"\r\n"),
                        b'\r' => self.buf.extend_from_slice(b"\r\0"),
                        b => self.buf.push(b),
                    }
                }
            } else if self.buf.is_empty() {
                self.buf = chunk;
            } else {
                self.buf.extend_from_slice(&chunk);
            }
        }
        Ok(())
    }

    /// The bytes of block `n` (numbered from 1) of `blksize`; call [`Stream::fill`] first.
    fn block(&self, n: u64, blksize: usize) -> &[u8] {
        let from = ((n - 1) * blksize as u64).saturating_sub(self.start) as usize;
        let from = from.min(self.buf.len());
        let to = (from + blksize).min(self.buf.len());
        &self.buf[from..to]
    }
}

/// Reads up to [`CHUNK`] bytes at `offset`; fewer only at the end of the file.
fn read_chunk(file: &File, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut chunk = vec![0u8; CHUNK];
    let mut got = 0;
    while got < CHUNK {
        match file.read_at(&mut chunk[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    chunk.truncate(got);
    Ok(chunk)
}

struct Sender {
    socket: UdpSocket,
    peer: SocketAddr,
    agreed: Agreed,
    retries: u32,
    retransmits: u64,
    stream: Stream,
}

/// What arrived while waiting for an ACK.
enum Heard {
    /// The client acknowledged this many more blocks.
    Ack(u64),
    TimedOut,
}

impl Sender {
    /// Sends the OACK (if any) and then the whole file; returns the bytes sent.
    async fn send_all(&mut self, oack: Option<Vec<u8>>) -> Result<u64, Ended> {
        let mut timeouts = 0u32;
        let mut wait = self.agreed.timeout;
        if let Some(oack) = oack {
            // The OACK stands for block 0: the client acknowledges it with ACK 0.
            loop {
                self.send(&oack).await?;
                match self.hear(0, 0, wait).await? {
                    Heard::Ack(_) => break,
                    Heard::TimedOut => self.timed_out(&mut timeouts, &mut wait, 0)?,
                }
            }
        }
        let blksize = self.agreed.blksize;
        let window = self.agreed.windowsize;
        let (mut acked, mut timeouts, mut wait) = (0u64, 0u32, self.agreed.timeout);
        let mut packet = Vec::with_capacity(blksize + 4);
        loop {
            self.stream
                .fill(acked * blksize as u64, (acked + window) * blksize as u64)
                .await
                .map_err(Ended::Io)?;
            let mut sent = acked;
            let mut last = false;
            while sent < acked + window && !last {
                sent += 1;
                let data = self.stream.block(sent, blksize);
                last = data.len() < blksize;
                packet.clear();
                packet::data_header(&mut packet, sent as u16);
                packet.extend_from_slice(data);
                self.send(&packet).await?;
            }
            match self.hear(acked, sent, wait).await? {
                Heard::Ack(more) => {
                    acked += more;
                    (timeouts, wait) = (0, self.agreed.timeout);
                    if last && acked == sent {
                        let bytes = self.stream.start + self.stream.buf.len() as u64;
                        return Ok(bytes);
                    }
                }
                Heard::TimedOut => {
                    self.timed_out(&mut timeouts, &mut wait, acked + 1)?;
                    self.retransmits += sent - acked;
                }
            }
        }
    }

    fn timed_out(
        &mut self,
        timeouts: &mut u32,
        wait: &mut Duration,
        block: u64,
    ) -> Result<(), Ended> {
        *timeouts += 1;
        if *timeouts > self.retries {
            return Err(Ended::TimedOut(block));
        }
        *wait = (*wait * 2).min(self.agreed.timeout * 8);
        Ok(())
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), Ended> {
        self.socket
            .send_to(bytes, self.peer)
            .await
            .map(drop)
            .map_err(Ended::Io)
    }

    /// Waits up to `wait` for an ACK of a block after `acked` and up to `sent` (block 0 is the
    /// OACK); old and duplicate ACKs are ignored, strangers are told they are strangers.
    async fn hear(&self, acked: u64, sent: u64, wait: Duration) -> Result<Heard, Ended> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 1024];
        loop {
            let Ok(got) = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await
            else {
                return Ok(Heard::TimedOut);
            };
            let (len, from) = got.map_err(Ended::Io)?;
            if from != self.peer {
                let reply = packet::error(ERR_UNKNOWN_TID, "unknown transfer ID");
                let _ = self.socket.send_to(&reply, from).await;
                continue;
            }
            match packet::decode(&buf[..len]) {
                Ok(Packet::Ack { block }) => {
                    if sent == 0 {
                        if block == 0 {
                            return Ok(Heard::Ack(0));
                        }
                        continue;
                    }
                    // How far past `acked` this ACK goes, modulo the 16-bit block numbers.
                    let ahead = u64::from(block.wrapping_sub(acked as u16));
                    if ahead >= 1 && ahead <= sent - acked {
                        return Ok(Heard::Ack(ahead));
                    }
                }
                Ok(Packet::Error { code, message }) => {
                    return Err(Ended::ClientError(code, lossy(message)));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_taken_apart_lexically() {
        assert_eq!(
            relative_name(b"/pxelinux/./undionly.kpxe").expect("ok"),
            PathBuf::from("pxelinux/undionly.kpxe")
        );
        assert_eq!(
            relative_name(b"//ipxe.efi").expect("ok"),
            PathBuf::from("ipxe.efi")
        );
        for bad in [&b"../etc/passwd"[..], b"a/../../b", b"/..", b"a/.."] {
            assert_eq!(relative_name(bad).expect_err("refused").code, ERR_ACCESS);
        }
        assert_eq!(relative_name(b"/").expect_err("refused").code, ERR_ACCESS);
    }

    #[test]
    fn opening_stays_beneath_the_directory_with_and_without_openat2() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("boot");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/file"), b"inside").expect("write");
        std::fs::write(tmp.path().join("secret"), b"outside").expect("write");
        std::os::unix::fs::symlink("../secret", root.join("up")).expect("symlink");
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("sub/file", root.join("alias")).expect("symlink");
        std::os::unix::fs::symlink("/", root.join("rootdir")).expect("symlink");
        let dir = BootDir::open(&root).expect("open");

        let (_, size) = dir.open_file(Path::new("sub/file")).expect("inside");
        assert_eq!(size, 6);
        let (_, size) = dir
            .open_file(Path::new("alias"))
            .expect("a symlink that stays inside");
        assert_eq!(size, 6);
        for escape in ["up", "abs", "rootdir/etc/passwd"] {
            let refused = dir.open_file(Path::new(escape)).expect_err(escape);
            assert_eq!(refused.code, ERR_ACCESS, "{escape}: {}", refused.message);
        }
        let missing = dir.open_file(Path::new("nope")).expect_err("missing");
        assert_eq!(missing.code, ERR_NOT_FOUND);
        let sub = dir.open_file(Path::new("sub")).expect_err("a directory");
        assert_eq!(sub.code, ERR_ACCESS);

        // The fallback refuses every symlink and serves plain files.
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        assert!(dir.walk(Path::new("sub/file"), flags).is_ok());
        for link in ["up", "abs", "alias", "rootdir/etc/passwd"] {
            assert_eq!(
                dir.walk(Path::new(link), flags).err(),
                Some(Errno::LOOP),
                "{link}"
            );
        }
    }
}
