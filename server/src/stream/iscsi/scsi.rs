//! The SCSI commands of a read-only direct-access logical unit (SPC-4, SBC-3), as a pure
//! function from a CDB to a reply: INQUIRY (standard and VPD pages 0x00, 0x80, 0x83, 0xB0,
//! 0xB1, 0xB2), READ CAPACITY (10) and (16), READ (6/10/12/16), TEST UNIT READY, MODE SENSE
//! (6/10, write-protected), REPORT LUNS, REQUEST SENSE, and the no-ops SYNCHRONIZE CACHE,
//! START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL. Writes of any kind are refused with DATA
//! PROTECT / WRITE PROTECTED; anything else with ILLEGAL REQUEST / INVALID COMMAND OPERATION
//! CODE. Sense data is fixed-format (what every initiator reads).
//!
//! Logical blocks are 512 bytes. An image whose size is not a multiple of 512 reads as if it
//! were padded with zeros to the next one (the last block's tail).
//!
//! std-only, so the fuzz target includes it as it is.

/// Bytes in a logical block.
pub const BLOCK_LEN: u32 = 512;
/// Largest transfer one command may ask for, in blocks (8 MiB), advertised in the Block Limits
/// VPD page: it bounds the buffer one command holds.
pub const MAX_TRANSFER_BLOCKS: u32 = 16384;
/// Preferred transfer granularity and length: the store's 64 KiB blocks.
const OPTIMAL_BLOCKS: u32 = 128;

/// Status codes (SAM-5).
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const DATA_PROTECT: u8 = 0x7;

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

pub const INVALID_OPCODE: Sense = Sense {
    key: ILLEGAL_REQUEST,
    asc: 0x20,
    ascq: 0x00,
};
pub const LBA_OUT_OF_RANGE: Sense = Sense {
    key: ILLEGAL_REQUEST,
    asc: 0x21,
    ascq: 0x00,
};
pub const INVALID_FIELD_IN_CDB: Sense = Sense {
    key: ILLEGAL_REQUEST,
    asc: 0x24,
    ascq: 0x00,
};
pub const LUN_NOT_SUPPORTED: Sense = Sense {
    key: ILLEGAL_REQUEST,
    asc: 0x25,
    ascq: 0x00,
};
pub const WRITE_PROTECTED: Sense = Sense {
    key: DATA_PROTECT,
    asc: 0x27,
    ascq: 0x00,
};
/// A block that could not be read (or failed its hash check).
pub const MEDIUM_ERROR: Sense = Sense {
    key: 0x3,
    asc: 0x11, // UNRECOVERED READ ERROR
    ascq: 0x00,
};
const NOTHING: Sense = Sense {
    key: NO_SENSE,
    asc: 0,
    ascq: 0,
};

/// What the logical unit is: its size and its names.
#[derive(Clone, Debug)]
pub struct Unit {
    /// Logical blocks (the image size in 512-byte blocks, rounded up).
    pub blocks: u64,
    /// The unit serial number (VPD 0x80): the image id's 32 hex digits.
    pub serial: String,
    /// The target's iSCSI name, for the device identification page.
    pub target: String,
}

/// What a command asks the target to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Status GOOD and no data.
    Good,
    /// Status GOOD after this data (already cut to the CDB's allocation length).
    Data(Vec<u8>),
    /// Read `blocks` logical blocks from `lba` (checked against the unit and
    /// [`MAX_TRANSFER_BLOCKS`]; at least one).
    Read { lba: u64, blocks: u32 },
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// Executes `cdb` on LUN 0 (`lun0`) or any other LUN of a target that has only LUN 0.
pub fn execute(cdb: &[u8; 16], lun0: bool, unit: &Unit) -> Reply {
    let op = cdb[0];
    // INQUIRY and REPORT LUNS answer on any LUN (SPC-4 §4.6.4); the rest need one that exists.
    if !lun0 && !matches!(op, 0x12 | 0xa0 | 0x03) {
        return Reply::Check(LUN_NOT_SUPPORTED);
    }
    match op {
        0x00 => Reply::Good, // TEST UNIT READY: always ready
        0x03 => {
            // REQUEST SENSE: nothing is pending (every error was reported with its command).
            cut(sense_data(NOTHING).to_vec(), usize::from(cdb[4]))
        }
        0x12 => inquiry(cdb, lun0, unit),
        0x1a => mode_sense(cdb, unit, false),
        0x5a => mode_sense(cdb, unit, true),
        // START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, SYNCHRONIZE CACHE (10/16): nothing to
        // do on a read-only unit with no cache to flush.
        0x1b | 0x1e | 0x35 | 0x91 => Reply::Good,
        0x25 => {
            // READ CAPACITY (10): a unit past 2^32 blocks says so with the all-ones LBA.
            let last = unit.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
            let mut out = last.to_be_bytes().to_vec();
            out.extend_from_slice(&BLOCK_LEN.to_be_bytes());
            Reply::Data(out)
        }
        0x9e if cdb[1] & 0x1f == 0x10 => read_capacity16(cdb, unit),
        0x9e => Reply::Check(INVALID_FIELD_IN_CDB), // other SERVICE ACTION IN (16) actions
        0xa0 => report_luns(cdb),
        0x08 => {
            // READ (6): 21-bit LBA; a length of 0 means 256 blocks.
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            read(lba, blocks, unit)
        }
        0x28 => read(
            u64::from(be32(cdb, 2)),
            u32::from(u16::from_be_bytes([cdb[7], cdb[8]])),
            unit,
        ),
        0xa8 => read(u64::from(be32(cdb, 2)), be32(cdb, 6), unit),
        0x88 => read(be64(cdb, 2), be32(cdb, 10), unit),
        // Writes, write-and-verify, WRITE SAME, UNMAP, COMPARE AND WRITE, FORMAT UNIT, WRITE
        // LONG, WRITE BUFFER: the medium is write-protected.
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x04
        | 0x3f | 0x9f | 0x3b => Reply::Check(WRITE_PROTECTED),
        _ => Reply::Check(INVALID_OPCODE),
    }
}

/// Fixed-format sense data (SPC-4 §4.5.3): current error, 10 additional bytes.
pub fn sense_data(s: Sense) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0] = 0x70;
    out[2] = s.key;
    out[7] = 10;
    out[12] = s.asc;
    out[13] = s.ascq;
    out
}

fn read(lba: u64, blocks: u32, unit: &Unit) -> Reply {
    if lba
        .checked_add(u64::from(blocks))
        .is_none_or(|end| end > unit.blocks)
    {
        return Reply::Check(LBA_OUT_OF_RANGE);
    }
    if blocks > MAX_TRANSFER_BLOCKS {
        return Reply::Check(INVALID_FIELD_IN_CDB);
    }
    if blocks == 0 {
        return Reply::Good; // a transfer length of 0 transfers nothing (SBC-3 §5.9)
    }
    Reply::Read { lba, blocks }
}

/// `data` cut to the allocation length the CDB gave (SPC-4 §4.2.5.6).
fn cut(mut data: Vec<u8>, alloc: usize) -> Reply {
    data.truncate(alloc);
    Reply::Data(data)
}

fn inquiry(cdb: &[u8; 16], lun0: bool, unit: &Unit) -> Reply {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
    if cdb[1] & 0x02 != 0 || (!evpd && page != 0) {
        return Reply::Check(INVALID_FIELD_IN_CDB); // CMDDT, or a page without EVPD
    }
    // No unit here: peripheral qualifier 3, device type 0x1f (SPC-4 §6.6.2).
    let device = if lun0 { 0x00 } else { 0x7f };
    if !evpd {
        let mut out = vec![0u8; 66];
        out[0] = device;
        out[2] = 0x06; // SPC-4
        out[3] = 0x12; // HISUP, response data format 2
        out[4] = (out.len() - 5) as u8;
        out[7] = 0x02; // CMDQUE
        out[8..16].copy_from_slice(b"KAGAMI  ");
        out[16..32].copy_from_slice(b"image (read-only");
        out[32..36].copy_from_slice(b"0001");
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
            out[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        return cut(out, alloc);
    }
    let body: Vec<u8> = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => unit.serial.as_bytes().to_vec(),
        0x83 => device_identification(unit),
        0xb0 => {
            // Block limits: the largest transfer, and the store's block as the optimum.
            let mut p = vec![0u8; 0x3c];
            p[2..4].copy_from_slice(&(OPTIMAL_BLOCKS as u16).to_be_bytes());
            p[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            p[8..12].copy_from_slice(&OPTIMAL_BLOCKS.to_be_bytes());
            p
        }
        0xb1 => {
            // Block device characteristics: a non-rotating medium.
            let mut p = vec![0u8; 0x3c];
            p[1] = 0x01;
            p
        }
        0xb2 => vec![0u8; 4], // logical block provisioning: none (fully provisioned, read-only)
        _ => return Reply::Check(INVALID_FIELD_IN_CDB),
    };
    let mut out = vec![device, page];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    cut(out, alloc)
}

/// VPD 0x83: a T10 vendor ID designator for the unit (vendor + image id) and the target's
/// iSCSI name as a SCSI name string.
fn device_identification(unit: &Unit) -> Vec<u8> {
    let mut out = Vec::new();
    let t10 = format!("KAGAMI  {}", unit.serial);
    // Code set 2 (ASCII); association 0 (the logical unit), type 1 (T10 vendor ID).
    out.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    out.extend_from_slice(t10.as_bytes());
    // Protocol 5 (iSCSI), code set 3 (UTF-8); PIV, association 2 (target device), type 8
    // (SCSI name string): NUL-terminated, padded to a multiple of 4, at most 255 bytes.
    let mut name = unit.target.as_bytes()[..unit.target.len().min(250)].to_vec();
    name.push(0);
    name.resize(name.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(&[0x53, 0xa8, 0x00, name.len() as u8]);
    out.extend_from_slice(&name);
    out
}

fn read_capacity16(cdb: &[u8; 16], unit: &Unit) -> Reply {
    let mut out = vec![0u8; 32];
    out[..8].copy_from_slice(&unit.blocks.saturating_sub(1).to_be_bytes());
    out[8..12].copy_from_slice(&BLOCK_LEN.to_be_bytes());
    out[13] = 7; // 2^7 logical blocks per physical block: the store's 64 KiB
    cut(out, be32(cdb, 10) as usize)
}

fn report_luns(cdb: &[u8; 16]) -> Reply {
    let alloc = be32(cdb, 6) as usize;
    // SPC-4 §6.33: an allocation length under 16 is an error.
    if alloc < 16 {
        return Reply::Check(INVALID_FIELD_IN_CDB);
    }
    let mut out = vec![0u8; 16];
    out[3] = 8; // one LUN, 0, whose 8 bytes are all zero
    cut(out, alloc)
}

/// MODE SENSE (6) or (10): a header whose device-specific byte has WP set, one block
/// descriptor unless DBD, and the caching (0x08) and control (0x0A) pages.
fn mode_sense(cdb: &[u8; 16], unit: &Unit, ten: bool) -> Reply {
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    if pc == 3 {
        return Reply::Check(Sense {
            key: ILLEGAL_REQUEST,
            asc: 0x39, // SAVING PARAMETERS NOT SUPPORTED
            ascq: 0x00,
        });
    }
    if subpage != 0 && subpage != 0xff {
        return Reply::Check(INVALID_FIELD_IN_CDB);
    }
    // Changeable values (pc 1) are all zero: nothing can be changed.
    let changeable = pc == 1;
    let caching = {
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 18;
        p
    };
    let control = {
        let mut p = vec![0u8; 12];
        p[0] = 0x0a;
        p[1] = 10;
        if !changeable {
            p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
            p[8] = 0xff; // busy timeout period: unlimited
            p[9] = 0xff;
        }
        p
    };
    let pages = match page {
        0x08 => caching,
        0x0a => control,
        0x3f => [caching, control].concat(),
        _ => return Reply::Check(INVALID_FIELD_IN_CDB),
    };
    let descriptor: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut d = vec![0u8; 16];
        d[..8].copy_from_slice(&unit.blocks.to_be_bytes());
        d[12..].copy_from_slice(&BLOCK_LEN.to_be_bytes());
        d
    } else {
        // Short LBA descriptor: a count that does not fit is all ones (SBC-3 §6.4.2), then
        // a reserved byte and the 24-bit block length.
        let count = unit.blocks.min(u64::from(u32::MAX)) as u32;
        let mut d = count.to_be_bytes().to_vec();
        d.extend_from_slice(&BLOCK_LEN.to_be_bytes());
        d
    };
    const WP: u8 = 0x80;
    let mut out = if ten {
        let mut h = vec![0u8; 8];
        h[3] = WP;
        if llbaa && !dbd {
            h[4] = 0x01;
        }
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, WP, descriptor.len() as u8]
    };
    out.extend_from_slice(&descriptor);
    out.extend_from_slice(&pages);
    // The mode data length counts the bytes after itself.
    let alloc = if ten {
        let n = (out.len() - 2) as u16;
        out[..2].copy_from_slice(&n.to_be_bytes());
        usize::from(u16::from_be_bytes([cdb[7], cdb[8]]))
    } else {
        out[0] = (out.len() - 1) as u8;
        usize::from(cdb[4])
    };
    cut(out, alloc)
}

fn be32(b: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8; 16], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Any CDB on a small unit and a huge one, on LUN 0 and another: every reply stays within
/// the unit and the limits.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the fuzz target's entry point; the server never calls it"
    )
)]
pub fn fuzz(data: &[u8]) {
    let units = [
        Unit {
            blocks: 3,
            serial: "0".repeat(32),
            target: "iqn.2026-11.io.kagami:x".into(),
        },
        Unit {
            blocks: u64::MAX / 512,
            serial: String::new(),
            target: "i".repeat(300),
        },
    ];
    for chunk in data.chunks(16) {
        let mut cdb = [0u8; 16];
        cdb[..chunk.len()].copy_from_slice(chunk);
        for unit in &units {
            for lun0 in [true, false] {
                if let Reply::Read { lba, blocks } = execute(&cdb, lun0, unit) {
                    assert!((1..=MAX_TRANSFER_BLOCKS).contains(&blocks));
                    assert!(lba + u64::from(blocks) <= unit.blocks);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_images::fuzzing::Rng;

    fn unit() -> Unit {
        Unit {
            blocks: 1000,
            serial: "0123456789abcdef0123456789abcdef".into(),
            target: "iqn.2026-11.io.kagami:x".into(),
        }
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn data(r: Reply) -> Vec<u8> {
        match r {
            Reply::Data(d) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn reads_are_bounded_by_the_unit() {
        let u = unit();
        let read10 = |lba: u32, n: u16| {
            let mut c = cdb(&[0x28]);
            c[2..6].copy_from_slice(&lba.to_be_bytes());
            c[7..9].copy_from_slice(&n.to_be_bytes());
            execute(&c, true, &u)
        };
        assert_eq!(read10(0, 8), Reply::Read { lba: 0, blocks: 8 });
        assert_eq!(
            read10(999, 1),
            Reply::Read {
                lba: 999,
                blocks: 1
            }
        );
        assert_eq!(read10(999, 2), Reply::Check(LBA_OUT_OF_RANGE));
        assert_eq!(read10(5, 0), Reply::Good);
        let mut r16 = cdb(&[0x88]);
        r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        r16[10..14].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(execute(&r16, true, &u), Reply::Check(LBA_OUT_OF_RANGE));
        let big = Unit {
            blocks: 1 << 40,
            ..unit()
        };
        let mut r16 = cdb(&[0x88]);
        r16[10..14].copy_from_slice(&(MAX_TRANSFER_BLOCKS + 1).to_be_bytes());
        assert_eq!(
            execute(&r16, true, &big),
            Reply::Check(INVALID_FIELD_IN_CDB)
        );
        // READ (6): length 0 is 256 blocks.
        assert_eq!(
            execute(&cdb(&[0x08, 0, 0, 10, 0]), true, &u),
            Reply::Read {
                lba: 10,
                blocks: 256
            }
        );
    }

    #[test]
    fn writes_are_write_protected_and_unknown_opcodes_illegal() {
        let u = unit();
        for op in [0x0a, 0x2a, 0xaa, 0x8a, 0x41, 0x93, 0x42, 0x89] {
            assert_eq!(
                execute(&cdb(&[op]), true, &u),
                Reply::Check(WRITE_PROTECTED),
                "{op:#x}"
            );
        }
        assert_eq!(
            execute(&cdb(&[0xc0]), true, &u),
            Reply::Check(INVALID_OPCODE)
        );
        assert_eq!(
            execute(&cdb(&[0x28]), false, &u),
            Reply::Check(LUN_NOT_SUPPORTED)
        );
        let s = sense_data(WRITE_PROTECTED);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 7, 10, 0x27, 0));
    }

    #[test]
    fn inquiry_pages() {
        let u = unit();
        let std = data(execute(&cdb(&[0x12, 0, 0, 0, 255]), true, &u));
        assert_eq!(std.len(), 66);
        assert_eq!((std[0], std[2], usize::from(std[4]) + 5), (0, 6, 66));
        assert_eq!(&std[8..16], b"KAGAMI  ");
        let short = data(execute(&cdb(&[0x12, 0, 0, 0, 36]), true, &u));
        assert_eq!(short, std[..36]);
        assert_eq!(
            data(execute(&cdb(&[0x12, 0, 0, 0, 36]), false, &u))[0],
            0x7f,
            "no unit on LUN 1"
        );
        let pages = data(execute(&cdb(&[0x12, 1, 0, 0, 255]), true, &u));
        assert_eq!(pages, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        for p in [0x80u8, 0x83, 0xb0, 0xb1, 0xb2] {
            let d = data(execute(&cdb(&[0x12, 1, p, 1, 0]), true, &u));
            assert_eq!(d[1], p);
            assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])) + 4, d.len());
        }
        let serial = data(execute(&cdb(&[0x12, 1, 0x80, 0, 255]), true, &u));
        assert_eq!(&serial[4..], u.serial.as_bytes());
        let limits = data(execute(&cdb(&[0x12, 1, 0xb0, 0, 255]), true, &u));
        assert_eq!(
            u32::from_be_bytes(limits[8..12].try_into().expect("4")),
            MAX_TRANSFER_BLOCKS
        );
        assert_eq!(
            execute(&cdb(&[0x12, 1, 0xc7, 0, 255]), true, &u),
            Reply::Check(INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            execute(&cdb(&[0x12, 0, 0x80, 0, 255]), true, &u),
            Reply::Check(INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn capacity_mode_sense_and_luns() {
        let u = unit();
        assert_eq!(
            data(execute(&cdb(&[0x25]), true, &u)),
            [0, 0, 0x03, 0xe7, 0, 0, 2, 0]
        );
        let mut c = cdb(&[0x9e, 0x10]);
        c[13] = 32;
        let cap = data(execute(&c, true, &u));
        assert_eq!(u64::from_be_bytes(cap[..8].try_into().expect("8")), 999);
        assert_eq!(&cap[8..12], &512u32.to_be_bytes());
        let huge = Unit {
            blocks: 1 << 33,
            ..unit()
        };
        assert_eq!(
            &data(execute(&cdb(&[0x25]), true, &huge))[..4],
            &[0xff; 4],
            "READ CAPACITY (10) of a unit too big for it"
        );
        let m6 = data(execute(&cdb(&[0x1a, 0, 0x3f, 0, 255]), true, &u));
        assert_eq!((m6[0] as usize + 1, m6[2], m6[3]), (m6.len(), 0x80, 8));
        assert_eq!(&m6[4..8], &[0, 0, 0x03, 0xe8]);
        let m10 = data(execute(
            &cdb(&[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255]),
            true,
            &u,
        ));
        assert_eq!((m10[3], m10.len()), (0x80, 8 + 20), "DBD: no descriptor");
        assert_eq!(
            execute(&cdb(&[0x1a, 0, 0x19, 0, 255]), true, &u),
            Reply::Check(INVALID_FIELD_IN_CDB)
        );
        let luns = data(execute(
            &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16]),
            false,
            &u,
        ));
        assert_eq!(luns, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            data(execute(&cdb(&[0x03, 0, 0, 0, 18]), true, &u))[2],
            NO_SENSE
        );
        assert_eq!(execute(&cdb(&[0x00]), true, &u), Reply::Good);
        assert_eq!(execute(&cdb(&[0x35]), true, &u), Reply::Good);
    }

    #[test]
    fn any_cdb_executes_without_panic() {
        let mut rng = Rng(0x5c51);
        for _ in 0..20_000 {
            let mut cdb = [0u8; 16];
            for b in &mut cdb {
                *b = rng.next_u64() as u8;
            }
            // Known opcodes more often than chance.
            cdb[0] = [0x12, 0x28, 0x88, 0x9e, 0x1a, 0x5a, 0xa0, 0x08, cdb[0]][rng.below(9)];
            fuzz(&cdb);
        }
    }
}
