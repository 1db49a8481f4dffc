//! TFTP packets (RFC 1350, options of RFC 2347): a pure decoder with limits and an encoder.
//!
//! This file depends on `std` alone, so the cargo-fuzz target (`fuzz/fuzz_targets/tftp.rs`)
//! includes it as it is; [`fuzz`] is the entry point that target and the seeded property test
//! below share. Decoding never panics and never allocates more than a bounded number of option
//! pairs, whatever the bytes.

use std::fmt;

/// Opcodes (RFC 1350 §5, RFC 2347 for OACK).
pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

/// Error codes (RFC 1350 appendix).
pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;

/// RFC 2347 caps a request at 512 octets; a little slack for clients that overshoot.
pub const MAX_REQUEST: usize = 1024;
/// A file name longer than this is refused (boot file names are short).
pub const MAX_FILENAME: usize = 512;
/// Option pairs beyond this many are refused (a request has room for a few dozen at most).
pub const MAX_OPTIONS: usize = 32;
/// Largest DATA payload (RFC 2348: blksize at most 65464).
pub const MAX_BLKSIZE: usize = 65464;

/// Option name/value pairs, as sent.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// A decoded packet; its strings and payload borrow from the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A read request.
    Read(Request<'a>),
    /// A write request (always refused by this read-only server).
    Write(Request<'a>),
    Data {
        block: u16,
        data: &'a [u8],
    },
    Ack {
        block: u16,
    },
    Error {
        code: u16,
        message: &'a [u8],
    },
    /// Option acknowledgment: name/value pairs.
    Oack(Pairs<'a>),
}

/// An RRQ or WRQ: file name, transfer mode and options, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a [u8],
    pub mode: &'a [u8],
    pub options: Pairs<'a>,
}

/// Transfer modes of RFC 1350 (`mail` is obsolete and refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

impl Request<'_> {
    /// The mode, compared without regard to case; `None` for `mail` and unknown modes.
    pub fn mode(&self) -> Option<Mode> {
        if self.mode.eq_ignore_ascii_case(b"octet") {
            Some(Mode::Octet)
        } else if self.mode.eq_ignore_ascii_case(b"netascii") {
            Some(Mode::Netascii)
        } else {
            None
        }
    }

    /// The options this server understands (RFC 2348, 2349, 7440), parsed; names compare without
    /// regard to case, values must be decimal digits. Unknown or unparsable options are left out:
    /// RFC 2347 lets a server ignore options it does not accept.
    pub fn known_options(&self) -> Options {
        let mut o = Options::default();
        for (name, value) in &self.options {
            let Some(v) = decimal(value) else { continue };
            if name.eq_ignore_ascii_case(b"blksize") {
                o.blksize = Some(v);
            } else if name.eq_ignore_ascii_case(b"timeout") {
                o.timeout = Some(v);
            } else if name.eq_ignore_ascii_case(b"tsize") {
                o.tsize = Some(v);
            } else if name.eq_ignore_ascii_case(b"windowsize") {
                o.windowsize = Some(v);
            }
        }
        o
    }
}

/// Requested option values, as numbers (not yet checked against their ranges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u64>,
    pub timeout: Option<u64>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u64>,
}

/// Decimal ASCII digits as a number; `None` for anything else or more than 19 digits.
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Why a datagram is not a valid packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    UnknownOpcode(u16),
    TooLong,
    /// A string is not terminated by a zero byte.
    Unterminated,
    EmptyFilename,
    FilenameTooLong,
    /// An option name without a value.
    OddOptions,
    TooManyOptions,
    DataTooLong,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "packet too short"),
            DecodeError::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            DecodeError::TooLong => write!(f, "request longer than {MAX_REQUEST} bytes"),
            DecodeError::Unterminated => write!(f, "string not terminated by a zero byte"),
            DecodeError::EmptyFilename => write!(f, "empty file name"),
            DecodeError::FilenameTooLong => {
                write!(f, "file name longer than {MAX_FILENAME} bytes")
            }
            DecodeError::OddOptions => write!(f, "an option without a value"),
            DecodeError::TooManyOptions => write!(f, "more than {MAX_OPTIONS} options"),
            DecodeError::DataTooLong => write!(f, "data longer than {MAX_BLKSIZE} bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The opcode of a datagram, if it has one (for telling a malformed request from other noise).
pub fn opcode(datagram: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*datagram.first()?, *datagram.get(1)?]))
}

/// Decodes one datagram.
pub fn decode(datagram: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let op = opcode(datagram).ok_or(DecodeError::TooShort)?;
    let body = &datagram[2..];
    match op {
        RRQ | WRQ => {
            if datagram.len() > MAX_REQUEST {
                return Err(DecodeError::TooLong);
            }
            let mut strings = Strings(body);
            let filename = strings.next_str()?.ok_or(DecodeError::Unterminated)?;
            if filename.is_empty() {
                return Err(DecodeError::EmptyFilename);
            }
            if filename.len() > MAX_FILENAME {
                return Err(DecodeError::FilenameTooLong);
            }
            let mode = strings.next_str()?.ok_or(DecodeError::Unterminated)?;
            let options = pairs(strings)?;
            let request = Request {
                filename,
                mode,
                options,
            };
            Ok(if op == RRQ {
                Packet::Read(request)
            } else {
                Packet::Write(request)
            })
        }
        DATA => {
            let block = u16_at(body)?;
            let data = &body[2..];
            if data.len() > MAX_BLKSIZE {
                return Err(DecodeError::DataTooLong);
            }
            Ok(Packet::Data { block, data })
        }
        ACK => Ok(Packet::Ack {
            block: u16_at(body)?,
        }),
        ERROR => {
            let code = u16_at(body)?;
            // Some stacks omit the final zero of the message: take what is there.
            let rest = &body[2..];
            let message = match rest.iter().position(|&b| b == 0) {
                Some(end) => &rest[..end],
                None => rest,
            };
            Ok(Packet::Error { code, message })
        }
        OACK => {
            if datagram.len() > MAX_REQUEST {
                return Err(DecodeError::TooLong);
            }
            Ok(Packet::Oack(pairs(Strings(body))?))
        }
        other => Err(DecodeError::UnknownOpcode(other)),
    }
}

fn u16_at(body: &[u8]) -> Result<u16, DecodeError> {
    match body {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(DecodeError::TooShort),
    }
}

/// Zero-terminated strings, one after the other.
struct Strings<'a>(&'a [u8]);

impl<'a> Strings<'a> {
    /// The next string; `Ok(None)` at the end of the input, an error for an unterminated one.
    fn next_str(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Ok(Some(s))
    }
}

fn pairs(mut strings: Strings<'_>) -> Result<Pairs<'_>, DecodeError> {
    let mut out = Vec::new();
    while let Some(name) = strings.next_str()? {
        let value = strings.next_str()?.ok_or(DecodeError::OddOptions)?;
        if out.len() == MAX_OPTIONS {
            return Err(DecodeError::TooManyOptions);
        }
        out.push((name, value));
    }
    Ok(out)
}

impl Packet<'_> {
    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Read(r) | Packet::Write(r) => {
                let op = if matches!(self, Packet::Read(_)) {
                    RRQ
                } else {
                    WRQ
                };
                out.extend_from_slice(&op.to_be_bytes());
                for s in [r.filename, r.mode] {
                    out.extend_from_slice(s);
                    out.push(0);
                }
                put_pairs(out, &r.options);
            }
            Packet::Data { block, data } => {
                data_header(out, *block);
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&ERROR.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(message);
                out.push(0);
            }
            Packet::Oack(pairs) => {
                out.extend_from_slice(&OACK.to_be_bytes());
                put_pairs(out, pairs);
            }
        }
    }
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(&[u8], &[u8])]) {
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
}

/// The four bytes that start a DATA packet.
pub fn data_header(out: &mut Vec<u8>, block: u16) {
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

/// An ERROR packet. A zero byte inside `message` would end it early: those are dropped.
pub fn error(code: u16, message: &str) -> Vec<u8> {
    let clean: Vec<u8> = message.bytes().filter(|&b| b != 0).collect();
    let mut out = Vec::with_capacity(clean.len() + 5);
    Packet::Error {
        code,
        message: &clean,
    }
    .encode(&mut out);
    out
}

/// The fuzzing entry point (cargo-fuzz and the property test): any bytes decode or are
/// refused; what decodes re-encodes to a packet that decodes to the same thing, and the
/// option parser accepts whatever the decoder let through.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the fuzz target's entry point; the server never calls it"
    )
)]
pub fn fuzz(data: &[u8]) {
    let Ok(packet) = decode(data) else { return };
    if let Packet::Read(r) | Packet::Write(r) = &packet {
        let _ = r.mode();
        let _ = r.known_options();
    }
    let mut again = Vec::new();
    packet.encode(&mut again);
    match (&packet, decode(&again)) {
        // An ERROR's message may lack its final zero, or carry bytes after it.
        (
            Packet::Error { code, message },
            Ok(Packet::Error {
                code: c,
                message: m,
            }),
        ) => {
            assert_eq!((code, message), (&c, &m), "ERROR round trip");
        }
        (_, Ok(decoded)) => assert_eq!(packet, decoded, "round trip"),
        (_, Err(e)) => panic!("a decoded packet re-encodes to an undecodable one: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::fuzzing::Rng;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut out = RRQ.to_be_bytes().to_vec();
        for p in parts {
            out.extend_from_slice(p.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn a_read_request_with_options_decodes() {
        let bytes = rrq(&[
            "/ipxe.efi",
            "OCTET",
            "BlkSize",
            "1468",
            "tsize",
            "0",
            "windowsize",
            "16",
            "timeout",
            "x",
            "multicast",
            "",
        ]);
        let Ok(Packet::Read(r)) = decode(&bytes) else {
            panic!("not a read request")
        };
        assert_eq!(r.filename, b"/ipxe.efi");
        assert_eq!(r.mode(), Some(Mode::Octet));
        assert_eq!(
            r.known_options(),
            Options {
                blksize: Some(1468),
                timeout: None,
                tsize: Some(0),
                windowsize: Some(16),
            }
        );
        fuzz(&bytes);
    }

    #[test]
    fn malformed_requests_are_refused_by_name() {
        assert_eq!(decode(b""), Err(DecodeError::TooShort));
        assert_eq!(decode(b"\x00"), Err(DecodeError::TooShort));
        assert_eq!(decode(b"\x00\x09"), Err(DecodeError::UnknownOpcode(9)));
        assert_eq!(decode(b"\x00\x01"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01file"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01file\0"), Err(DecodeError::Unterminated));
        assert_eq!(
            decode(b"\x00\x01\0octet\0"),
            Err(DecodeError::EmptyFilename)
        );
        assert_eq!(
            decode(&rrq(&["f", "octet", "blksize"])),
            Err(DecodeError::OddOptions)
        );
        let mut long = rrq(&["f", "octet"]);
        long.resize(MAX_REQUEST + 1, b'a');
        assert_eq!(decode(&long), Err(DecodeError::TooLong));
        let many: Vec<&str> = ["f", "octet"]
            .into_iter()
            .chain(std::iter::repeat_n("o", 2 * MAX_OPTIONS + 2))
            .collect();
        assert_eq!(decode(&rrq(&many)), Err(DecodeError::TooManyOptions));
        assert_eq!(decode(b"\x00\x04\x01"), Err(DecodeError::TooShort));
        assert_eq!(
            decode(b"\x00\x04\x01\x02"),
            Ok(Packet::Ack { block: 0x102 })
        );
    }

    #[test]
    fn modes_and_numbers() {
        let r = |mode: &'static str| Request {
            filename: b"f",
            mode: mode.as_bytes(),
            options: vec![],
        };
        assert_eq!(r("NetAscii").mode(), Some(Mode::Netascii));
        assert_eq!(r("mail").mode(), None);
        assert_eq!(r("binary").mode(), None);
        assert_eq!(decimal(b"0065464"), Some(65464));
        assert_eq!(
            decimal(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(decimal(b"99999999999999999999"), None);
        assert_eq!(decimal(b"-1"), None);
        assert_eq!(decimal(b""), None);
        assert_eq!(decimal(b"1 "), None);
    }

    #[test]
    fn an_error_message_loses_its_zero_bytes() {
        assert_eq!(error(1, "a\0b"), b"\x00\x05\x00\x01ab\x00");
    }

    /// The same entry point as the cargo-fuzz target, bounded and seeded: valid packets of every
    /// kind mutated many ways (bit flips, truncations, zero bytes moved, bytes inserted, lengths
    /// stretched) must decode or be refused, never panic.
    #[test]
    fn hostile_packets_never_panic() {
        let mut seeds = vec![
            rrq(&["undionly.kpxe", "octet"]),
            rrq(&["/a/b", "netascii", "blksize", "1468", "tsize", "0"]),
            rrq(&["x", "octet", "windowsize", "16", "timeout", "3"]),
            b"\x00\x02file\0octet\0".to_vec(),
            b"\x00\x03\x00\x01hello".to_vec(),
            b"\x00\x04\xff\xff".to_vec(),
            b"\x00\x05\x00\x01not found\0".to_vec(),
            b"\x00\x06blksize\x001468\0".to_vec(),
        ];
        seeds.push(vec![0; 4]);
        let mut rng = Rng(0x7f7f_1350_2347_7440);
        for _ in 0..40_000 {
            let mut p = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(6) {
                    0 if !p.is_empty() => {
                        let i = rng.below(p.len());
                        p[i] ^= 1 << rng.below(8);
                    }
                    1 => p.truncate(rng.below(p.len() + 1)),
                    2 if !p.is_empty() => {
                        let i = rng.below(p.len());
                        p[i] = 0;
                    }
                    3 => {
                        let i = rng.below(p.len() + 1);
                        p.insert(i, rng.next_u64() as u8);
                    }
                    4 => p.extend(std::iter::repeat_n(rng.next_u64() as u8, rng.below(1200))),
                    _ => {
                        let i = rng.below(p.len() + 1);
                        p.insert(i, 0);
                    }
                }
            }
            fuzz(&p);
        }
    }
}
