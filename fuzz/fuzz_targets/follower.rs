#![no_main]
// Invariants: smtp_tls_proxy::fuzz_checks::check_follower (src/fuzz_checks/follower.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| smtp_tls_proxy::fuzz_checks::check_follower(data));
