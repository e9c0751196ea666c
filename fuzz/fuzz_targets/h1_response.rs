//! libFuzzer target `h1_response`: feeds each input to `portcullis_fuzz_targets::upstream::h1_response`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::upstream::h1_response(data);
});
