//! The fuzz targets' committed inputs under plain `cargo test` (catalogue §I: "run each
//! target's corpus as ordinary cargo test cases"): every file in `fuzz/seeds/<target>/`,
//! seeds and minimised regression inputs alike, goes through the same check the fuzz
//! target runs (`smtp_tls_proxy::fuzz_checks`). Long fuzzing runs stay in `.ci/fuzz`.

use std::path::{Path, PathBuf};

use smtp_tls_proxy::fuzz_checks;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

/// Runs every input, then names all that failed (a panic message per file goes to stderr).
fn replay(target: &str, check: fn(&[u8])) {
    let failed: Vec<String> = inputs(target)
        .into_iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a readable input");
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}

#[test]
fn dialogue_corpus_keeps_its_invariants() {
    replay("dialogue", fuzz_checks::check_dialogue);
}

#[test]
fn follower_corpus_keeps_its_invariants() {
    replay("follower", fuzz_checks::check_follower);
}

#[test]
fn ehlo_filter_corpus_keeps_its_invariants() {
    replay("ehlo_filter", fuzz_checks::check_ehlo_filter);
}

#[test]
fn proxy_inbound_corpus_keeps_its_invariants() {
    replay("proxy_inbound", fuzz_checks::check_proxy_inbound);
}

#[test]
fn proxy_outbound_corpus_keeps_its_invariants() {
    replay("proxy_outbound", fuzz_checks::check_proxy_outbound);
}

#[test]
fn config_corpus_keeps_its_invariants() {
    replay("config", fuzz_checks::check_config);
}

#[test]
fn record_corpus_keeps_its_invariants() {
    replay("record", fuzz_checks::check_record);
}
