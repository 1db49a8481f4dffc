//! A read-only iSCSI target (`[iscsi] listen`, `kagami serve --iscsi-listen`): every image is a
//! target of its own, `iqn.2026-11.io.kagami:<image-id>`, with one LUN (0) — what iPXE's
//! `sanboot iscsi:…`, the Linux initiator, libiscsi (`iscsi-ls`, `qemu-img`) and Windows use.
//!
//! **Why our own code.** There is no iSCSI target crate for Rust (only initiator bindings to
//! libiscsi); the part of RFC 7143 a read-only target with error recovery level 0 needs is small,
//! and the codec that faces untrusted bytes is ours to bound and fuzz anyway.
//!
//! **Protocol.** RFC 7143: login with AuthMethod None or CHAP (MD5), text negotiation of the
//! operational keys ([`keys`]: no digests, one connection per session, ERL 0) — a login's or
//! text request's text may come split over PDUs with C set, and a long answer goes out that
//! way ([`login`], [`text`]) —, discovery sessions answering `SendTargets`, normal sessions running SCSI commands ([`scsi`]: INQUIRY
//! with VPD pages, READ CAPACITY, READ, MODE SENSE with WP set, REPORT LUNS, …; writes get
//! CHECK CONDITION, DATA PROTECT / WRITE PROTECTED). Reads go through [`Reader::read_at`],
//! every block verified, and come back as Data-In PDUs of the initiator's
//! MaxRecvDataSegmentLength, sequences of MaxBurstLength, status in the last one (phase
//! collapse); NOP-Out pings are answered, task management waits for the commands in flight,
//! logout closes. A connection silent for `iscsi.nop_interval_secs` is pinged with a NOP-In
//! and closed if it shows no life within `iscsi.nop_timeout_secs` ([`Nop`]). Commands of one connection run concurrently (up to [`CMD_WINDOW`], which is
//! also the CmdSN window) and complete in any order. Logical blocks are 512 bytes; an image
//! whose size is not a multiple of 512 reads as padded with zeros. An ISO needs no CD-ROM
//! unit: iPXE's `sanboot` finds ISO 9660's primary volume descriptor at block 16 of any SAN
//! device, then reads it as a CD-ROM of 2048-byte blocks (four of ours) and boots El Torito —
//! hybrid ISOs and El Torito-only ones (no MBR), on BIOS and UEFI (tests/tests/iso.rs).
//!
//! **Access.** A discovery session lists, and a normal session opens, only images the caller
//! may read by the catalog's tenancy rules (active ones):
//! - *CHAP*: the CHAP name and secret are derived from a bearer token ([`chap`]; `kagami image
//!   export-iscsi ID` prints them): the caller is that token's project and role.
//! - *No authentication*: the anonymous caller, which sees public and marketplace images
//!   only. A private or shared image is never readable without a token's CHAP credentials.
//!
//! A refused login says "authentication failure" for wrong credentials and "not found" for a
//! target the caller may not read — the same as for one that does not exist. Mutual CHAP is
//! refused (the target has no secret of its own).
//! - *An ISO boot's per-boot token* (`kagami host boot-iso --via iscsi`): CHAP credentials
//!   derived the same way from the token the host's iPXE script carries ([`login::Principal`]);
//!   they list and open that boot's image only, and stop working when the token dies (release,
//!   the host's next boot): new logins are refused and open sessions end within
//!   [`TOKEN_RECHECK`].
//!
//! **Sessions.** A logged-in session (discovery or normal) is listed in [`super::sessions`]
//! (`GET /v1/exports`, `kagami export list`) with its principal and initiator name, until its
//! connection ends.
//!
//! **Limits.** PDUs: [`pdu::MAX_DATA_SEGMENT`] of data; a request's text, however many PDUs
//! it is split into, within [`pdu::MAX_TEXT`] and [`pdu::MAX_KEYS`]; login
//! within [`LOGIN_TIMEOUT`]; [`scsi::MAX_TRANSFER_BLOCKS`] per command (advertised in the Block
//! Limits VPD page); [`CONNECTION_BUDGET`] bytes of read buffers per connection and
//! [`BUFFER_BUDGET`] across all; [`MAX_CONNECTIONS`]; [`MAX_TARGETS`] in one SendTargets answer.

pub mod chap;
pub mod keys;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod text;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kagami_images::Manifest;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use uuid::Uuid;

use self::keys::Params;
use self::login::{Kind, Principal, Session};
use self::pdu::Header;
use super::Reader;
use super::sessions::{self, Live, Opened, Protocol, Sessions, Who};
use crate::catalog::iso;
use crate::config::Config;

/// The prefix of every target name; the image id follows.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.kagami:";
/// The login phase must end within this.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands of one connection in flight, and the CmdSN window (MaxCmdSN - ExpCmdSN + 1).
pub const CMD_WINDOW: u32 = 32;
/// Read buffers of one connection, in bytes: four of the largest commands.
pub const CONNECTION_BUDGET: usize = 4 * (scsi::MAX_TRANSFER_BLOCKS as usize * 512);
/// Read buffers across all connections, in bytes.
pub const BUFFER_BUDGET: usize = 256 << 20;
/// Connections at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 512;
/// How often a session opened with an ISO boot's token checks that the token still lives
/// (it dies when the host is released or boots again): the session ends at its next command
/// after that.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(2);
/// Targets listed in one SendTargets answer.
pub const MAX_TARGETS: usize = 4096;

/// The name of image `id`'s target.
pub fn target_name(id: Uuid) -> String {
    format!("{IQN_PREFIX}{id}")
}

/// The image id a target name stands for (iSCSI names compare case-insensitively).
pub fn target_id(name: &str) -> Option<Uuid> {
    let name = name.to_ascii_lowercase();
    name.strip_prefix(IQN_PREFIX)?.parse().ok()
}

/// The iSCSI listener and what its connections share.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    reader: Reader,
    buffers: Arc<Semaphore>,
    /// The last TSIH handed out (never 0, which means "a new session").
    tsih: AtomicU16,
    sessions: Sessions,
    /// Pings of silent connections; `None` when off (`iscsi.nop_interval_secs = 0`).
    nop: Option<Nop>,
}

/// NOP-In pings (RFC 7143 §11.19): a connection that has sent nothing for `interval`, with no
/// command in flight, gets a NOP-In with a Target Transfer Tag of ours; it must show life
/// within `timeout` — the NOP-Out that answers it, or any PDU — or it is closed. An initiator
/// that vanished without a word (a machine powered off, an OS that took over from iPXE) would
/// otherwise hold its connection and its session entry for ever.
#[derive(Clone, Copy, Debug)]
pub struct Nop {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Server {
    /// Binds `iscsi.listen`, or returns `None` when it is empty (iSCSI off). Sessions are
    /// registered in `sessions` once logged in.
    pub async fn from_config(
        config: &Config,
        reader: Reader,
        sessions: Sessions,
    ) -> anyhow::Result<Option<Server>> {
        let Some(addr) = config.iscsi.listen_addr()? else {
            return Ok(None);
        };
        let nop = config
            .iscsi
            .nop()?
            .map(|(interval, timeout)| Nop { interval, timeout });
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for iSCSI on {addr} (iscsi.listen / --iscsi-listen)")
        })?;
        Ok(Some(Server {
            listener,
            shared: Arc::new(Shared {
                reader,
                buffers: Arc::new(Semaphore::new(BUFFER_BUDGET)),
                tsih: AtomicU16::new(0),
                sessions,
                nop,
            }),
        }))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the process ends, each on a task of its own.
    pub async fn run(self) {
        let shared = self.shared;
        super::accept_loop(
            self.listener,
            "iSCSI",
            MAX_CONNECTIONS,
            move |stream, peer| connection(stream, peer, shared.clone()),
        )
        .await;
    }
}

/// A PDU as read: its header and data segment (AHS and padding dropped).
#[derive(Debug)]
pub struct Pdu {
    pub header: Header,
    pub data: Vec<u8>,
}

/// Reads one PDU; `None` at a clean end of stream. A header that does not decode is an
/// `InvalidData` error: the stream is out of step and the connection closes.
pub async fn read_pdu<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<Pdu>> {
    let mut bhs = [0u8; pdu::BHS_LEN];
    match rd.read_exact(&mut bhs).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header =
        pdu::decode_header(bhs).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // Bounded by the header's checks: at most 1020 + MAX_DATA_SEGMENT + 3 bytes.
    let mut rest = vec![0u8; header.rest_len()];
    rd.read_exact(&mut rest).await?;
    rest.drain(..header.ahs_len);
    rest.truncate(header.data_len);
    Ok(Some(Pdu { header, data: rest }))
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let tsih = loop {
        let t = shared.tsih.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if t != 0 {
            break t;
        }
    };
    let logged = tokio::time::timeout(
        LOGIN_TIMEOUT,
        login::login(&mut rd, &mut wr, &shared.reader, tsih),
    )
    .await;
    let session = match logged {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "iSCSI login ended: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "iSCSI login timed out");
            return;
        }
    };
    let initiator = session.initiator.clone();
    let image = match &session.kind {
        Kind::Discovery => None,
        Kind::Normal { id, .. } => Some(*id),
    };
    let (who, boot_host) = match &session.principal {
        Principal::BootToken { host, .. } => (Who::IsoBoot { host: *host }, Some(*host)),
        Principal::Caller(caller) => (Who::caller(caller), None),
    };
    tracing::info!(%peer, %initiator, ?image, ?boot_host, "iSCSI session started");
    let live = shared.sessions.open(Opened {
        protocol: Protocol::Iscsi,
        peer,
        image,
        who,
        initiator: Some(initiator.clone()),
    });
    match full_feature(rd, wr, session, local, &shared, &live).await {
        Ok(()) => tracing::info!(%peer, %initiator, ?image, "iSCSI session ended"),
        Err(e) => tracing::info!(%peer, %initiator, ?image, "iSCSI connection ended: {e}"),
    }
}

/// What the connection's writer sends. It fills in StatSN, ExpCmdSN and MaxCmdSN as it sends,
/// so they are current on the wire whatever order commands complete in.
#[derive(Debug)]
enum Out {
    /// One PDU; `status` when it carries a status and so takes a StatSN.
    Pdu {
        bhs: [u8; pdu::BHS_LEN],
        data: Vec<u8>,
        status: bool,
    },
    /// A command's data, split into Data-In PDUs with GOOD status in the last one, and the
    /// read budget it holds until sent.
    DataIn {
        itt: u32,
        lun: [u8; 8],
        data: Vec<u8>,
        expected: u32,
        budget: Vec<OwnedSemaphorePermit>,
    },
}

/// The full feature phase: PDUs are decoded here in order; reads run on the blocking pool
/// (up to [`CMD_WINDOW`] at once) and everything is answered through one writer task.
async fn full_feature<R, W>(
    mut rd: R,
    wr: W,
    session: Session,
    local: Option<SocketAddr>,
    shared: &Shared,
    live: &sessions::Guard,
) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let exp_cmd_sn = Arc::new(AtomicU32::new(session.exp_cmd_sn));
    let (tx, rx) = mpsc::channel::<Out>(CMD_WINDOW as usize);
    // PDUs written so far: a connection whose answers are still going out is not idle.
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        session.stat_sn,
        exp_cmd_sn.clone(),
        session.params,
        written.clone(),
    ));
    let in_flight = Arc::new(Semaphore::new(CMD_WINDOW as usize));
    let connection_budget = Arc::new(Semaphore::new(CONNECTION_BUDGET));
    let unit = match &session.kind {
        Kind::Normal { id, manifest } => Some(unit(*id, manifest)),
        Kind::Discovery => None,
    };
    let portal = local.map(text::portal_address).unwrap_or_default();
    let mut checked = Instant::now();
    let mut exchange = text::Exchange::default();
    let mut ping = Ping::default();
    let mut seen_written = 0u64;
    let ended: io::Result<()> = loop {
        let next = match shared.nop {
            None => read_pdu(&mut rd).await?.map_or(Next::End, Next::Pdu),
            Some(nop) => next_pdu(&mut rd, nop, ping.outstanding.is_some()).await?,
        };
        let (h, data) = match next {
            Next::Pdu(Pdu { header, data }) => (header, data),
            Next::End => break Ok(()),
            Next::Silent => {
                let Some(nop) = shared.nop else {
                    continue;
                };
                if let Some(ttt) = ping.outstanding {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no answer to NOP-In ping {ttt:#x} within {} s",
                            nop.timeout.as_secs()
                        ),
                    ));
                }
                if in_flight.available_permits() < CMD_WINDOW as usize {
                    continue; // not idle: commands of its are still being answered
                }
                // Read data not yet written (it holds its connection budget until sent): an
                // initiator taking it slowly could not see a ping queued behind it. Not idle
                // while the writes go on; one that stopped reading is pinged like any other.
                let now_written = written.load(Ordering::Relaxed);
                let unsent = connection_budget.available_permits() < CONNECTION_BUDGET;
                if unsent && now_written != seen_written {
                    seen_written = now_written;
                    continue;
                }
                // ITT reserved, TTT ours: a ping that wants a NOP-Out back. It does not
                // advance StatSN (§11.19), and is sent on LUN 0, the only one there is.
                let ttt = ping.start();
                let bhs = pdu::nop_in(pdu::RESERVED_TAG, ttt, [0; 8], 0);
                match tokio::time::timeout(nop.timeout, send(&tx, bhs, Vec::new(), false)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(())) => break Ok(()),
                    Err(_) => {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the initiator reads nothing: a NOP-In ping could not be queued",
                        ));
                    }
                }
            }
        };
        // Any PDU shows the initiator is there, the NOP-Out answering our ping or another.
        if let Some(ttt) = ping.outstanding.take()
            && h.opcode == pdu::OP_NOP_OUT
            && h.word20() == ttt
        {
            tracing::debug!("NOP-In ping {ttt:#x} answered");
        }
        if h.opcode == pdu::OP_SCSI_CMD
            && !still_alive(&session.principal, &shared.reader, &mut checked).await
        {
            break Err(io::Error::other(
                "the ISO boot's token died (the host was released or booted again)",
            ));
        }
        // Non-immediate commands take a CmdSN; TCP keeps them in order on one connection.
        let numbered = matches!(
            h.opcode,
            pdu::OP_SCSI_CMD | pdu::OP_TASK_MGMT | pdu::OP_TEXT | pdu::OP_LOGOUT | pdu::OP_NOP_OUT
        );
        if numbered && !h.immediate {
            let next = h.cmd_sn().wrapping_add(1);
            let exp = exp_cmd_sn.load(Ordering::Relaxed);
            if (next.wrapping_sub(exp) as i32) > 0 {
                exp_cmd_sn.store(next, Ordering::Relaxed);
            }
        }
        let sent = match h.opcode {
            pdu::OP_NOP_OUT => {
                if h.itt() == pdu::RESERVED_TAG {
                    continue; // the answer to a ping of ours, or one that wants no answer
                }
                let mut echo = data;
                echo.truncate(session.params.max_send as usize);
                send(
                    &tx,
                    pdu::nop_in(h.itt(), pdu::RESERVED_TAG, h.lun(), echo.len()),
                    echo,
                    true,
                )
                .await
            }
            pdu::OP_SCSI_CMD => match &unit {
                Some((unit, manifest)) => {
                    live.command();
                    let io = Io {
                        shared,
                        in_flight: &in_flight,
                        connection_budget: &connection_budget,
                        tx: &tx,
                        live,
                    };
                    command(&h, unit, manifest, &io).await
                }
                None => reject(&tx, &h, pdu::REJECT_PROTOCOL_ERROR).await,
            },
            pdu::OP_TASK_MGMT => {
                let function = h.flags() & 0x7f;
                let response = match function {
                    pdu::TMF_ABORT_TASK
                    | pdu::TMF_ABORT_TASK_SET
                    | pdu::TMF_CLEAR_TASK_SET
                    | pdu::TMF_LUN_RESET
                    | pdu::TMF_TARGET_WARM_RESET => {
                        // Reads are short: the tasks are done once the commands in flight
                        // are, and their answers are queued ahead of this one.
                        let _all = in_flight.acquire_many(CMD_WINDOW).await;
                        pdu::TMF_COMPLETE
                    }
                    _ => pdu::TMF_NOT_SUPPORTED,
                };
                send(&tx, pdu::task_response(h.itt(), response), Vec::new(), true).await
            }
            pdu::OP_TEXT => {
                let max = session.params.max_send as usize;
                let (cont, fin) = (
                    h.flags() & pdu::FLAG_CONTINUE != 0,
                    h.flags() & pdu::FLAG_FINAL != 0,
                );
                let reply = match exchange.request(h.itt(), h.word20(), cont, fin, &data, max) {
                    text::Step::Reply(reply) => Ok(reply),
                    text::Step::Whole(request) => {
                        match text::answer(&request, &session, &portal, &shared.reader).await {
                            Ok(answer) => Ok(exchange.answer(h.itt(), answer, max)),
                            Err(()) => Err(("a Text Request that is not key=value text", false)),
                        }
                    }
                    text::Step::Refused { why, close } => Err((why, close)),
                };
                match reply {
                    Ok(text::Reply { flow, data }) => {
                        let bhs = pdu::text_response(h.itt(), h.lun(), flow, data.len());
                        send(&tx, bhs, data, true).await
                    }
                    Err((why, close)) => {
                        tracing::info!(initiator = %session.initiator, "iSCSI text refused: {why}");
                        let rejected = reject(&tx, &h, pdu::REJECT_PROTOCOL_ERROR).await;
                        if close {
                            // The writer sends the reject before the connection closes.
                            break Ok(());
                        }
                        rejected
                    }
                }
            }
            pdu::OP_LOGOUT => {
                let _all = in_flight.acquire_many(CMD_WINDOW).await;
                let _ = send(&tx, pdu::logout_response(h.itt()), Vec::new(), true).await;
                break Ok(());
            }
            // Write data for a command already refused (we never send R2T): dropped.
            pdu::OP_DATA_OUT => Ok(()),
            // SNACK needs error recovery level 1; a login in full feature phase is an error.
            _ => reject(&tx, &h, pdu::REJECT_COMMAND_NOT_SUPPORTED).await,
        };
        if sent.is_err() {
            break Ok(()); // the writer failed: its error is reported below
        }
    };
    drop(tx);
    if ended.is_err() {
        // The connection is being dropped (a dead initiator, a dead token): the writer may be
        // stuck sending to a peer that reads nothing, and nothing it still holds is owed.
        writer.abort();
        return ended;
    }
    let written = writer
        .await
        .map_err(|e| io::Error::other(format!("iSCSI writer task failed: {e}")))?;
    ended.and(written)
}

/// What the full feature phase waits for next.
#[derive(Debug)]
enum Next {
    Pdu(Pdu),
    /// A clean end of stream.
    End,
    /// Nothing arrived for the interval (or, with a ping outstanding, its timeout).
    Silent,
}

/// The next PDU, or [`Next::Silent`] when nothing starts to arrive within `nop.interval` (or
/// `nop.timeout` when `pinged`). Only the wait for a PDU's first byte is cut short — cancelling
/// `fill_buf` loses nothing — and a PDU that has started must be whole within the interval and
/// the timeout together, or the connection closes: a peer that stalls half-way is as dead as a
/// silent one.
async fn next_pdu<R: AsyncBufRead + Unpin>(rd: &mut R, nop: Nop, pinged: bool) -> io::Result<Next> {
    let wait = if pinged { nop.timeout } else { nop.interval };
    let arrived = tokio::select! {
        buffered = rd.fill_buf() => buffered.map(|b| !b.is_empty())?,
        () = tokio::time::sleep(wait) => return Ok(Next::Silent),
    };
    if !arrived {
        return Ok(Next::End);
    }
    let whole = nop.interval + nop.timeout;
    match tokio::time::timeout(whole, read_pdu(rd)).await {
        Ok(pdu) => Ok(pdu?.map_or(Next::End, Next::Pdu)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "a PDU started but was not whole within {} s",
                whole.as_secs()
            ),
        )),
    }
}

/// The connection's NOP-In ping, if one is outstanding, and the tags it uses.
#[derive(Debug, Default)]
struct Ping {
    /// The Target Transfer Tag of the ping awaiting an answer.
    outstanding: Option<u32>,
    last: u32,
}

impl Ping {
    /// Starts a ping: its tag, never the reserved one (a ping with the reserved tag asks for
    /// no answer).
    fn start(&mut self) -> u32 {
        self.last = self.last % 0x7fff_ffff + 1;
        self.outstanding = Some(self.last);
        self.last
    }
}

/// Whether the session's principal may still read: an ISO boot token is looked up again
/// every [`TOKEN_RECHECK`] (a catalog error counts as dead), a caller always may.
async fn still_alive(principal: &Principal, reader: &Reader, checked: &mut Instant) -> bool {
    let Principal::BootToken { hash, .. } = principal else {
        return true;
    };
    if checked.elapsed() < TOKEN_RECHECK {
        return true;
    }
    let hash = hash.clone();
    let alive = reader.catalog.run(move |c| iso::alive(c, &hash)).await;
    *checked = Instant::now();
    alive.unwrap_or(false)
}

/// Queues one PDU for the writer; `Err` once the writer is gone.
async fn send(
    tx: &mpsc::Sender<Out>,
    bhs: [u8; pdu::BHS_LEN],
    data: Vec<u8>,
    status: bool,
) -> Result<(), ()> {
    tx.send(Out::Pdu { bhs, data, status })
        .await
        .map_err(|_| ())
}

async fn reject(tx: &mpsc::Sender<Out>, h: &Header, reason: u8) -> Result<(), ()> {
    send(tx, pdu::reject(reason), h.bhs.to_vec(), true).await
}

/// The unit image `id` is: its size in 512-byte blocks (rounded up) and its names.
fn unit(id: Uuid, manifest: &Arc<Manifest>) -> (scsi::Unit, Arc<Manifest>) {
    let unit = scsi::Unit {
        blocks: manifest.virtual_size().div_ceil(u64::from(scsi::BLOCK_LEN)),
        serial: id.simple().to_string(),
        target: target_name(id),
    };
    (unit, manifest.clone())
}

/// What a command needs of its connection: the shared reader and budgets, the connection's
/// window and budget, its writer and its session's counters.
struct Io<'a> {
    shared: &'a Shared,
    in_flight: &'a Arc<Semaphore>,
    connection_budget: &'a Arc<Semaphore>,
    tx: &'a mpsc::Sender<Out>,
    live: &'a sessions::Guard,
}

/// Runs one SCSI command: the pure part answers at once, a read is queued.
async fn command(
    h: &Header,
    unit: &scsi::Unit,
    manifest: &Arc<Manifest>,
    io: &Io<'_>,
) -> Result<(), ()> {
    let Io {
        shared,
        in_flight,
        connection_budget,
        tx,
        live,
    } = *io;
    let mut cdb = [0u8; 16];
    cdb.copy_from_slice(&h.bhs[32..48]);
    let (itt, lun, expected) = (h.itt(), h.lun(), h.word20());
    let out = match scsi::execute(&cdb, lun == [0; 8], unit) {
        scsi::Reply::Good => Out::Pdu {
            bhs: pdu::scsi_response(itt, scsi::GOOD, residual(expected, 0), 0),
            data: Vec::new(),
            status: true,
        },
        scsi::Reply::Data(data) => Out::DataIn {
            itt,
            lun,
            data,
            expected,
            budget: Vec::new(),
        },
        scsi::Reply::Check(sense) => check_condition(itt, sense),
        scsi::Reply::Read { lba, blocks } => {
            let len = blocks as usize * scsi::BLOCK_LEN as usize;
            let (Ok(slot), Ok(mine), Ok(global)) = (
                in_flight.clone().acquire_owned().await,
                connection_budget
                    .clone()
                    .acquire_many_owned(len as u32)
                    .await,
                shared.buffers.clone().acquire_many_owned(len as u32).await,
            ) else {
                return Err(());
            };
            let (reader, manifest, tx) = (shared.reader.clone(), manifest.clone(), tx.clone());
            let live: Arc<Live> = live.live();
            tokio::task::spawn_blocking(move || {
                let offset = lba * u64::from(scsi::BLOCK_LEN);
                let out = match read_padded(&reader, &manifest, offset, len) {
                    Ok(data) => {
                        live.read(len as u64);
                        Out::DataIn {
                            itt,
                            lun,
                            data,
                            expected,
                            budget: vec![mine, global],
                        }
                    }
                    Err(e) => {
                        tracing::error!(offset, len, "iSCSI read failed: {e}");
                        check_condition(itt, scsi::MEDIUM_ERROR)
                    }
                };
                let _ = tx.blocking_send(out);
                drop(slot);
            });
            return Ok(());
        }
    };
    tx.send(out).await.map_err(|_| ())
}

/// `len` bytes of the disk at `offset`; past the image's end (its last block's padding to
/// 512 bytes) zeros.
fn read_padded(
    reader: &Reader,
    manifest: &Manifest,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, crate::error::ApiError> {
    let mut data = vec![0u8; len];
    let size = manifest.virtual_size();
    let stored = size.saturating_sub(offset).min(len as u64) as usize;
    reader.read_at(manifest, offset, &mut data[..stored])?;
    Ok(data)
}

fn check_condition(itt: u32, sense: scsi::Sense) -> Out {
    let mut data = (18u16).to_be_bytes().to_vec();
    data.extend_from_slice(&scsi::sense_data(sense));
    Out::Pdu {
        bhs: pdu::scsi_response(itt, scsi::CHECK_CONDITION, None, data.len()),
        data,
        status: true,
    }
}

/// The residual of a command that moves `actual` bytes where the initiator expected
/// `expected`: (overflow?, count), or `None` when they match.
fn residual(expected: u32, actual: usize) -> Option<(bool, u32)> {
    let actual = u32::try_from(actual).unwrap_or(u32::MAX);
    match actual.cmp(&expected) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some((true, actual - expected)),
        std::cmp::Ordering::Less => Some((false, expected - actual)),
    }
}

/// The connection's writer: sends what it is given in order, numbering as it goes.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    mut stat_sn: u32,
    exp_cmd_sn: Arc<AtomicU32>,
    params: Params,
    written: Arc<AtomicU64>,
) -> io::Result<()> {
    let numbers = |bhs: &mut [u8; pdu::BHS_LEN], stat_sn: u32| {
        let exp = exp_cmd_sn.load(Ordering::Relaxed);
        pdu::set_numbers(bhs, stat_sn, exp, exp.wrapping_add(CMD_WINDOW - 1));
    };
    while let Some(out) = rx.recv().await {
        match out {
            Out::Pdu {
                mut bhs,
                data,
                status,
            } => {
                numbers(&mut bhs, stat_sn);
                if status {
                    stat_sn = stat_sn.wrapping_add(1);
                }
                write_pdu(&mut wr, &bhs, &data).await?;
            }
            Out::DataIn {
                itt,
                lun,
                data,
                expected,
                budget,
            } => {
                let sent = data.len().min(expected as usize);
                let residual = residual(expected, data.len());
                if sent == 0 {
                    let mut bhs = pdu::scsi_response(itt, scsi::GOOD, residual, 0);
                    numbers(&mut bhs, stat_sn);
                    stat_sn = stat_sn.wrapping_add(1);
                    write_pdu(&mut wr, &bhs, &[]).await?;
                    continue;
                }
                let max_pdu = params.max_send as usize;
                let burst = params.max_burst as usize;
                let mut offset = 0;
                let mut data_sn = 0u32;
                while offset < sent {
                    // A PDU ends at the initiator's segment limit, the end of a burst, or
                    // the end of the data.
                    let burst_left = burst - offset % burst;
                    let len = (sent - offset).min(max_pdu).min(burst_left);
                    let last = offset + len == sent;
                    let mut bhs = pdu::data_in(&pdu::DataIn {
                        itt,
                        lun,
                        data_sn,
                        offset: offset as u32,
                        len,
                        final_pdu: len == burst_left,
                        status: last.then_some((scsi::GOOD, residual)),
                    });
                    numbers(&mut bhs, stat_sn);
                    if last {
                        stat_sn = stat_sn.wrapping_add(1);
                    }
                    write_pdu(&mut wr, &bhs, &data[offset..offset + len]).await?;
                    written.fetch_add(1, Ordering::Relaxed);
                    offset += len;
                    data_sn = data_sn.wrapping_add(1);
                }
                drop(budget);
            }
        }
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    wr.shutdown().await
}

async fn write_pdu<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bhs: &[u8; pdu::BHS_LEN],
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(bhs).await?;
    wr.write_all(data).await?;
    let pad = pdu::padded(data.len()) - data.len();
    wr.write_all(&[0u8; 3][..pad]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_round_trip() {
        let id = Uuid::new_v4();
        assert_eq!(target_id(&target_name(id)), Some(id));
        assert_eq!(
            target_id(&target_name(id).to_uppercase()),
            Some(id),
            "names compare case-insensitively"
        );
        assert_eq!(target_id("iqn.2026-11.io.kagami:nope"), None);
        assert_eq!(target_id("iqn.2003-01.org.linux-iscsi:x"), None);
    }

    #[test]
    fn residuals() {
        assert_eq!(residual(512, 512), None);
        assert_eq!(residual(512, 36), Some((false, 476)));
        assert_eq!(residual(36, 66), Some((true, 30)));
    }

    #[test]
    fn ping_tags_are_never_reserved_and_change() {
        let mut ping = Ping::default();
        assert_eq!(ping.start(), 1);
        assert_eq!(ping.outstanding, Some(1));
        assert_eq!(ping.start(), 2);
        ping.last = 0x7fff_fffe;
        assert_eq!(ping.start(), 0x7fff_ffff);
        assert_eq!(ping.start(), 1, "wraps before reaching the reserved tag");
    }
}
