//! Any bytes as the initiator side of an iSCSI session (the server's codec,
//! `server/src/stream/iscsi/pdu.rs`, and its SCSI command set, `scsi.rs`): PDUs framed by their
//! headers, login fields and text pairs decoded, and every 16 bytes run as a CDB.
//!
//! The server is a binary crate, so its std-only modules are included as they are; the same
//! entry points run as seeded property tests in those modules' unit tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/src/stream/iscsi/pdu.rs"]
#[allow(dead_code, unfulfilled_lint_expectations)]
mod pdu;

#[path = "../../server/src/stream/iscsi/scsi.rs"]
#[allow(dead_code, unfulfilled_lint_expectations)]
mod scsi;

fuzz_target!(|data: &[u8]| {
    pdu::fuzz(data);
    scsi::fuzz(data);
});
