//! libFuzzer target `jsonpath`: feeds each input to `portcullis_fuzz_targets::workflow::jsonpath`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::workflow::jsonpath(data);
});
