#![no_main]
// Invariants: smtp_tls_proxy::fuzz_checks::check_record (src/fuzz_checks/record.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| smtp_tls_proxy::fuzz_checks::check_record(data));
