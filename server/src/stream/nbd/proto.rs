//! The NBD wire protocol (the `proto.md` of the NetworkBlockDevice project): fixed newstyle
//! negotiation and the transmission phase, as pure decoders with limits and plain encoders.
//!
//! This file depends on `std` alone, so the cargo-fuzz target (`fuzz/fuzz_targets/nbd.rs`)
//! includes it as it is; [`fuzz`] is the entry point that target and the seeded property test
//! below share. No decoder panics or allocates beyond its limits, whatever the bytes: every
//! length read off the wire is checked against a limit before anything is read or reserved.

use std::fmt;

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the server's greeting, and the magic that starts every option a client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Starts every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags of an export.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_*` items of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values of replies (the protocol's own numbering, equal to Linux errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

/// The one metadata context served, and the id the server gives it.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload accepted. The protocol caps strings at 4096 bytes; a
/// SET_META_CONTEXT with a name and a few queries fits well within this.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest export name or context query (the protocol's own string limit).
pub const MAX_STRING: usize = 4096;
/// Information requests in one INFO/GO (there are four kinds; repeats are pointless).
pub const MAX_INFO_REQUESTS: usize = 32;
/// Context queries in one LIST/SET_META_CONTEXT.
pub const MAX_QUERIES: usize = 64;
/// Largest read (and largest write payload skipped): 32 MiB, what qemu and nbdkit also cap
/// requests at; the server advertises it as the maximum block size.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Why bytes from a client are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A message whose magic is wrong: the stream is out of step and cannot be trusted again.
    BadMagic,
    /// Client flags this server does not know (the protocol says to close).
    UnknownClientFlags(u32),
    /// A string longer than [`MAX_STRING`], or not UTF-8.
    BadString,
    /// More information requests or queries than the limits allow.
    TooMany,
    /// The payload's own lengths do not add up to its size.
    Malformed(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic => write!(f, "wrong magic number"),
            ProtoError::UnknownClientFlags(v) => write!(f, "unknown client flags {v:#x}"),
            ProtoError::BadString => {
                write!(f, "a name longer than {MAX_STRING} bytes, or not UTF-8")
            }
            ProtoError::TooMany => write!(f, "too many information requests or queries"),
            ProtoError::Malformed(what) => write!(f, "malformed option: {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// The server's greeting: magic, `IHAVEOPT`, and the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What a client asked for in its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn decode_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let v = u32::from_be_bytes(bytes);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if v & !known != 0 {
        return Err(ProtoError::UnknownClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: which option, and how many payload bytes follow (checked against
/// [`MAX_OPTION_LEN`] by the caller, who may want to answer `ERR_TOO_BIG` first).
pub fn decode_option_header(bytes: [u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), ProtoError> {
    if u64::from_be_bytes(take(&bytes, 0)) != IHAVEOPT {
        return Err(ProtoError::BadMagic);
    }
    Ok((
        u32::from_be_bytes(take(&bytes, 8)),
        u32::from_be_bytes(take(&bytes, 12)),
    ))
}

/// A decoded option; names borrow from the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opt<'a> {
    ExportName(&'a str),
    Abort,
    List,
    StartTls,
    /// INFO (`go` false) or GO: an export name and the information items asked for.
    Info {
        go: bool,
        name: &'a str,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// LIST (`set` false) or SET_META_CONTEXT: an export name and context queries.
    MetaContext {
        set: bool,
        name: &'a str,
        queries: Vec<&'a str>,
    },
    /// Anything else, answered `ERR_UNSUP`.
    Unknown(u32),
}

/// Decodes an option's payload. An error here leaves the stream in step (the payload's length
/// was framed): the server answers `ERR_INVALID` and negotiation goes on.
pub fn decode_option(option: u32, data: &[u8]) -> Result<Opt<'_>, ProtoError> {
    let empty = |opt: Opt<'static>| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(ProtoError::Malformed("this option carries no data"))
        }
    };
    match option {
        OPT_EXPORT_NAME => Ok(Opt::ExportName(string(data)?)),
        OPT_ABORT => Ok(Opt::Abort), // any data is ignored: the client is leaving anyway
        OPT_LIST => empty(Opt::List),
        OPT_STARTTLS => empty(Opt::StartTls),
        OPT_STRUCTURED_REPLY => empty(Opt::StructuredReply),
        OPT_INFO | OPT_GO => {
            let mut cur = Cursor(data);
            let name = cur.name()?;
            let n = usize::from(cur.u16()?);
            if n > MAX_INFO_REQUESTS {
                return Err(ProtoError::TooMany);
            }
            let requests = (0..n).map(|_| cur.u16()).collect::<Result<_, _>>()?;
            cur.end()?;
            Ok(Opt::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut cur = Cursor(data);
            let name = cur.name()?;
            let n = cur.u32()? as usize;
            if n > MAX_QUERIES {
                return Err(ProtoError::TooMany);
            }
            let queries = (0..n).map(|_| cur.name()).collect::<Result<_, _>>()?;
            cur.end()?;
            Ok(Opt::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            })
        }
        other => Ok(Opt::Unknown(other)),
    }
}

/// An option reply: header and `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Replies are built by the server from bounded parts (a message, an info item).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_INFO` with `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum sizes.
pub fn info_block_size(option: u32, min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        data.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_META_CONTEXT`: a context's id and name.
pub fn meta_context(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    option_reply(option, REP_META_CONTEXT, &data)
}

/// What `NBD_OPT_EXPORT_NAME` gets on success (it has no option reply): size, flags, and the
/// 124 zero bytes old clients expect unless they asked for none.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Commands of the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    Unknown(u16),
}

impl Command {
    fn from_u16(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            other => Command::Unknown(other),
        }
    }
}

/// A transmission request header (a write's payload follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn decode_request(bytes: [u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    if u32::from_be_bytes(take(&bytes, 0)) != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic);
    }
    Ok(Request {
        flags: u16::from_be_bytes(take(&bytes, 4)),
        command: Command::from_u16(u16::from_be_bytes(take(&bytes, 6))),
        cookie: u64::from_be_bytes(take(&bytes, 8)),
        offset: u64::from_be_bytes(take(&bytes, 16)),
        len: u32::from_be_bytes(take(&bytes, 24)),
    })
}

/// What the server does with a request on a read-only export of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`; `one_chunk` when the client set DF.
    Read {
        offset: u64,
        len: u32,
        one_chunk: bool,
    },
    /// Describe allocation from `offset`; `one` when the client set REQ_ONE.
    BlockStatus { offset: u64, len: u32, one: bool },
    /// The client is leaving.
    Disconnect,
    /// Answer with this error; a write's `skip` payload bytes are read and dropped first.
    Refuse { error: u32, skip: u32 },
    /// The request cannot be answered and the stream cannot be trusted (a write payload past
    /// the limit): close the connection.
    Close,
}

/// Decides what to do with `req`. `structured` and `allocation` say what was negotiated
/// (structured replies, the `base:allocation` context).
pub fn check(req: &Request, size: u64, structured: bool, allocation: bool) -> Action {
    let in_bounds = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    let refuse = |error| Action::Refuse { error, skip: 0 };
    match req.command {
        Command::Read => {
            if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_DF) != 0 {
                refuse(EINVAL)
            } else if req.len > MAX_REQUEST_LEN {
                refuse(EOVERFLOW)
            } else if !in_bounds {
                refuse(EINVAL)
            } else {
                Action::Read {
                    offset: req.offset,
                    len: req.len,
                    one_chunk: req.flags & CMD_FLAG_DF != 0,
                }
            }
        }
        Command::BlockStatus => {
            // Block status needs the context negotiated, a known flag, and a non-empty range
            // inside the disk.
            let usable = structured && allocation && req.flags & !CMD_FLAG_REQ_ONE == 0;
            if !usable || req.len == 0 || !in_bounds {
                refuse(EINVAL)
            } else {
                Action::BlockStatus {
                    offset: req.offset,
                    len: req.len,
                    one: req.flags & CMD_FLAG_REQ_ONE != 0,
                }
            }
        }
        Command::Disc => Action::Disconnect,
        // The payload follows the header: it is drained to keep the stream in step, unless it
        // is larger than any request this server takes, which only a broken client sends.
        Command::Write if req.len > MAX_REQUEST_LEN => Action::Close,
        Command::Write => Action::Refuse {
            error: EPERM,
            skip: req.len,
        },
        Command::Trim | Command::WriteZeroes | Command::Resize => refuse(EPERM),
        // Nothing to flush or cache on a read-only export; neither was advertised.
        Command::Flush | Command::Cache | Command::Unknown(_) => refuse(EINVAL),
    }
}

/// A simple reply header (a successful simple read reply's data follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header; `len` payload bytes follow.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message (cut to 256 bytes on a char boundary).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(256);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(26 + msg.len());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `context`: (length, state) descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut out = Vec::with_capacity(20 + len);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for (length, state) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
    out
}

/// A final `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` zero bytes at `offset`, sent as a length.
pub fn hole_chunk(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// Bytes of the header in front of a read's data: a simple reply, or a final
/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk with its offset.
pub fn read_header(cookie: u64, offset: u64, len: u32, structured: bool) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, 0).to_vec();
    }
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + len,
    ));
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// Reads fixed-size parts of a payload, never past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Malformed(
                "a length runs past the end of the option",
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length and that many bytes of UTF-8 (checked against [`MAX_STRING`] before
    /// the bytes are taken).
    fn name(&mut self) -> Result<&'a str, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::BadString);
        }
        string(self.bytes(n)?)
    }

    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed(
                "bytes left over after the last field",
            ))
        }
    }
}

fn string(data: &[u8]) -> Result<&str, ProtoError> {
    if data.len() > MAX_STRING {
        return Err(ProtoError::BadString);
    }
    std::str::from_utf8(data).map_err(|_| ProtoError::BadString)
}

/// `N` bytes of `bytes` from `at`; callers pass fixed-size arrays long enough for every use.
fn take<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

/// Any bytes as the client side of a session: client flags, then options framed by their
/// headers, then transmission requests — every decoder and [`check`] runs on what it gets.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the fuzz target's entry point; the server never calls it"
    )
)]
pub fn fuzz(data: &[u8]) {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let _ = decode_client_flags(*flags);
    while let Some((header, after)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() {
        let Ok((option, len)) = decode_option_header(*header) else {
            break;
        };
        if len > MAX_OPTION_LEN || len as usize > after.len() {
            break;
        }
        let (payload, after) = after.split_at(len as usize);
        let _ = decode_option(option, payload);
        rest = after;
    }
    while let Some((header, after)) = rest.split_first_chunk::<REQUEST_LEN>() {
        if let Ok(req) = decode_request(*header) {
            for (s, a) in [(false, false), (true, true)] {
                let _ = check(&req, 1 << 30, s, a);
            }
        }
        rest = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::fuzzing::Rng;

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn named(name: &str, tail: &[u8]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(tail);
        out
    }

    fn request(flags: u16, command: u16, offset: u64, len: u32) -> Request {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&command.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..].copy_from_slice(&len.to_be_bytes());
        decode_request(b).expect("valid request")
    }

    #[test]
    fn options_decode() {
        let go = named("img/tok", &[0, 2, 0, 0, 0, 3]);
        assert_eq!(
            decode_option(OPT_GO, &go),
            Ok(Opt::Info {
                go: true,
                name: "img/tok",
                requests: vec![INFO_EXPORT, INFO_BLOCK_SIZE]
            })
        );
        let mut set = named("x", &2u32.to_be_bytes());
        set.extend(named(BASE_ALLOCATION, &[]));
        set.extend(named("qemu:dirty-bitmap:a", &[]));
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &set),
            Ok(Opt::MetaContext {
                set: true,
                name: "x",
                queries: vec![BASE_ALLOCATION, "qemu:dirty-bitmap:a"]
            })
        );
        assert_eq!(decode_option(OPT_LIST, &[]), Ok(Opt::List));
        assert_eq!(decode_option(99, b"whatever"), Ok(Opt::Unknown(99)));
    }

    #[test]
    fn malformed_options_are_refused_by_name() {
        assert!(matches!(
            decode_option(OPT_LIST, b"x"),
            Err(ProtoError::Malformed(_))
        ));
        // A name length past the payload, past the limit; counts past the limits.
        assert!(matches!(
            decode_option(OPT_GO, &[0, 0, 0, 9, b'a']),
            Err(ProtoError::Malformed(_))
        ));
        assert_eq!(
            decode_option(OPT_GO, &[0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::BadString)
        );
        assert_eq!(
            decode_option(OPT_GO, &named("a", &[0xff, 0xff])),
            Err(ProtoError::TooMany)
        );
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &named("a", &[0, 1, 0, 0])),
            Err(ProtoError::TooMany)
        );
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, &[0xff, 0xfe]),
            Err(ProtoError::BadString)
        );
        assert!(matches!(
            decode_option(OPT_INFO, &named("a", &[0, 0, 1])),
            Err(ProtoError::Malformed(_))
        ));
        assert_eq!(
            decode_option_header([0u8; OPTION_HEADER_LEN]),
            Err(ProtoError::BadMagic)
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags(4))
        );
        let frame = option(OPT_GO, &[1, 2, 3]);
        let header: [u8; OPTION_HEADER_LEN] = frame[..16].try_into().expect("16 bytes");
        assert_eq!(decode_option_header(header), Ok((OPT_GO, 3)));
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let size = 10 << 20;
        let read = |flags, offset, len| check(&request(flags, 0, offset, len), size, true, true);
        assert_eq!(
            read(CMD_FLAG_DF, 4096, 512),
            Action::Read {
                offset: 4096,
                len: 512,
                one_chunk: true
            }
        );
        let einval = Action::Refuse {
            error: EINVAL,
            skip: 0,
        };
        assert_eq!(read(0, size - 1, 2), einval, "past the end");
        assert_eq!(read(0, u64::MAX, 2), einval, "offset + len overflows");
        assert_eq!(
            read(CMD_FLAG_REQ_ONE, 0, 1),
            einval,
            "a flag reads do not take"
        );
        assert_eq!(
            read(0, 0, MAX_REQUEST_LEN + 1),
            Action::Refuse {
                error: EOVERFLOW,
                skip: 0
            }
        );
        let write = request(0, 1, 0, 4096);
        assert_eq!(
            check(&write, size, true, true),
            Action::Refuse {
                error: EPERM,
                skip: 4096
            }
        );
        let huge = request(0, 1, 0, u32::MAX);
        assert_eq!(check(&huge, size, true, true), Action::Close);
        for (command, error) in [
            (3, EINVAL),
            (4, EPERM),
            (5, EINVAL),
            (6, EPERM),
            (42, EINVAL),
        ] {
            assert_eq!(
                check(&request(0, command, 0, 1), size, true, true),
                Action::Refuse { error, skip: 0 },
                "command {command}"
            );
        }
        let status = request(CMD_FLAG_REQ_ONE, 7, 0, 4096);
        assert_eq!(
            check(&status, size, true, true),
            Action::BlockStatus {
                offset: 0,
                len: 4096,
                one: true
            }
        );
        assert_eq!(
            check(&status, size, true, false),
            einval,
            "no context negotiated"
        );
        assert_eq!(
            check(&request(0, 2, 0, 0), size, false, false),
            Action::Disconnect
        );
    }

    #[test]
    fn encoders_frame_their_lengths() {
        let r = info_export(OPT_GO, 1 << 30, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
        assert_eq!(r.len(), 20 + 12);
        assert_eq!(&r[16..20], &12u32.to_be_bytes());
        let e = error_chunk(9, EIO, &"é".repeat(200));
        let msg_len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert_eq!(e.len(), 26 + msg_len);
        assert!(msg_len <= 256 && std::str::from_utf8(&e[26..]).is_ok());
        let b = block_status_chunk(9, BASE_ALLOCATION_ID, &[(65536, 0), (131072, 3)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(export_name_reply(5, 3, false).len(), 134);
        assert_eq!(export_name_reply(5, 3, true).len(), 10);
    }

    /// The property test standing in for the fuzz target in CI: random sessions, truncated
    /// and mutated valid ones, never a panic.
    #[test]
    fn any_bytes_decode_without_panic() {
        let mut rng = Rng(0x6e62_6421);
        let mut valid = 0u32.to_be_bytes().to_vec();
        valid.extend(option(OPT_STRUCTURED_REPLY, &[]));
        valid.extend(option(OPT_GO, &named("a/b", &[0, 1, 0, 3])));
        let mut set = named("a/b", &1u32.to_be_bytes());
        set.extend(named(BASE_ALLOCATION, &[]));
        valid.extend(option(OPT_SET_META_CONTEXT, &set));
        let mut req = [0u8; REQUEST_LEN];
        req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        valid.extend_from_slice(&req);
        fuzz(&valid);
        for _ in 0..20_000 {
            let mut data = valid.clone();
            match rng.below(3) {
                0 => data.truncate(rng.below(data.len() + 1)),
                1 => {
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(data.len());
                        data[i] = rng.next_u64() as u8;
                    }
                }
                _ => {
                    data = (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect();
                }
            }
            fuzz(&data);
            if let Some((_, rest)) = data.split_first_chunk::<4>() {
                for option in 0..12 {
                    let _ = decode_option(option, rest);
                }
            }
        }
    }
}
