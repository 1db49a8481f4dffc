//! Any bytes as a body of block frames or block ids.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kagami_images::fuzzing::frames(data));
