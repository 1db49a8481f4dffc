//! A read-only NBD export of every image (`[nbd] listen`, `kagami serve --nbd-listen`): what
//! `nbdcopy`, `nbdinfo`, `qemu-img` and `qemu-nbd`/the kernel client use to read an image as a
//! block device without copying it first.
//!
//! **Protocol.** Fixed newstyle negotiation only (every current client), with
//! `OPT_EXPORT_NAME`, `OPT_INFO`/`OPT_GO`, `OPT_LIST`, `OPT_ABORT`, `OPT_STRUCTURED_REPLY` and
//! `OPT_LIST`/`OPT_SET_META_CONTEXT` for `base:allocation`; then `CMD_READ`, `CMD_DISC` and
//! `CMD_BLOCK_STATUS`, whose extents come from the manifest (a hole block or segment is
//! `hole,zero`), so clients skip holes without reading them. Writes, trims and write-zeroes get
//! `EPERM`; everything else `EINVAL`. Reads go through [`Reader::read_at`] and are verified
//! block by block like every other read; a corrupt block is an `EIO` with a message.
//!
//! **Why our own code.** The crates that exist (`nbd` 0.3: blocking, no structured replies or
//! block status; `tokio-nbd` 0.x: young, one backend trait per export) would still leave us the
//! parts that matter here — export names checked against the catalog at `OPT_GO`, allocation
//! from the manifest, limits on every length — and the protocol subset is small: the codec is
//! `proto.rs`, std-only, fuzzed.
//!
//! **Access.** NBD has no authentication, so the export name carries it: `<image-id>/<token>`,
//! where the token is any bearer token allowed to read the image (checked by the catalog's
//! tenancy rules, as for `GET /v1/images/{id}/content`). A wrong token is refused with
//! `ERR_POLICY`; an image the token may not see, or that is not active, with `ERR_UNKNOWN`
//! (the same answer as a missing one). `OPT_LIST` lists nothing: every name is a secret.
//! Without TLS the token crosses the network in clear, as the HTTP API's does over plain HTTP:
//! keep the port on the provisioning network. Only project tokens open exports here: an ISO
//! boot's per-boot token reads its image over HTTP or iSCSI, never over NBD.
//!
//! **Sessions.** A connection past negotiation is listed in [`super::sessions`] (`GET
//! /v1/exports`, `kagami export list`) with its token's project and role, until it ends.
//!
//! **Limits.** Options up to 16 KiB and 64 of them per negotiation, which must end within
//! [`HANDSHAKE_TIMEOUT`]; requests up to 32 MiB; [`IN_FLIGHT`] requests per connection; at most
//! [`BUFFER_BUDGET`] bytes of read buffers across all connections; [`MAX_CONNECTIONS`].

pub mod proto;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use kagami_images::{BLOCK_SIZE, Manifest, SEGMENT_BLOCKS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use uuid::Uuid;

use self::proto::{Action, Opt};
use super::sessions::{self, Opened, Protocol, Sessions, Who};
use super::{BufferPool, Reader, block_at};
use crate::catalog::images::parse_id;
use crate::catalog::tenancy;
use crate::config::Config;
use crate::error::ApiError;

/// The whole negotiation must end within this: a client that connects and says nothing holds
/// no connection slot for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options in one negotiation (clients send fewer than ten).
const MAX_OPTIONS: usize = 64;
/// Requests of one connection being served at once (clients pipeline; nbdcopy keeps 64 in
/// flight per connection); more wait in the socket.
pub const IN_FLIGHT: usize = 16;
/// Reply buffers kept for reuse across connections, in bytes.
pub const SPARE_BUDGET: usize = 32 << 20;
/// Read buffers across all connections, in bytes: memory stays bounded however many clients
/// ask for 32 MiB each.
pub const BUFFER_BUDGET: usize = 256 << 20;
/// Connections at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 512;
/// `base:allocation` descriptors in one reply (a client asks again from where it stopped).
const MAX_EXTENTS: usize = 16384;

/// The NBD listener and what its connections share.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    reader: Reader,
    buffers: Arc<Semaphore>,
    /// Reply buffers for reuse, across connections.
    spare: BufferPool,
    sessions: Sessions,
}

impl Server {
    /// Binds `nbd.listen`, or returns `None` when it is empty (NBD off). Open connections are
    /// registered in `sessions`.
    pub async fn from_config(
        config: &Config,
        reader: Reader,
        sessions: Sessions,
    ) -> anyhow::Result<Option<Server>> {
        let Some(addr) = config.nbd.listen_addr()? else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for NBD on {addr} (nbd.listen / --nbd-listen)")
        })?;
        Ok(Some(Server {
            listener,
            shared: Arc::new(Shared {
                reader,
                buffers: Arc::new(Semaphore::new(BUFFER_BUDGET)),
                spare: BufferPool::new(SPARE_BUDGET),
                sessions,
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
            "NBD",
            MAX_CONNECTIONS,
            move |stream, peer| connection(stream, peer, shared.clone()),
        )
        .await;
    }
}

/// An export a client opened: the image, its manifest, and whose token opened it.
#[derive(Debug)]
struct Export {
    id: Uuid,
    manifest: Arc<Manifest>,
    caller: tenancy::Caller,
}

/// Why an export name was refused, as the option error the client gets.
#[derive(Debug)]
struct Refusal {
    reply: u32,
    message: String,
}

impl Refusal {
    fn policy(message: &str) -> Refusal {
        Refusal {
            reply: proto::REP_ERR_POLICY,
            message: message.into(),
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        Refusal {
            reply: proto::REP_ERR_UNKNOWN,
            message: e.to_string(),
        }
    }
}

/// Checks an export name (`<image-id>/<token>`) against the catalog: the token must exist and
/// be allowed to read the image.
fn authorize(conn: &rusqlite::Connection, name: &str) -> Result<(Uuid, tenancy::Caller), Refusal> {
    const FORM: &str = "export names are <image-id>/<token>, with a token allowed to read the image (see `kagami image export-nbd`)";
    let (id, secret) = name.split_once('/').ok_or_else(|| Refusal::policy(FORM))?;
    let id = parse_id(id).map_err(|_| Refusal::policy(FORM))?;
    if secret.is_empty() || secret.len() > 256 {
        return Err(Refusal::policy(FORM));
    }
    let caller = tenancy::authenticate(conn, secret)?
        .ok_or_else(|| Refusal::policy("the token in the export name is not valid"))?;
    Ok((id, caller))
}

/// Authorizes `name` and loads its image's manifest.
fn open(conn: &rusqlite::Connection, name: &str) -> Result<Export, Refusal> {
    let (id, caller) = authorize(conn, name)?;
    let manifest = super::open_image(conn, &caller, id)?;
    Ok(Export {
        id,
        manifest,
        caller,
    })
}

/// What negotiation settled.
#[derive(Debug)]
struct Session {
    export: Export,
    structured: bool,
    /// `base:allocation` was selected for this export.
    allocation: bool,
}

impl Session {
    fn flags(&self) -> u16 {
        transmission_flags(self.structured)
    }
}

/// Read-only; every connection sees the same bytes, so clients may open several (`multi-conn`);
/// DF only means something with structured replies.
fn transmission_flags(structured: bool) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_READ_ONLY | proto::FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= proto::FLAG_SEND_DF;
    }
    flags
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    // Replies are written whole; small ones (block status, errors) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        negotiate(&mut rd, &mut wr, &shared.reader),
    )
    .await
    {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "NBD negotiation ended: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "NBD negotiation timed out");
            return;
        }
    };
    let image = session.export.id;
    tracing::info!(%peer, %image, "NBD client connected");
    let live = shared.sessions.open(Opened {
        protocol: Protocol::Nbd,
        peer,
        image: Some(image),
        who: Who::caller(&session.export.caller),
        initiator: None,
    });
    match transmit(rd, wr, session, &shared, &live).await {
        Ok(()) => tracing::info!(%peer, %image, "NBD client disconnected"),
        Err(e) => tracing::info!(%peer, %image, "NBD connection ended: {e}"),
    }
}

/// Runs the option haggling; `Some` when the client entered transmission with an export.
async fn negotiate<R, W>(rd: &mut R, wr: &mut W, reader: &Reader) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let client = match proto::decode_client_flags(flags) {
        Ok(f) if f.fixed_newstyle => f,
        // Unknown flags: the protocol says to close. Plain newstyle: no client needs it.
        _ => return Ok(None),
    };
    let mut structured = false;
    // The export SET_META_CONTEXT named, and whether base:allocation was selected for it.
    let mut meta: Option<(String, bool)> = None;
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        rd.read_exact(&mut header).await?;
        let Ok((option, len)) = proto::decode_option_header(header) else {
            return Ok(None); // out of step: nothing after this can be trusted
        };
        let reply = |kind, message: &str| proto::option_reply(option, kind, message.as_bytes());
        if len > proto::MAX_OPTION_LEN {
            let too_big = format!("options are at most {} bytes", proto::MAX_OPTION_LEN);
            wr.write_all(&reply(proto::REP_ERR_TOO_BIG, &too_big))
                .await?;
            wr.flush().await?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let opt = match proto::decode_option(option, &data) {
            Ok(opt) => opt,
            Err(e) => {
                wr.write_all(&reply(proto::REP_ERR_INVALID, &e.to_string()))
                    .await?;
                wr.flush().await?;
                continue;
            }
        };
        match opt {
            Opt::ExportName(name) => {
                // No way to answer an error here but to close (the protocol's own rule).
                let Ok(export) = open_export(reader, name).await else {
                    return Ok(None);
                };
                let session = session(export, structured, &meta, name);
                let size = session.export.manifest.virtual_size();
                let answer = proto::export_name_reply(size, session.flags(), client.no_zeroes);
                wr.write_all(&answer).await?;
                wr.flush().await?;
                return Ok(Some(session));
            }
            Opt::Abort => {
                wr.write_all(&reply(proto::REP_ACK, "")).await?;
                wr.flush().await?;
                return Ok(None);
            }
            // Every export name holds a token: there is nothing to list.
            Opt::List => wr.write_all(&reply(proto::REP_ACK, "")).await?,
            Opt::StartTls => {
                let msg = "TLS is not offered; reach the NBD port over the provisioning network";
                wr.write_all(&reply(proto::REP_ERR_UNSUP, msg)).await?;
            }
            Opt::StructuredReply => {
                structured = true;
                wr.write_all(&reply(proto::REP_ACK, "")).await?;
            }
            Opt::Info { go, name, .. } => match open_export(reader, name).await {
                Err(refusal) => {
                    wr.write_all(&reply(refusal.reply, &refusal.message))
                        .await?
                }
                Ok(export) => {
                    let session = session(export, structured, &meta, name);
                    let size = session.export.manifest.virtual_size();
                    wr.write_all(&proto::info_export(option, size, session.flags()))
                        .await?;
                    // Any offset and length work; 64 KiB is what the store reads and verifies.
                    wr.write_all(&proto::info_block_size(
                        option,
                        1,
                        BLOCK_SIZE as u32,
                        proto::MAX_REQUEST_LEN,
                    ))
                    .await?;
                    wr.write_all(&reply(proto::REP_ACK, "")).await?;
                    if go {
                        wr.flush().await?;
                        return Ok(Some(session));
                    }
                }
            },
            Opt::MetaContext { set, name, queries } => {
                if set && !structured {
                    let msg = "negotiate structured replies before SET_META_CONTEXT";
                    wr.write_all(&reply(proto::REP_ERR_INVALID, msg)).await?;
                } else {
                    let who = name.to_string();
                    let checked = reader.catalog.run(move |c| Ok(authorize(c, &who))).await;
                    match checked.map_err(Refusal::from).and_then(|r| r) {
                        Err(refusal) => {
                            wr.write_all(&reply(refusal.reply, &refusal.message))
                                .await?
                        }
                        Ok(_) => {
                            let chosen = wants_allocation(set, &queries);
                            if chosen {
                                wr.write_all(&proto::meta_context(
                                    option,
                                    proto::BASE_ALLOCATION_ID,
                                    proto::BASE_ALLOCATION,
                                ))
                                .await?;
                            }
                            wr.write_all(&reply(proto::REP_ACK, "")).await?;
                            if set {
                                meta = Some((name.to_string(), chosen));
                            }
                        }
                    }
                }
            }
            Opt::Unknown(_) => {
                let msg = "this option is not supported by Kagami's read-only export";
                wr.write_all(&reply(proto::REP_ERR_UNSUP, msg)).await?;
            }
        }
        wr.flush().await?;
    }
    Ok(None)
}

async fn open_export(reader: &Reader, name: &str) -> Result<Export, Refusal> {
    let name = name.to_string();
    reader
        .catalog
        .run(move |c| Ok(open(c, &name)))
        .await
        .map_err(Refusal::from)?
}

fn session(export: Export, structured: bool, meta: &Option<(String, bool)>, name: &str) -> Session {
    // Contexts chosen for another export name do not carry over (the protocol's rule).
    let allocation = structured
        && meta
            .as_ref()
            .is_some_and(|(n, chosen)| *chosen && n == name);
    Session {
        export,
        structured,
        allocation,
    }
}

/// Whether the queries select (or, for LIST, name) `base:allocation`. LIST with no query lists
/// every context; SET with none selects none.
fn wants_allocation(set: bool, queries: &[&str]) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries
        .iter()
        .any(|q| *q == proto::BASE_ALLOCATION || (!set && *q == "base:"))
}

/// A reply for the writer task, with the read-buffer budget it holds until it is sent.
type Outgoing = (Bytes, Option<OwnedSemaphorePermit>);

/// The transmission phase: requests are decoded here in order and answered concurrently (reads
/// on the blocking pool, up to [`IN_FLIGHT`]); one writer task sends each reply whole, in the
/// order they complete, which the protocol allows (cookies match them up).
async fn transmit<R, W>(
    mut rd: R,
    mut wr: W,
    session: Session,
    shared: &Shared,
    live: &sessions::Guard,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((bytes, budget)) = rx.recv().await {
            wr.write_all(&bytes).await?;
            drop(budget);
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    });
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let size = session.export.manifest.virtual_size();
    let ended = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            // A client that hangs up without CMD_DISC (nbdinfo does) is not an error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Ok(req) = proto::decode_request(header) else {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        };
        let send = |bytes: Vec<u8>| tx.send((Bytes::from(bytes), None));
        live.command();
        match proto::check(&req, size, session.structured, session.allocation) {
            Action::Disconnect => break Ok(()),
            Action::Close => {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write payload too large",
                ));
            }
            Action::Refuse { error, skip } => {
                let dropped =
                    tokio::io::copy(&mut (&mut rd).take(u64::from(skip)), &mut tokio::io::sink())
                        .await?;
                if dropped < u64::from(skip) {
                    break Ok(());
                }
                let reply = if session.structured {
                    proto::error_chunk(req.cookie, error, refusal_text(error))
                } else {
                    proto::simple_reply(req.cookie, error).to_vec()
                };
                if send(reply).await.is_err() {
                    break Ok(());
                }
            }
            Action::BlockStatus { offset, len, one } => {
                let extents = allocation(&session.export.manifest, offset, len, one);
                let reply =
                    proto::block_status_chunk(req.cookie, proto::BASE_ALLOCATION_ID, &extents);
                if send(reply).await.is_err() {
                    break Ok(());
                }
            }
            Action::Read {
                offset,
                len,
                one_chunk,
            } => {
                let Ok(slot) = in_flight.clone().acquire_owned().await else {
                    break Ok(());
                };
                let Ok(budget) = shared.buffers.clone().acquire_many_owned(len.max(1)).await else {
                    break Ok(());
                };
                let (reader, spare, manifest, tx) = (
                    shared.reader.clone(),
                    shared.spare.clone(),
                    session.export.manifest.clone(),
                    tx.clone(),
                );
                let structured = session.structured;
                let live = live.live();
                tokio::task::spawn_blocking(move || {
                    let reply = read_reply(
                        &reader, &spare, &manifest, req.cookie, offset, len, structured, one_chunk,
                    )
                    .inspect(|_| live.read(u64::from(len)))
                    .unwrap_or_else(|failed| failed);
                    let _ = tx.blocking_send((reply, Some(budget)));
                    drop(slot);
                });
            }
        }
    };
    // Replies still being read hold senders: the writer ends once they are sent.
    drop(tx);
    let written = writer
        .await
        .map_err(|e| io::Error::other(format!("NBD writer task failed: {e}")))?;
    ended.and(written)
}

fn refusal_text(error: u32) -> &'static str {
    match error {
        proto::EPERM => "the export is read-only",
        proto::EOVERFLOW => "requests are at most 32 MiB",
        _ => "request not supported by this read-only export",
    }
}

/// The reply to a read of `len` bytes at `offset` (within the disk, checked by the caller).
/// With structured replies a read that falls entirely in holes is a hole chunk (no data on the
/// wire) unless the client asked for one data chunk (DF). A failed read is `Err` with the
/// `EIO` reply to send instead.
#[expect(
    clippy::too_many_arguments,
    reason = "one request's fields, passed as they were decoded"
)]
fn read_reply(
    reader: &Reader,
    spare: &BufferPool,
    manifest: &Manifest,
    cookie: u64,
    offset: u64,
    len: u32,
    structured: bool,
    one_chunk: bool,
) -> Result<Bytes, Bytes> {
    if structured && !one_chunk && len > 0 && all_holes(manifest, offset, len) {
        return Ok(Bytes::from(proto::hole_chunk(cookie, offset, len)));
    }
    let header = proto::read_header(cookie, offset, len, structured);
    let at = header.len();
    let mut out = spare.take(at + len as usize);
    out[..at].copy_from_slice(&header);
    match reader.read_at(manifest, offset, &mut out[at..]) {
        Ok(()) => Ok(spare.bytes(out)),
        Err(e) => {
            tracing::error!(offset, len, "NBD read failed: {e}");
            Err(Bytes::from(if structured {
                proto::error_chunk(cookie, proto::EIO, &e.to_string())
            } else {
                proto::simple_reply(cookie, proto::EIO).to_vec()
            }))
        }
    }
}

fn all_holes(manifest: &Manifest, offset: u64, len: u32) -> bool {
    let block = BLOCK_SIZE as u64;
    let end = offset + u64::from(len);
    (offset / block..end.div_ceil(block))
        .all(|i| block_at(manifest, i).is_none_or(|id| id.is_hole()))
}

/// `base:allocation` of `offset..offset + len` as (length, state) descriptors: runs of data
/// blocks (state 0) and holes (`HOLE | ZERO`), starting at `offset` and ending at most at
/// `offset + len`; one descriptor when `one`, at most [`MAX_EXTENTS`]. A hole segment is one
/// step, so a mostly empty terabyte is described without walking its blocks.
fn allocation(manifest: &Manifest, offset: u64, len: u32, one: bool) -> Vec<(u32, u32)> {
    let block = BLOCK_SIZE as u64;
    let segment = block * SEGMENT_BLOCKS as u64;
    let end = offset + u64::from(len);
    let limit = if one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let index = pos / block;
        let hole_segment = manifest
            .segments()
            .get((pos / segment) as usize)
            .is_none_or(|s| s.is_hole());
        let (state, next) = if hole_segment {
            (
                proto::STATE_HOLE | proto::STATE_ZERO,
                (pos / segment + 1) * segment,
            )
        } else {
            let hole = block_at(manifest, index).is_none_or(|id| id.is_hole());
            let state = if hole {
                proto::STATE_HOLE | proto::STATE_ZERO
            } else {
                0
            };
            (state, (index + 1) * block)
        };
        let next = next.min(end);
        // Within `len`, which is a u32: no run overflows.
        let run = (next - pos) as u32;
        if let Some((length, _)) = out.last_mut().filter(|(_, s)| *s == state) {
            *length += run;
        } else if out.len() < limit {
            out.push((run, state));
        } else {
            break;
        }
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::manifest::Segment;
    use kagami_images::{BlockId, SEGMENT_SIZE};

    const HOLE: u32 = proto::STATE_HOLE | proto::STATE_ZERO;
    const B: u32 = BLOCK_SIZE as u32;

    /// Three segments: data blocks 0-1 and 5 in the first, a hole segment, then a short last
    /// segment of 3 blocks (the last one 100 bytes) with data in its last block.
    fn manifest() -> Manifest {
        let data = BlockId::hash(b"x");
        let mut first = vec![BlockId::HOLE; SEGMENT_BLOCKS];
        first[0] = data;
        first[1] = data;
        first[5] = data;
        let last = vec![BlockId::HOLE, BlockId::HOLE, data];
        let size = 2 * SEGMENT_SIZE as u64 + 2 * BLOCK_SIZE as u64 + 100;
        Manifest::new(
            size,
            vec![Segment::new(first), Segment::hole(), Segment::new(last)],
        )
        .expect("manifest")
    }

    #[test]
    fn allocation_follows_the_manifest() {
        let m = manifest();
        let size = m.virtual_size();
        let all = allocation(&m, 0, size as u32, false);
        assert_eq!(
            all,
            vec![
                (2 * B, 0),
                (3 * B, HOLE),
                (B, 0),
                (2 * SEGMENT_SIZE as u32 - 6 * B + 2 * B, HOLE),
                (100, 0),
            ]
        );
        assert_eq!(all.iter().map(|e| u64::from(e.0)).sum::<u64>(), size);
        // Unaligned start and end: the runs are cut at the request, not at blocks.
        assert_eq!(allocation(&m, 100, B, false), vec![(B, 0)]);
        assert_eq!(
            allocation(&m, 2 * u64::from(B) - 1, 2, false),
            vec![(1, 0), (1, HOLE)]
        );
        assert_eq!(allocation(&m, 0, 10 * B, true), vec![(2 * B, 0)]);
        assert_eq!(
            allocation(&m, SEGMENT_SIZE as u64 + 7, 4096, true),
            vec![(4096, HOLE)]
        );
    }

    #[test]
    fn holes_are_recognised_for_reads() {
        let m = manifest();
        assert!(!all_holes(&m, 0, 1));
        assert!(all_holes(&m, 2 * u64::from(B), 3 * B));
        assert!(!all_holes(&m, 2 * u64::from(B), 3 * B + 1));
        assert!(all_holes(&m, SEGMENT_SIZE as u64, SEGMENT_SIZE as u32));
    }

    #[test]
    fn context_queries() {
        assert!(wants_allocation(false, &[]));
        assert!(!wants_allocation(true, &[]));
        assert!(wants_allocation(false, &["base:"]));
        assert!(!wants_allocation(true, &["base:"]));
        assert!(wants_allocation(true, &["qemu:x", proto::BASE_ALLOCATION]));
        assert!(!wants_allocation(true, &["qemu:dirty-bitmap:x"]));
    }
}
