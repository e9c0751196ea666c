//! libFuzzer target `limits`: feeds each input to `portcullis_fuzz_targets::limits::limits`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::limits::limits(data);
});
