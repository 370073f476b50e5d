//! smtp-tls-proxy: a TLS-terminating SMTP front proxy.
//!
//! ```text
//! sender / MUA ──TLS──▶ smtp-tls-proxy ──PROXY v2 + plaintext──▶ MTA (Postfix :10025)
//! ```
//!
//! # Layout
//! - `main.rs` — CLI (`run` | `check`), exit codes 0/1/2; calls into the lib only.
//! - [`config`] — proxy.yaml + `SMTP_TLS_PROXY_*` env via figment; `file` is the serde
//!   mirror, `validate` the cross-checks; errors read `file: key.path: reason`.
//! - [`snapshot`] — validated config + what is built from it (certificate store, per-listener
//!   TLS configs, upstream connectors); the unit of reload.
//! - [`server`] — binds listeners, signals (SIGHUP reload, SIGTERM drain), reload with a
//!   listener diff; [`watch`] turns file changes into reloads.
//! - [`listener`] — accept loop: takes the global/listener slots ([`limits`]), spawns
//!   [`session::run`] under a span.
//! - [`session`] — one connection: `implicit` (handshake -> upstream -> relay); `report`
//!   is the one summary line per session.
//! - [`tls`] — `store` (certificates by name), `resolve` (SNI -> certificate, pure),
//!   `accept` (ClientHello -> decision -> handshake -> facts), `client_auth`, `upstream`.
//! - [`proxy_header`] — PROXY v1/v2 towards the MTA, within Postfix's 536-byte limit;
//!   `inbound` reads it from trusted load balancers; [`io::Prefixed`] replays what followed.
//! - [`upstream`] — connect, header, optional TLS, greeting, all under `connect_timeout`.
//! - [`relay`] — both directions, half-close, idle timeout, byte counts.
//! - [`smtp`] — pure SMTP pieces (reply parsing, our replies).
//! - [`check`], [`telemetry`].
//! - `fuzz_checks` (hidden) — the invariants the `fuzz/` targets and `tests/fuzz_corpus.rs` assert.
//!
//! # Data flow
//! ```text
//! accept -> listener (Arc<ListenerRuntime> from the current snapshot) -> spawn session::run
//!   implicit: tls::accept (ClientHello -> CertChoice | unrecognized_name) -> TlsFacts
//!   upstream::connect(PROXY header from TlsFacts) -> greeting -> client
//!   relay::relay(client, upstream) -> byte counts + end -> SessionReport -> one log line
//! ```
#![forbid(unsafe_code)]

pub mod acme;
pub mod check;
pub mod config;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod health;
pub mod http;
pub mod io;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy_header;
pub mod relay;
pub mod server;
pub mod session;
pub mod smtp;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod watch;
