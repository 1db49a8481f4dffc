//! Any bytes as a DHCP request (the server's decoder and reply builder,
//! `server/src/boot/dhcp/packet.rs`).
//!
//! The server is a binary crate, so its packet module (std and dhcproto only) is included as it
//! is; the same entry point runs as a seeded property test in that module's unit tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/src/boot/dhcp/packet.rs"]
#[allow(dead_code, unfulfilled_lint_expectations)]
mod packet;

fuzz_target!(|data: &[u8]| packet::fuzz(data));
