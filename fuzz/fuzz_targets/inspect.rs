//! Any bytes, inspected as every format; an accepted image is also read as its disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kagami_images::fuzzing::inspect_and_read(data));
