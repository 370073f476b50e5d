//! The integration tests as one binary (issue 26): one link of the test crate instead of one
//! per file, the way large Rust projects cut link time. Each former `tests/<name>.rs` is the
//! module `<name>` here, with the shared helpers in `common`; `cargo test --test it <name>::`
//! runs one of them. `tests/README.md` maps the modules to the security catalogue.

mod common;

mod abuse_controls;
mod acme;
mod acme_replicas;
mod architecture;
mod client_cert;
mod config_check;
mod dashboard;
mod deployment;
mod fault_sweep;
mod follower;
#[cfg(feature = "fuzzing")]
mod fuzz_corpus;
mod honest_ehlo;
mod implicit_tls;
mod inbound_proxy;
mod interop;
mod lifecycle;
mod mta_sts;
mod observability;
mod packaging;
mod postfix;
mod proxy_protocol;
mod reload_triggers;
mod scale_out;
mod sni;
mod starttls;
mod submission_auth;
mod tls_policy;
mod upstream_tls;
