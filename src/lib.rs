//! smtp-tls-proxy: a TLS-terminating SMTP front proxy.
//!
//! ```text
//! sender / MUA ──TLS──▶ smtp-tls-proxy ──PROXY v2 + plaintext──▶ MTA (Postfix :10025)
//! ```
//!
//! # Map
//! Every module, one line each (`tests/it/architecture.rs` fails when one is missing here).
//! - `main.rs` — CLI (`run` | `check`), exit codes 0/1/2; calls into the lib only.
//! - [`config`] — proxy.yaml + `SMTP_TLS_PROXY_*` env via figment; `file` is the serde
//!   mirror, `validate` (and `certificates`) the cross-checks producing the `types`;
//!   errors read `file: key.path: reason`.
//! - [`snapshot`] — validated config + what is built from it (certificate store, per-listener
//!   TLS configs with their resumption caches, upstream connectors, metric handles, the
//!   stamps of the files read); the unit of reload.
//! - [`server`] — the `Supervisor` owns what runs beside sessions (current snapshot,
//!   health, ACME, status server, running listeners, watcher): `adopt` (start-up and
//!   reload alike), `reload` with a listener diff, `drain`; `run(start, triggers)` takes
//!   its shutdown and reload triggers as values (`Triggers::from_signals`: SIGTERM/SIGINT,
//!   SIGHUP). [`watch`] turns file changes into reloads (filtered, debounced, skipped when
//!   nothing changed).
//! - [`listener`] — accept loop: one [`admission`]`::Admission` per loop gives each
//!   connection its permits (global and listener slots), then spawns [`session::run`].
//! - [`session`] — one connection as typed phases over any `ClientStream`: `phases`
//!   (inbound PROXY, admission on the real address, TLS, upstream, relay), `implicit`,
//!   `starttls` (the dialogue and its two hand-offs), `https` (the MTA-STS policy host's
//!   request); `report` holds the facts (the
//!   permits among them) and the one summary line.
//! - [`smtp`] — pure SMTP, no sockets: `command` (the session's one reading of a command
//!   line, Postfix's), `line` (bounded line reader), `dialogue` (pre-TLS state machine),
//!   `pretls` (the two glued with the hand-off rules), `stream` (the follower after the
//!   hand-off), `guard` (the smuggling guard on DATA content), `ehlo`, `reply`.
//! - [`tls`] — `cert` (a served certificate and its leaf facts), `store` (certificates by
//!   name), `resolve` (SNI -> certificate, pure), `accept` (ClientHello -> decision ->
//!   handshake -> facts), `handshake` (TLS 1.3 on rustls' unbuffered connection, sans IO,
//!   handing over to `record`), `client_auth`, `upstream` (re-encryption towards the MTA).
//! - [`record`] — the TLS 1.3 record layer of established client sessions, sans IO:
//!   `layer` (open in place, seal, alerts, KeyUpdate), `stream` (`OwnTls`, its
//!   `AsyncRead`/`AsyncWrite` over the socket with one buffer per thread).
//! - [`acme`] — tls-alpn-01 certificates, obtained and renewed while running: `order` (the
//!   client loop of each replica), `store` (the directory replicas share, with its lock).
//!   It implements `tls::store::ManagedCert`; `tls` does not import `acme`.
//! - [`proxy_header`] — PROXY v1/v2 towards the MTA, within Postfix's 536-byte limit;
//!   `inbound` reads it from trusted load balancers; [`io`]`::Prefixed` replays what followed.
//! - [`admission`] — whether a connection may become a session: `Admission` (one per accept
//!   loop, outliving reloads) hands out `Permits` at accept (`limits`: global and listener
//!   slots) and admits the real client address (`abuse`: `allow`/`deny`, the polled
//!   `deny_file`, `per_ip_rate`; then the per-IP slot) before any TLS work. The permits
//!   travel in the session's facts and are released when it ends.
//! - [`upstream`] — connect, header, optional TLS, greeting, all under `connect_timeout`.
//! - [`mta_sts`] — the MTA-STS policy host (RFC 8461), sans IO: each domain's policy text
//!   and id, and what a request gets; `session::https` serves it with hyper.
//! - [`relay`] — both directions, half-close, idle timeout, byte counts.
//! - [`health`] — the upstream probe (PROXY v2 LOCAL, greeting); [`http`] serves
//!   `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`] — the registry, closed: private families, a verb per metric, every fixed
//!   label set an enum with `ALL` (`labels`); a leaf that imports nothing from the crate.
//! - [`check`], [`telemetry`], [`hex`] (lower-case hex of digests and ids).
//! - `fuzz_checks` (feature `fuzzing` only) — the invariants the `fuzz/` targets and
//!   `tests/it/fuzz_corpus.rs` assert.
//!
//! # Data flow
//! ```text
//! accept -> listener (Arc<ListenerRuntime> from the current snapshot) -> spawn session::run
//!   (admission: permits at accept) read_proxy_header -> admit (real address, per-IP) ->
//!   implicit: into_tls -> connect (PROXY header from the facts) -> greeting -> relay
//!   starttls: dialogue -> upgrade:      into_tls -> first command -> connect -> relay
//!                      -> pass-through: connect -> replay EHLO/HELO -> relay
//!   -> Finished (owed reply written) -> slots freed -> SessionReport -> one log line
//! reload: SIGHUP | watch (filtered events, debounce, unchanged stamps skipped)
//!   -> snapshot::read_config + build (session caches carried over) -> bind new
//!   -> Supervisor::adopt -> swap -> unbind gone
//! health: every health_interval per upstream -> metrics upstream_up, /readyz
//! ```
#![forbid(unsafe_code)]

pub mod acme;
pub mod admission;
pub mod check;
pub mod config;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_checks;
pub(crate) mod health;
pub(crate) mod hex;
pub(crate) mod http;
pub(crate) mod io;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod mta_sts;
pub(crate) mod proxy_header;
pub(crate) mod record;
pub(crate) mod relay;
pub mod server;
pub(crate) mod session;
pub(crate) mod smtp;
pub mod snapshot;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod upstream;
pub(crate) mod watch;
