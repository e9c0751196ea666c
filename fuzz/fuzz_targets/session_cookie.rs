//! libFuzzer target `session_cookie`: feeds each input to `portcullis_fuzz_targets::identity::session_cookie`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::identity::session_cookie(data);
});
