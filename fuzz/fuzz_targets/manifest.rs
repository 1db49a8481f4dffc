//! Any bytes as a manifest bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kagami_images::fuzzing::manifest(data));
