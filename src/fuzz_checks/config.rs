//! FZ-6: the config loader (`config::load_str`: the YAML parser, figment, serde and
//! `validate`, as `config::load` runs them for a file) over arbitrary text.

use std::path::Path;

use super::our_replies;
use crate::config::{ConfigError, load_str};
use crate::smtp::dialogue::{Dialogue, default_capabilities};
use crate::smtp::reply;

const FILE: &str = "fuzz/proxy.yaml";
/// `FileConfig`'s keys: where every located error starts.
const TOP_LEVEL_KEYS: &[&str] = &[
    "log",
    "metrics",
    "shutdown_grace",
    "max_connections",
    "upstreams",
    "certificates",
    "listeners",
];

/// Input: YAML text (invalid UTF-8 replaced). Never a panic. An error names the file, a key
/// path from a real top-level key (or the mistyped key itself; none for whole-file errors)
/// and a reason, and prints as `file: key.path: reason` on one line (control characters
/// escaped: a YAML key may hold line breaks). An accepted config has listeners and
/// certificates, each listener's upstream is the configured one of that name, and every
/// reply the proxy sends with a listener's hostname in it stays within 512 octets.
pub fn check_config(data: &[u8]) {
    let yaml = String::from_utf8_lossy(data);
    match load_str(Path::new(FILE), &yaml) {
        Err(e) => check_error(&e),
        Ok(config) => {
            assert!(!config.listeners.is_empty() && !config.certificates.is_empty());
            for (name, l) in &config.listeners {
                assert_eq!(&l.name, name);
                let up = config
                    .upstreams
                    .get(&l.upstream.name)
                    .expect("a listener's upstream is configured");
                assert_eq!(up.address, l.upstream.address);
                let h = &l.hostname;
                let dialogue = Dialogue::new(h, l.require_starttls, default_capabilities());
                for ours in [
                    dialogue.greeting(),
                    reply::upstream_unavailable(h),
                    reply::command_timeout(h),
                    reply::too_many_connections(h),
                    reply::shutting_down(h),
                    format!("421 4.7.0 {h} Error: too many errors\r\n").into_bytes(),
                ] {
                    our_replies(&ours);
                }
            }
        }
    }
}

fn check_error(e: &ConfigError) {
    assert_eq!(e.source, FILE, "the error names the file: {e}");
    assert!(
        !e.reason.trim().is_empty(),
        "the error gives a reason: {e:?}"
    );
    if !e.key.is_empty() {
        // The path runs from a real top-level key, or is the mistyped top-level key itself.
        let top = e.key.split('.').next().unwrap_or_default();
        let unknown_top_level = e
            .reason
            .starts_with(&format!("unknown field: found `{}`", e.key));
        assert!(
            TOP_LEVEL_KEYS.contains(&top) || unknown_top_level,
            "key path {:?} does not start at a config key: {e}",
            e.key
        );
    }
    let shown = e.to_string();
    assert!(!shown.contains(char::is_control), "one line: {shown:?}");
    if !e.key.contains(char::is_control) && !e.reason.contains(char::is_control) {
        let expected = if e.key.is_empty() {
            format!("{FILE}: {}", e.reason)
        } else {
            format!("{FILE}: {}: {}", e.key, e.reason)
        };
        assert_eq!(shown, expected);
    } else {
        assert!(shown.starts_with(&format!("{FILE}: ")), "{shown:?}");
    }
}
