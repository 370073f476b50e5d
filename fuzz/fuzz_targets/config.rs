#![no_main]
// Invariants: smtp_tls_proxy::fuzz_checks::check_config (src/fuzz_checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| smtp_tls_proxy::fuzz_checks::check_config(data));
