//! libFuzzer target `jwt_claims`: feeds each input to `portcullis_fuzz_targets::identity::jwt_claims`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::identity::jwt_claims(data);
});
