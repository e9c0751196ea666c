//! libFuzzer target `alertmanager`: feeds each input to `portcullis_fuzz_targets::events::alertmanager`
//! (see that function for what it asserts).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz_targets::events::alertmanager(data);
});
