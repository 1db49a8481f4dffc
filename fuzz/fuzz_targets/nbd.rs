//! Any bytes as the client side of an NBD session (the server's codec,
//! `server/src/stream/nbd/proto.rs`): client flags, framed options, transmission requests.
//!
//! The server is a binary crate, so its std-only codec is included as it is; the same entry
//! point runs as a seeded property test in that module's unit tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/src/stream/nbd/proto.rs"]
#[allow(dead_code, unfulfilled_lint_expectations)]
mod proto;

fuzz_target!(|data: &[u8]| proto::fuzz(data));
