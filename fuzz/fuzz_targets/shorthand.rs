//! libFuzzer target `shorthand`: feeds each input to `portcullis_fuzz_targets::policy::shorthand`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::policy::shorthand(data);
});
