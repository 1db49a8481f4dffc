//! Any bytes as a TFTP packet (the server's decoder, `server/src/boot/tftp/packet.rs`).
//!
//! The server is a binary crate, so its std-only packet module is included as it is; the same
//! entry point runs as a seeded property test in that module's unit tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/src/boot/tftp/packet.rs"]
#[allow(dead_code, unfulfilled_lint_expectations)]
mod packet;

fuzz_target!(|data: &[u8]| packet::fuzz(data));
