//! libFuzzer target `http1_head`: feeds each input to `portcullis_fuzz_targets::edge::http1_head`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::edge::http1_head(data);
});
