//! Issue 28: what the package ships besides the binary. The man pages and completions come
//! from the clap definitions (`smtp-tls-proxy generate-assets`) and must render without a
//! warning; the hand-written smtp-tls-proxy.yaml(5) must name every key of the shipped
//! `proxy.yaml` (so the two cannot drift apart).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::common::binary;

const YAML_PAGE: &str = "packaging/man/smtp-tls-proxy.yaml.5";

/// Keys of proxy.yaml, commented-out ones included: a `key:` at the start of a line (after
/// `#`, `-` and blanks) or inside a `{ ... }` flow map. The example's own names (an
/// upstream called mta, listeners called smtp ...) are names, not keys.
fn yaml_keys(text: &str) -> Vec<String> {
    const NAMES: [&str; 6] = [
        "mta",
        "smtp",
        "submission",
        "submissions",
        "https",
        "normalize",
    ];
    let mut keys = std::collections::BTreeSet::new();
    let is_key = |w: &str| {
        !w.is_empty()
            && w.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    for line in text.lines() {
        let start = line.trim_start_matches([' ', '#', '-']);
        if let Some((word, _)) = start.split_once(':')
            && is_key(word)
        {
            keys.insert(word.to_owned());
        }
        if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
            for part in line[open + 1..close].split(',') {
                if let Some((word, _)) = part.trim().split_once(':')
                    && is_key(word)
                {
                    keys.insert(word.to_owned());
                }
            }
        }
    }
    keys.into_iter()
        .filter(|k| !NAMES.contains(&k.as_str()))
        .collect()
}

/// The words a man page sets in bold, whole: the arguments of `.B`, the odd ones of `.BR`
/// (it alternates bold and roman), and `\fBword\fR` inline.
fn bold_words(page: &str) -> std::collections::BTreeSet<String> {
    // roff arguments: separated by blanks, a double-quoted one may hold blanks.
    let args = |rest: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = rest.trim_start();
        while !rest.is_empty() {
            let (arg, after) = match rest.strip_prefix('"') {
                Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
                None => rest.split_once(' ').unwrap_or((rest, "")),
            };
            out.push(arg.to_owned());
            rest = after.trim_start();
        }
        out
    };
    let mut bold = std::collections::BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix(".B ") {
            bold.extend(args(rest));
        } else if let Some(rest) = line.strip_prefix(".BR ") {
            bold.extend(args(rest).into_iter().step_by(2));
        }
        for piece in line.split("\\fB").skip(1) {
            if let Some((word, _)) = piece.split_once("\\f") {
                bold.insert(word.to_owned());
            }
        }
    }
    bold
}

#[test]
fn the_yaml_man_page_names_every_key_of_the_shipped_proxy_yaml() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("proxy.yaml")).unwrap();
    let page = std::fs::read_to_string(root.join(YAML_PAGE)).unwrap();
    let keys = yaml_keys(&yaml);
    assert!(keys.len() > 40, "the key scan found too little: {keys:?}");
    let bold = bold_words(&page);
    let missing: Vec<&String> = keys.iter().filter(|k| !bold.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "keys of proxy.yaml not in {YAML_PAGE}: {missing:?}"
    );
}

/// groff's own warnings (`-ww`, nothing printed) for a man page.
fn groff_warnings(page: &Path) -> String {
    let out = Command::new("groff")
        .args(["-ww", "-man", "-z"])
        .arg(page)
        .output()
        .expect("groff (groff-base)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn generated_man_pages_and_completions_render_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(binary())
        .arg("generate-assets")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for page in [
        "smtp-tls-proxy.8",
        "smtp-tls-proxy-run.8",
        "smtp-tls-proxy-check.8",
    ] {
        let path = dir.path().join("man").join(page);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(".TH"), "{page}");
        let warnings = groff_warnings(&path);
        assert!(warnings.is_empty(), "{page}: {warnings}");
    }
    let main = std::fs::read_to_string(dir.path().join("man/smtp-tls-proxy.8")).unwrap();
    assert!(main.contains("smtp\\-tls\\-proxy\\-check(8)"), "{main}");
    assert!(main.contains("smtp\\-tls\\-proxy.yaml(5)"), "{main}");
    let yaml_page = Path::new(env!("CARGO_MANIFEST_DIR")).join(YAML_PAGE);
    let warnings = groff_warnings(&yaml_page);
    assert!(warnings.is_empty(), "{YAML_PAGE}: {warnings}");
    // bash: the completion script registers itself for the command.
    let bash = dir.path().join("completions/smtp-tls-proxy");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p smtp-tls-proxy",
            bash.display()
        ))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("smtp-tls-proxy"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "completions/_smtp-tls-proxy",
        "completions/smtp-tls-proxy.fish",
    ] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(text.contains("check"), "{file} completes the subcommands");
    }
}
