//! iSCSI PDUs (RFC 7143 §11) as pure decoders with limits and plain encoders: the 48-byte basic
//! header segment (BHS), additional header segments (AHS), the data segment and its padding,
//! and the text key=value pairs of login and text requests (§6).
//!
//! This file depends on `std` alone, so the cargo-fuzz target (`fuzz/fuzz_targets/iscsi.rs`)
//! includes it as it is; [`fuzz`] is the entry point that target and the seeded property test
//! below share. Nothing here panics or allocates beyond its limits, whatever the bytes: every
//! length read off the wire is checked against a limit before anything is read or reserved.

use std::fmt;

/// Length of the basic header segment that starts every PDU.
pub const BHS_LEN: usize = 48;
/// The largest data segment accepted from an initiator. We declare 64 KiB as our
/// MaxRecvDataSegmentLength; a little more is tolerated (some initiators send immediate data
/// up to FirstBurstLength before they read our declaration), anything past this closes the
/// connection: only a broken or hostile peer sends it.
pub const MAX_DATA_SEGMENT: u32 = 256 << 10;
/// Text pairs in one login or text request (initiators send about twenty).
pub const MAX_KEYS: usize = 128;
/// Longest key name (RFC 7143 §6.1: "key names ... up to 63 bytes").
pub const MAX_KEY_LEN: usize = 63;
/// Longest value (§6.1: 8192 bytes at most for the largest, the text of a SendTargets answer is
/// built by us, never parsed).
pub const MAX_VALUE_LEN: usize = 8192;
/// Text of one login or text request as a whole, over however many PDUs it is split into
/// (initiators send under 2 KiB; [`MAX_KEYS`] pairs of sensible size fit many times over).
pub const MAX_TEXT: usize = 64 << 10;

/// "No task", "no target transfer tag": the reserved tag value.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TASK_MGMT: u8 = 0x02;
pub const OP_LOGIN: u8 = 0x03;
pub const OP_TEXT: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT: u8 = 0x06;
pub const OP_SNACK: u8 = 0x10;
/// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RSP: u8 = 0x21;
pub const OP_TASK_MGMT_RSP: u8 = 0x22;
pub const OP_LOGIN_RSP: u8 = 0x23;
pub const OP_TEXT_RSP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RSP: u8 = 0x26;
pub const OP_REJECT: u8 = 0x3f;

/// Flag bits of byte 1.
pub const FLAG_FINAL: u8 = 0x80;
pub const FLAG_CONTINUE: u8 = 0x40;
/// Login: Transit.
pub const FLAG_TRANSIT: u8 = 0x80;
/// Data-In and SCSI Response: residual Overflow, Underflow; Data-In: Status present.
pub const FLAG_OVERFLOW: u8 = 0x04;
pub const FLAG_UNDERFLOW: u8 = 0x02;
pub const FLAG_STATUS: u8 = 0x01;

/// Login stages (CSG/NSG).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// Login status (class << 8 | detail), RFC 7143 §11.13.5.
pub const LOGIN_SUCCESS: u16 = 0x0000;
pub const LOGIN_INITIATOR_ERROR: u16 = 0x0200;
pub const LOGIN_AUTH_FAILED: u16 = 0x0201;
pub const LOGIN_NOT_FOUND: u16 = 0x0203;
pub const LOGIN_UNSUPPORTED_VERSION: u16 = 0x0205;
pub const LOGIN_MISSING_PARAMETER: u16 = 0x0207;
pub const LOGIN_UNSUPPORTED_SESSION_TYPE: u16 = 0x0209;
pub const LOGIN_NO_SESSION: u16 = 0x020a;
pub const LOGIN_TARGET_ERROR: u16 = 0x0300;

/// Reject reasons (§11.17.1).
pub const REJECT_PROTOCOL_ERROR: u8 = 0x04;
pub const REJECT_COMMAND_NOT_SUPPORTED: u8 = 0x05;

/// Task management functions (§11.5.1) and responses (§11.6.1).
pub const TMF_ABORT_TASK: u8 = 1;
pub const TMF_ABORT_TASK_SET: u8 = 2;
pub const TMF_CLEAR_TASK_SET: u8 = 4;
pub const TMF_LUN_RESET: u8 = 5;
pub const TMF_TARGET_WARM_RESET: u8 = 6;
pub const TMF_COMPLETE: u8 = 0;
pub const TMF_NOT_SUPPORTED: u8 = 5;

/// Why bytes from an initiator are not a PDU this target takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PduError {
    /// An opcode no initiator sends (a target opcode, or an unassigned one).
    BadOpcode(u8),
    /// A data segment longer than [`MAX_DATA_SEGMENT`]: the stream cannot be read on safely.
    TooLong(u32),
    /// Text that is not `key=value` pairs within the limits.
    BadText(&'static str),
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::BadOpcode(op) => write!(f, "opcode {op:#04x} is not an initiator's"),
            PduError::TooLong(n) => {
                write!(
                    f,
                    "a data segment of {n} bytes (at most {MAX_DATA_SEGMENT})"
                )
            }
            PduError::BadText(why) => write!(f, "malformed text: {why}"),
        }
    }
}

impl std::error::Error for PduError {}

/// The framing fields of a BHS: what must be known to read the rest of the PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub bhs: [u8; BHS_LEN],
    pub opcode: u8,
    pub immediate: bool,
    /// Bytes of AHS that follow the BHS (a multiple of 4, at most 1020).
    pub ahs_len: usize,
    /// Bytes of data that follow the AHS, before padding.
    pub data_len: usize,
}

impl Header {
    /// Bytes on the wire after the BHS: AHS, data and the padding to a 4-byte boundary.
    pub fn rest_len(&self) -> usize {
        self.ahs_len + padded(self.data_len)
    }

    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }

    pub fn lun(&self) -> [u8; 8] {
        take(&self.bhs, 8)
    }

    /// Bytes 20..24: TTT (NOP-Out, Text, Data-Out), EDTL (SCSI), CID (Login, Logout),
    /// referenced task tag (TMF).
    pub fn word20(&self) -> u32 {
        be32(&self.bhs, 20)
    }

    pub fn cmd_sn(&self) -> u32 {
        be32(&self.bhs, 24)
    }

    pub fn exp_stat_sn(&self) -> u32 {
        be32(&self.bhs, 28)
    }
}

/// `n` rounded up to the 4-byte boundary iSCSI pads every segment to.
pub fn padded(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Decodes a BHS: checks the opcode is one an initiator sends and the data segment is within
/// [`MAX_DATA_SEGMENT`] (the AHS length is a byte, so it is bounded by construction).
pub fn decode_header(bhs: [u8; BHS_LEN]) -> Result<Header, PduError> {
    let opcode = bhs[0] & 0x3f;
    if !matches!(
        opcode,
        OP_NOP_OUT
            | OP_SCSI_CMD
            | OP_TASK_MGMT
            | OP_LOGIN
            | OP_TEXT
            | OP_DATA_OUT
            | OP_LOGOUT
            | OP_SNACK
    ) {
        return Err(PduError::BadOpcode(opcode));
    }
    let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if data_len > MAX_DATA_SEGMENT {
        return Err(PduError::TooLong(data_len));
    }
    Ok(Header {
        bhs,
        opcode,
        immediate: bhs[0] & 0x40 != 0,
        ahs_len: usize::from(bhs[4]) * 4,
        data_len: data_len as usize,
    })
}

/// A login request's own fields (§11.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

pub fn login_request(h: &Header) -> LoginRequest {
    let b = &h.bhs;
    LoginRequest {
        transit: b[1] & FLAG_TRANSIT != 0,
        cont: b[1] & FLAG_CONTINUE != 0,
        csg: (b[1] >> 2) & 3,
        nsg: b[1] & 3,
        version_max: b[2],
        version_min: b[3],
        isid: take(b, 8),
        tsih: u16::from_be_bytes(take(b, 14)),
        itt: h.itt(),
        cid: u16::from_be_bytes(take(b, 20)),
        cmd_sn: h.cmd_sn(),
        exp_stat_sn: h.exp_stat_sn(),
    }
}

/// Text `key=value` pairs (§6.1): NUL-terminated, UTF-8, within [`MAX_KEYS`], [`MAX_KEY_LEN`]
/// and [`MAX_VALUE_LEN`]. Padding NULs after the last pair are allowed.
pub fn decode_text(data: &[u8]) -> Result<Vec<(&str, &str)>, PduError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(PduError::BadText("a pair without its terminating NUL"))?;
        let (pair, after) = rest.split_at(end);
        rest = &after[1..];
        if pair.is_empty() {
            continue;
        }
        if out.len() == MAX_KEYS {
            return Err(PduError::BadText("too many keys"));
        }
        let pair = std::str::from_utf8(pair).map_err(|_| PduError::BadText("not UTF-8"))?;
        let (key, value) = pair
            .split_once('=')
            .ok_or(PduError::BadText("a key without '='"))?;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(PduError::BadText(
                "a key name empty or longer than 63 bytes",
            ));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(PduError::BadText("a value longer than 8192 bytes"));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// The text of one request, gathered over the PDUs it is split into (§6.1: an initiator sets C,
/// "continue", on every PDU but the last, and a pair may span PDUs), within [`MAX_TEXT`].
#[derive(Debug, Default)]
pub struct TextGather {
    buf: Vec<u8>,
}

impl TextGather {
    /// Adds one PDU's data; `more` is its C bit. `Ok(None)`: more is to come; `Ok(Some(text))`:
    /// the whole text, and the gather is empty again. Past [`MAX_TEXT`] it is an error and the
    /// gather is emptied.
    pub fn push(&mut self, data: &[u8], more: bool) -> Result<Option<Vec<u8>>, PduError> {
        if self.buf.len() + data.len() > MAX_TEXT {
            self.clear();
            return Err(PduError::BadText(
                "a request's text is longer than 65536 bytes",
            ));
        }
        self.buf.extend_from_slice(data);
        if more {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// Drops what was gathered (the initiator started a new request).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
    }
}

/// Appends `key=value\0`.
pub fn push_key(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// A BHS with the opcode, byte-1 flags and data segment length filled in.
fn bhs(opcode: u8, flags: u8, data_len: usize) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode;
    b[1] = flags;
    // Our data segments are bounded by what we build (at most the initiator's
    // MaxRecvDataSegmentLength, itself at most 2^24 - 1).
    let len = (data_len as u32).to_be_bytes();
    b[5..8].copy_from_slice(&len[1..]);
    b
}

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Fills the sequence numbers every target PDU carries at bytes 24..36: StatSN, ExpCmdSN,
/// MaxCmdSN. The connection's writer does this as it sends, so they are current on the wire.
pub fn set_numbers(b: &mut [u8; BHS_LEN], stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    put32(b, 24, stat_sn);
    put32(b, 28, exp_cmd_sn);
    put32(b, 32, max_cmd_sn);
}

/// A login response (§11.13); sequence numbers are set by the caller.
pub fn login_response(
    req: &LoginRequest,
    transit: bool,
    nsg: u8,
    tsih: u16,
    status: u16,
    data_len: usize,
) -> [u8; BHS_LEN] {
    let mut flags = (req.csg & 3) << 2;
    if transit {
        flags |= FLAG_TRANSIT | (nsg & 3);
    }
    let mut b = bhs(OP_LOGIN_RSP, flags, data_len);
    // Version-max and version-active: 0, the only version there is.
    b[8..14].copy_from_slice(&req.isid);
    b[14..16].copy_from_slice(&tsih.to_be_bytes());
    put32(&mut b, 16, req.itt);
    b[36..38].copy_from_slice(&status.to_be_bytes());
    b
}

/// How a text response (§11.11) continues the exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFlow {
    /// The exchange is over: F set, the reserved tag.
    Final,
    /// Our text goes on in the next response (C set), which the initiator asks for with an
    /// empty Text Request carrying this tag.
    More(u32),
    /// The initiator's request was split (it set C): this empty response asks for its next
    /// part, which carries this tag (neither F nor C).
    Awaiting(u32),
}

/// A text response (§11.11): its data, `data_len` bytes, follows.
pub fn text_response(itt: u32, lun: [u8; 8], flow: TextFlow, data_len: usize) -> [u8; BHS_LEN] {
    let (flags, ttt) = match flow {
        TextFlow::Final => (FLAG_FINAL, RESERVED_TAG),
        TextFlow::More(tag) => (FLAG_CONTINUE, tag),
        TextFlow::Awaiting(tag) => (0, tag),
    };
    let mut b = bhs(OP_TEXT_RSP, flags, data_len);
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    b
}

/// A SCSI response (§11.4) with `status`; `residual` is (overflow?, count). The data segment
/// (sense data, if any) follows.
pub fn scsi_response(
    itt: u32,
    status: u8,
    residual: Option<(bool, u32)>,
    data_len: usize,
) -> [u8; BHS_LEN] {
    let mut flags = FLAG_FINAL;
    let mut count = 0;
    if let Some((over, n)) = residual {
        flags |= if over { FLAG_OVERFLOW } else { FLAG_UNDERFLOW };
        count = n;
    }
    let mut b = bhs(OP_SCSI_RSP, flags, data_len);
    // Byte 2, Response: 0, "command completed at target".
    b[3] = status;
    put32(&mut b, 16, itt);
    put32(&mut b, 44, count);
    b
}

/// One Data-In PDU (§11.7). `last` carries the status (phase collapse) and the residual.
pub struct DataIn {
    pub itt: u32,
    pub lun: [u8; 8],
    pub data_sn: u32,
    pub offset: u32,
    pub len: usize,
    /// Last PDU of a sequence (MaxBurstLength) or of the command.
    pub final_pdu: bool,
    /// `Some((status, residual))` on the command's last PDU.
    pub status: Option<(u8, Option<(bool, u32)>)>,
}

pub fn data_in(d: &DataIn) -> [u8; BHS_LEN] {
    let mut flags = if d.final_pdu { FLAG_FINAL } else { 0 };
    let mut status_byte = 0;
    let mut count = 0;
    if let Some((status, residual)) = d.status {
        flags |= FLAG_FINAL | FLAG_STATUS;
        status_byte = status;
        if let Some((over, n)) = residual {
            flags |= if over { FLAG_OVERFLOW } else { FLAG_UNDERFLOW };
            count = n;
        }
    }
    let mut b = bhs(OP_DATA_IN, flags, d.len);
    b[3] = status_byte;
    b[8..16].copy_from_slice(&d.lun);
    put32(&mut b, 16, d.itt);
    put32(&mut b, 20, RESERVED_TAG);
    put32(&mut b, 36, d.data_sn);
    put32(&mut b, 40, d.offset);
    put32(&mut b, 44, count);
    b
}

/// A NOP-In (§11.19): the answer to a ping (`itt` echoed, reserved TTT, its data echoed), or a
/// ping of ours (reserved ITT, a TTT the initiator echoes).
pub fn nop_in(itt: u32, ttt: u32, lun: [u8; 8], data_len: usize) -> [u8; BHS_LEN] {
    let mut b = bhs(OP_NOP_IN, FLAG_FINAL, data_len);
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    b
}

/// A logout response (§11.15): "connection or session closed successfully", no waiting.
pub fn logout_response(itt: u32) -> [u8; BHS_LEN] {
    let mut b = bhs(OP_LOGOUT_RSP, FLAG_FINAL, 0);
    put32(&mut b, 16, itt);
    b
}

/// A task management function response (§11.6).
pub fn task_response(itt: u32, response: u8) -> [u8; BHS_LEN] {
    let mut b = bhs(OP_TASK_MGMT_RSP, FLAG_FINAL, 0);
    b[2] = response;
    put32(&mut b, 16, itt);
    b
}

/// A reject (§11.17): its data segment, sent after it, is the rejected PDU's header.
pub fn reject(reason: u8) -> [u8; BHS_LEN] {
    let mut b = bhs(OP_REJECT, FLAG_FINAL, BHS_LEN);
    b[2] = reason;
    put32(&mut b, 16, RESERVED_TAG);
    b
}

/// `N` bytes of `bytes` from `at`; callers pass fixed-size arrays long enough for every use.
fn take<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(take(bytes, at))
}

/// Any bytes as a stream of initiator PDUs: each header is decoded, its AHS and data framed,
/// login fields and text pairs decoded; stops where the framing would run past the input.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the fuzz target's entry point; the server never calls it"
    )
)]
pub fn fuzz(data: &[u8]) {
    let mut rest = data;
    let mut gather = TextGather::default();
    while let Some((bhs, after)) = rest.split_first_chunk::<BHS_LEN>() {
        let Ok(h) = decode_header(*bhs) else {
            return;
        };
        if h.rest_len() > after.len() {
            return;
        }
        let payload = &after[h.ahs_len..h.ahs_len + h.data_len];
        if h.opcode == OP_LOGIN {
            let req = login_request(&h);
            let _ = login_response(&req, req.transit, req.nsg, 1, 0, payload.len());
        }
        if let Ok(pairs) = decode_text(payload) {
            let mut out = Vec::new();
            for (k, v) in pairs {
                push_key(&mut out, k, v);
            }
        }
        if let Ok(Some(text)) = gather.push(payload, h.flags() & FLAG_CONTINUE != 0) {
            let _ = decode_text(&text);
        }
        rest = &after[h.rest_len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::fuzzing::Rng;

    fn pdu(opcode: u8, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut out = bhs(opcode, flags, data.len()).to_vec();
        out.extend_from_slice(data);
        out.resize(BHS_LEN + padded(data.len()), 0);
        out
    }

    #[test]
    fn headers_frame_the_pdu() {
        let mut b = bhs(OP_LOGIN | 0x40, FLAG_TRANSIT | 0x04 | 1, 13);
        b[4] = 2;
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        let h = decode_header(b).expect("login");
        assert_eq!((h.opcode, h.immediate), (OP_LOGIN, true));
        assert_eq!((h.ahs_len, h.data_len, h.rest_len()), (8, 13, 24));
        let req = login_request(&h);
        assert!(req.transit && !req.cont);
        assert_eq!((req.csg, req.nsg, req.itt), (1, 1, 7));
        assert_eq!(
            decode_header(bhs(OP_DATA_IN, 0, 0)),
            Err(PduError::BadOpcode(OP_DATA_IN))
        );
        assert_eq!(
            decode_header(bhs(OP_SCSI_CMD, 0, MAX_DATA_SEGMENT as usize + 1)),
            Err(PduError::TooLong(MAX_DATA_SEGMENT + 1))
        );
        assert_eq!(padded(0), 0);
        assert_eq!(padded(5), 8);
    }

    #[test]
    fn text_pairs_decode_within_limits() {
        assert_eq!(
            decode_text(b"InitiatorName=iqn.x\0AuthMethod=CHAP,None\0\0\0"),
            Ok(vec![
                ("InitiatorName", "iqn.x"),
                ("AuthMethod", "CHAP,None")
            ])
        );
        assert_eq!(decode_text(b"A=\0"), Ok(vec![("A", "")]));
        assert!(decode_text(b"A=b").is_err(), "no NUL");
        assert!(decode_text(b"Ab\0").is_err(), "no '='");
        assert!(decode_text(b"=b\0").is_err(), "empty key");
        assert!(decode_text(&[b'K', b'=', 0xff, 0]).is_err(), "not UTF-8");
        let long_key = format!("{}=1\0", "k".repeat(64));
        assert!(decode_text(long_key.as_bytes()).is_err());
        let many = "a=1\0".repeat(MAX_KEYS + 1);
        assert!(decode_text(many.as_bytes()).is_err());
        let mut out = Vec::new();
        push_key(&mut out, "HeaderDigest", "None");
        assert_eq!(out, b"HeaderDigest=None\0");
    }

    #[test]
    fn responses_carry_their_fields() {
        let d = data_in(&DataIn {
            itt: 9,
            lun: [0; 8],
            data_sn: 3,
            offset: 8192,
            len: 100,
            final_pdu: false,
            status: Some((0, Some((false, 412)))),
        });
        assert_eq!(d[0], OP_DATA_IN);
        assert_eq!(d[1], FLAG_FINAL | FLAG_STATUS | FLAG_UNDERFLOW);
        assert_eq!(&d[5..8], &[0, 0, 100]);
        assert_eq!(be32(&d, 36), 3);
        assert_eq!(be32(&d, 40), 8192);
        assert_eq!(be32(&d, 44), 412);
        let mut r = scsi_response(5, 2, None, 20);
        set_numbers(&mut r, 1, 2, 3);
        assert_eq!((r[0], r[1], r[3]), (OP_SCSI_RSP, FLAG_FINAL, 2));
        assert_eq!((be32(&r, 24), be32(&r, 28), be32(&r, 32)), (1, 2, 3));
        let t = text_response(4, [0; 8], TextFlow::More(77), 10);
        assert_eq!((t[1], be32(&t, 20)), (FLAG_CONTINUE, 77));
        let t = text_response(4, [0; 8], TextFlow::Awaiting(78), 0);
        assert_eq!((t[1], be32(&t, 20), &t[5..8]), (0, 78, &[0u8; 3][..]));
        let t = text_response(4, [0; 8], TextFlow::Final, 10);
        assert_eq!((t[1], be32(&t, 20)), (FLAG_FINAL, RESERVED_TAG));
    }

    #[test]
    fn text_split_over_pdus_is_gathered_within_the_limit() {
        let mut g = TextGather::default();
        // A pair spanning the PDUs, cut inside its key and inside its value.
        assert_eq!(g.push(b"Initiator", true), Ok(None));
        assert_eq!(g.push(b"Name=iqn.x\0Session", true), Ok(None));
        let text = g.push(b"Type=Discovery\0", false).expect("whole");
        assert_eq!(
            decode_text(text.as_deref().expect("whole")),
            Ok(vec![
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Discovery")
            ])
        );
        // A lone PDU is its own whole text.
        assert_eq!(g.push(b"A=1\0", false), Ok(Some(b"A=1\0".to_vec())));
        // Exactly the limit is fine; a byte more is refused and the gather emptied.
        let part = vec![b'a'; MAX_TEXT / 2];
        assert_eq!(g.push(&part, true), Ok(None));
        assert_eq!(g.push(&part, true), Ok(None));
        assert!(g.push(b"x", false).is_err());
        assert_eq!(
            g.push(b"B=2\0", false),
            Ok(Some(b"B=2\0".to_vec())),
            "emptied"
        );
        assert!(g.push(&vec![0u8; MAX_TEXT + 1], false).is_err());
    }

    /// The property test standing in for the fuzz target in CI: random streams, truncated and
    /// mutated valid ones, never a panic.
    #[test]
    fn any_bytes_decode_without_panic() {
        let mut rng = Rng(0x6973_6373_6921);
        let mut valid = pdu(
            OP_LOGIN | 0x40,
            FLAG_TRANSIT | 1,
            b"InitiatorName=iqn.1994-05.com.example:x\0SessionType=Discovery\0AuthMethod=None\0",
        );
        valid.extend(pdu(OP_TEXT | 0x40, FLAG_FINAL, b"SendTargets=All\0"));
        let mut cmd = bhs(OP_SCSI_CMD, FLAG_FINAL | 0x40, 0);
        cmd[32] = 0x28;
        valid.extend_from_slice(&cmd);
        valid.extend(pdu(OP_LOGOUT | 0x40, FLAG_FINAL, &[]));
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
                    data = (0..rng.below(400)).map(|_| rng.next_u64() as u8).collect();
                }
            }
            fuzz(&data);
            let _ = decode_text(&data);
        }
    }
}
