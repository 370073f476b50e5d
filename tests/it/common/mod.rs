//! Shared test parts: a PKI made with rcgen, the proxy binary started as a child process
//! (ready when it has logged every bound listener), a recording fake MTA for unit-level
//! checks, rustls and SMTP line clients with timeouts, and a private Postfix (`postfix`).
// Test support: `pub` for the test files that use it, not an API.
#![allow(unreachable_pub)]
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

pub mod fault_mta;
pub mod interop;
pub mod pebble;
pub mod postfix;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// Bound on every single network wait in tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The one poll loop of the suite: evaluates `condition` until it gives `Some`, at most for
/// `within`, and panics naming `what` (and what the condition last said) if it never does.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match condition().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not so within {within:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sync twin of [`eventually`], for code outside the runtime (process start-up,
/// Postfix, Pebble): the same bounded poll, on this thread.
pub fn eventually_blocking<T>(
    within: Duration,
    what: &str,
    condition: impl FnMut() -> Result<T, String>,
) -> T {
    poll_blocking(within, condition)
        .unwrap_or_else(|last| panic!("{what}: not so within {within:?}; last: {last}"))
}

/// Whether `cond` holds within `within`, for callers that report the failure themselves
/// (the same poll as [`eventually_blocking`], which panics instead).
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_blocking(within, || cond().then_some(()).ok_or_else(String::new)).is_ok()
}

/// The one blocking poll loop: every 20 ms until `Ok`, or the last `Err` after `within`.
fn poll_blocking<T>(
    within: Duration,
    mut condition: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match condition() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// ---------------------------------------------------------------- PKI

/// A server CA and a client CA, with helpers writing PEM files into a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    server_ca: CertifiedIssuer<'static, KeyPair>,
    client_ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and key as files and DER.
pub struct Issued {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl TestPki {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            server_ca: ca("smtp-tls-proxy test server CA"),
            client_ca: ca("smtp-tls-proxy test client CA"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn server_ca_der(&self) -> CertificateDer<'static> {
        self.server_ca.der().clone()
    }

    /// Writes the server CA as PEM and returns its path.
    pub fn server_ca_pem(&self) -> PathBuf {
        self.write_pem("server-ca.pem", &self.server_ca.pem())
    }

    pub fn client_ca_pem(&self) -> PathBuf {
        self.write_pem("client-ca.pem", &self.client_ca.pem())
    }

    fn write_pem(&self, file: &str, pem: &str) -> PathBuf {
        let p = self.path(file);
        std::fs::write(&p, pem).unwrap();
        p
    }

    /// A server certificate for `names` from the server CA, ECDSA P-256 or RSA-2048.
    pub fn server_cert(&self, file: &str, names: &[&str], rsa: bool) -> Issued {
        let key = if rsa {
            KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
        } else {
            KeyPair::generate().unwrap()
        };
        self.server_cert_on(file, names, key)
    }

    /// A new certificate for `names` on the key in `key_path`: a renewal that keeps the key.
    pub fn renewed_server_cert(&self, file: &str, names: &[&str], key_path: &Path) -> Issued {
        let key = KeyPair::from_pem(&std::fs::read_to_string(key_path).unwrap()).unwrap();
        self.server_cert_on(file, names, key)
    }

    fn server_cert_on(&self, file: &str, names: &[&str], key: KeyPair) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.server_ca).unwrap();
        self.write(file, cert, key)
    }

    /// A server certificate from the server CA that expired in 2021.
    pub fn expired_server_cert(&self, file: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.signed_by(&key, &self.server_ca).unwrap();
        self.write(file, cert, key)
    }

    /// A client certificate with this CN from the client CA.
    pub fn client_cert(&self, file: &str, cn: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.client_ca).unwrap();
        self.write(file, cert, key)
    }

    /// A self-signed client certificate no CA knows (what Gmail presents when asked).
    pub fn unknown_client_cert(&self, file: &str, cn: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        self.write(file, cert, key)
    }

    fn write(&self, file: &str, cert: rcgen::Certificate, key: KeyPair) -> Issued {
        let cert_path = self.path(&format!("{file}.crt"));
        let key_path = self.path(&format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Issued {
            cert_path,
            key_path,
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

// ---------------------------------------------------------------- proxy process

/// The proxy binary running as a child, with its JSON log collected.
pub struct RunningProxy {
    child: Child,
    pub addrs: HashMap<String, SocketAddr>,
    logs: Arc<Mutex<Vec<Value>>>,
    pub dir: tempfile::TempDir,
}

/// The binary under test; `PROXY_UNDER_TEST` points the suite at another build (e.g. the
/// previous release, to show that a new test fails without its feature).
pub fn binary() -> String {
    std::env::var("PROXY_UNDER_TEST")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_smtp-tls-proxy").to_owned())
}

/// Runs `smtp-tls-proxy check --config CONFIG` with `env`: (exit code, stdout, stderr).
pub fn run_check(config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.arg("check").arg("--config").arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `yaml` to a temp dir and starts the proxy on it. Listeners should use port 0; the
/// bound addresses come from the proxy's `listening` log events. Returns once `ready` is logged.
pub fn spawn_proxy(yaml: &str) -> RunningProxy {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    spawn_proxy_at(dir, &config, &[])
}

pub fn spawn_proxy_at(dir: tempfile::TempDir, config: &Path, env: &[(&str, &str)]) -> RunningProxy {
    let mut cmd = Command::new(binary());
    cmd.arg("--config").arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_command(dir, cmd)
}

/// Starts the proxy with RLIMIT_NOFILE set to `nofile`, soft and hard (`prlimit` execs it:
/// same PID), so that the proxy cannot raise it at start: descriptor-exhaustion tests.
pub fn spawn_proxy_with_nofile(yaml: &str, nofile: u64) -> RunningProxy {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(binary())
        .arg("--config")
        .arg(&config);
    spawn_command(dir, cmd)
}

/// Starts the proxy as `cmd` says (e.g. inside a network namespace); returns once ready.
pub fn spawn_proxy_command(dir: tempfile::TempDir, cmd: Command) -> RunningProxy {
    spawn_command(dir, cmd)
}

fn spawn_command(dir: tempfile::TempDir, mut cmd: Command) -> RunningProxy {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the proxy binary");
    let stderr = child.stderr.take().unwrap();
    let logs: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let value =
                serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
            sink.lock().unwrap().push(value);
        }
    });
    let mut proxy = RunningProxy {
        child,
        addrs: HashMap::new(),
        logs,
        dir,
    };
    eventually_blocking(Duration::from_secs(30), "the proxy is ready", || {
        if proxy.find_log(|v| v["message"] == "ready").is_some() {
            return Ok(());
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            panic!(
                "proxy exited with {status} before ready:\n{}",
                proxy.log_text()
            );
        }
        Err(proxy.log_text())
    });
    for v in proxy.logs.lock().unwrap().iter() {
        if v["message"] == "listening" {
            let name = v["listener"].as_str().unwrap().to_owned();
            let addr = v["address"].as_str().unwrap().parse().unwrap();
            proxy.addrs.insert(name, addr);
        }
    }
    proxy
}

impl RunningProxy {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.addrs))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.logs()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn find_log(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.logs.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// Polls (bounded) until a log event matches.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(IO_TIMEOUT, "a matching log event", || async {
            self.find_log(&pred).ok_or_else(|| self.log_text())
        })
        .await
    }

    /// How many log events match so far.
    pub fn count_logs(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.logs.lock().unwrap().iter().filter(|v| pred(v)).count()
    }

    /// Polls (bounded by `within`) until at least `n` log events match; returns the n-th.
    pub async fn wait_for_nth_log(
        &self,
        n: usize,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(within, &format!("{n} matching log events"), || async {
            let found: Vec<Value> = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|v| pred(v))
                .cloned()
                .collect();
            found.get(n - 1).cloned().ok_or_else(|| self.log_text())
        })
        .await
    }

    /// Waits for the `n`-th `reloaded` event (the first reload is n = 1).
    pub async fn wait_reloaded(&self, n: usize) -> Value {
        self.wait_for_nth_log(n, IO_TIMEOUT, |v| v["message"] == "reloaded")
            .await
    }

    /// The address a listener was (last) bound to, waiting for its `listening` event.
    pub async fn listening_addr(&self, listener: &str) -> SocketAddr {
        self.wait_for_log(|v| v["message"] == "listening" && v["listener"] == listener)
            .await;
        let last = self
            .logs()
            .into_iter()
            .rev()
            .find(|v| v["message"] == "listening" && v["listener"] == listener)
            .unwrap();
        last["address"].as_str().unwrap().parse().unwrap()
    }

    /// The bound `metrics.listen` address (from the `metrics listening` event).
    pub fn metrics_addr(&self) -> SocketAddr {
        let v = self
            .find_log(|v| v["message"] == "metrics listening")
            .expect("metrics.listen configured");
        v["address"].as_str().unwrap().parse().unwrap()
    }

    /// Open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// The summary line of the session whose client port is `client`.
    pub async fn session_line(&self, client: SocketAddr) -> Value {
        let c = client.to_string();
        self.wait_for_log(|v| v["message"] == "session" && v["client"] == c.as_str())
            .await
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}", self.log_text());
        }
    }
}

// ---------------------------------------------------------------- fake MTA

/// What one connection to the fake MTA carried.
#[derive(Debug, Clone, Default)]
pub struct MtaConn {
    /// The raw PROXY header bytes (v1 line or v2 binary), empty if none.
    pub header: Vec<u8>,
    /// Command lines and message content lines as received, CRLF stripped.
    pub lines: Vec<String>,
    pub closed: bool,
}

/// A recording fake MTA: reads a PROXY header (v1/v2), greets, answers like a small ESMTP
/// server (EHLO offers STARTTLS), and records everything. Unit-level only: the real proof is Postfix.
pub struct FakeMta {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<MtaConn>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMta {
    pub async fn start() -> Self {
        Self::start_with_greeting("220 fake.mta ESMTP\r\n").await
    }

    /// For `proxy_protocol: none`: greets at once, expects no header.
    pub async fn start_without_header() -> Self {
        Self::start_inner("220 fake.mta ESMTP\r\n", false).await
    }

    pub async fn start_with_greeting(greeting: &'static str) -> Self {
        Self::start_inner(greeting, true).await
    }

    async fn start_inner(greeting: &'static str, expect_header: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<MtaConn>>> = Arc::default();
        let shared = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut index = None;
                    let _ =
                        fake_mta_conn(stream, greeting, expect_header, &shared, &mut index).await;
                    if let Some(i) = index {
                        shared.lock().unwrap()[i].closed = true;
                    }
                });
            }
        });
        Self { addr, conns, task }
    }

    pub fn conns(&self) -> Vec<MtaConn> {
        self.conns.lock().unwrap().clone()
    }

    /// Polls (bounded) until connection `index` has recorded a line matching `pred`.
    pub async fn wait_line(&self, index: usize, pred: impl Fn(&str) -> bool) -> MtaConn {
        eventually(IO_TIMEOUT, "fake MTA: the line", || async {
            self.conns()
                .get(index)
                .filter(|c| c.lines.iter().any(|l| pred(l)))
                .cloned()
                .ok_or_else(|| format!("{:?}", self.conns()))
        })
        .await
    }
}

impl Drop for FakeMta {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records a connection (at its PROXY header, or its first command other than QUIT):
/// the proxy's health probes (PROXY v2 LOCAL, or a bare greeting + QUIT) are not recorded.
fn record(shared: &Mutex<Vec<MtaConn>>, index: &mut Option<usize>) -> usize {
    *index.get_or_insert_with(|| {
        let mut c = shared.lock().unwrap();
        c.push(MtaConn::default());
        c.len() - 1
    })
}

async fn fake_mta_conn(
    mut s: TcpStream,
    greeting: &str,
    expect_header: bool,
    shared: &Mutex<Vec<MtaConn>>,
    index: &mut Option<usize>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut probe = false;
    // PROXY header: read until ppp says complete (or it is not one).
    if expect_header {
        loop {
            match ppp::HeaderResult::parse(&buf) {
                r if ppp::PartialResult::is_incomplete(&r) => {}
                ppp::HeaderResult::V1(Ok(h)) => {
                    let n = h.header.len();
                    if h.addresses == ppp::v1::Addresses::Unknown {
                        probe = true;
                    } else {
                        let i = record(shared, index);
                        shared.lock().unwrap()[i].header = buf[..n].to_vec();
                    }
                    buf.drain(..n);
                    break;
                }
                ppp::HeaderResult::V2(Ok(h)) => {
                    let n = h.len();
                    if h.command == ppp::v2::Command::Local {
                        probe = true;
                    } else {
                        let i = record(shared, index);
                        shared.lock().unwrap()[i].header = buf[..n].to_vec();
                    }
                    buf.drain(..n);
                    break;
                }
                _ => break,
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut chunk)).await??;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    s.write_all(greeting.as_bytes()).await?;
    if !greeting.starts_with('2') {
        return Ok(());
    }
    let mut in_data = false;
    loop {
        while let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            let upper = line.to_ascii_uppercase();
            // A probe without a PROXY header: greeting, EHLO localhost, QUIT.
            if index.is_none() && upper == "EHLO LOCALHOST" {
                probe = true;
            }
            if !probe && (index.is_some() || upper != "QUIT") {
                let i = record(shared, index);
                shared.lock().unwrap()[i].lines.push(line.clone());
            }
            let reply: &[u8] = if in_data {
                if line == "." {
                    in_data = false;
                    b"250 2.0.0 queued\r\n"
                } else {
                    continue;
                }
            } else if upper.starts_with("EHLO") {
                b"250-fake.mta\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("DATA") {
                in_data = true;
                b"354 go ahead\r\n"
            } else if upper.starts_with("QUIT") {
                s.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            } else {
                b"250 2.0.0 ok\r\n"
            };
            s.write_all(reply).await?;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------- clients

/// Accepts any server certificate: the tests inspect what was served instead.
/// `rsa_only` makes the client offer only RSA signature schemes (an old sender).
#[derive(Debug)]
pub struct AcceptAnyServerCert(pub Arc<rustls::crypto::CryptoProvider>, pub bool);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let all = self.0.signature_verification_algorithms.supported_schemes();
        if self.1 {
            all.into_iter()
                .filter(|s| format!("{s:?}").starts_with("RSA"))
                .collect()
        } else {
            all
        }
    }
}

/// Presents `cert` when asked and records whether the server asked (a CertificateRequest).
#[derive(Debug)]
pub struct RecordingClientCert {
    pub key: Arc<rustls::sign::CertifiedKey>,
    pub asked: Arc<std::sync::atomic::AtomicBool>,
}

impl rustls::client::ResolvesClientCert for RecordingClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        Some(self.key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A Gmail-like client: presents `cert` whenever a CertificateRequest arrives; the flag
/// tells whether one did.
pub fn recording_client(cert: &Issued) -> (ClientConfig, Arc<std::sync::atomic::AtomicBool>) {
    let p = provider();
    let key =
        rustls::sign::CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &p).unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(p, false)))
        .with_client_cert_resolver(Arc::new(RecordingClientCert {
            key: Arc::new(key),
            asked: asked.clone(),
        }));
    (config, asked)
}

/// An old sender that can only verify RSA signatures.
pub fn rsa_only_client() -> ClientConfig {
    let p = provider();
    ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(p, true)))
        .with_no_client_auth()
}

/// A client that accepts any server certificate, optionally presenting a client certificate.
pub fn inspecting_client(client_cert: Option<&Issued>) -> ClientConfig {
    let p = provider();
    let b = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(p, false)));
    match client_cert {
        Some(c) => b
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

/// A client that verifies the server against `ca`.
pub fn verifying_client(ca: CertificateDer<'static>) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// TCP connect from a chosen local address (e.g. 127.0.0.2, to tell clients apart).
pub async fn connect_from(local_ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{local_ip}:0").parse().unwrap())
        .unwrap();
    tokio::time::timeout(IO_TIMEOUT, socket.connect(to))
        .await
        .expect("connect timeout")
        .expect("connect")
}

/// TLS over `tcp` with `sni` (None: no SNI extension at all).
pub async fn tls_handshake(
    tcp: TcpStream,
    mut config: ClientConfig,
    sni: Option<&str>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_owned()).unwrap(),
        None => {
            config.enable_sni = false;
            ServerName::try_from("no-sni.invalid").unwrap()
        }
    };
    let connector = TlsConnector::from(Arc::new(config));
    tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timeout"))?
}

/// DNS names (SANs) of the certificate the server presented.
pub fn served_names(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, conn) = tls.get_ref();
    let leaf = &conn.peer_certificates().unwrap()[0];
    let (_, x) = X509Certificate::from_der(leaf.as_ref()).unwrap();
    let mut out = Vec::new();
    for n in &x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
    {
        if let GeneralName::DNSName(d) = n {
            out.push(d.to_string());
        }
    }
    out
}

/// Whether the served certificate has an RSA key.
pub fn served_rsa(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, conn) = tls.get_ref();
    let leaf = &conn.peer_certificates().unwrap()[0];
    let (_, x) = X509Certificate::from_der(leaf.as_ref()).unwrap();
    matches!(
        x.public_key().parsed(),
        Ok(x509_parser::public_key::PublicKey::RSA(_))
    )
}

/// A line-oriented SMTP client over any stream.
pub struct Smtp<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads one complete (multi-line) reply; errors on timeout or close.
    pub async fn reply(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end);
                return Ok(text);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timeout")
                })??;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed; pending {:?}", String::from_utf8_lossy(&self.buf)),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends `line` + CRLF and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await.unwrap()
    }

    /// A whole mail transaction; returns the reply to the end of data.
    pub async fn send_mail(&mut self, from: &str, to: &str, body: &str) -> String {
        assert!(
            self.cmd(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250")
        );
        assert!(
            self.cmd(&format!("RCPT TO:<{to}>"))
                .await
                .starts_with("250")
        );
        assert!(self.cmd("DATA").await.starts_with("354"));
        self.send(body.as_bytes()).await;
        self.send(b"\r\n.\r\n").await;
        self.reply().await.unwrap()
    }

    /// Bytes left unread after the last reply (should normally be empty).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        start += nl + 1;
        if line.len() < 4 || line[3] == b' ' || line[3] == b'\r' {
            return Some(start);
        }
    }
    None
}

/// Parses the PROXY v2 header the fake MTA recorded.
pub fn parse_v2(header: &[u8]) -> ppp::v2::Header<'_> {
    ppp::v2::Header::try_from(header).expect("a PROXY v2 header")
}

/// TLVs of a v2 header as (type, value).
pub fn tlvs(header: &ppp::v2::Header<'_>) -> Vec<(u8, Vec<u8>)> {
    header
        .tlvs()
        .map(|t| {
            let t = t.unwrap();
            (t.kind, t.value.to_vec())
        })
        .collect()
}

/// Sub-TLVs of a PP2_TYPE_SSL value (after client u8 + verify u32).
pub fn ssl_sub_tlvs(ssl: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = &ssl[5..];
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        out.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The TLSA `3 1 1` value of a certificate (SHA-256 of its SubjectPublicKeyInfo), computed
/// here with x509-parser, independently of the proxy's own code.
pub fn tlsa_of(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::prelude::X509Certificate::from_der(der).unwrap();
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, x.public_key().raw);
    format!("3 1 1 {}", hex(d.as_ref()))
}

/// A proxy config built as data: JSON is YAML, so the proxy reads `to_string()` unchanged,
/// and a test says what it sets instead of indenting strings. Listeners listen on
/// 127.0.0.1:0 and use the upstream `mta` unless told otherwise.
///
/// ```ignore
/// TestConfig::new(pf.proxy_addr())
///     .self_signed(&["mx.example.test"])
///     .starttls("smtp", "mx.example.test", json!({ "deny": ["127.0.0.9/32"] }))
///     .write_and_spawn()
/// ```
#[derive(Debug, Clone)]
pub struct TestConfig(pub Value);

impl TestConfig {
    pub fn new(upstream: SocketAddr) -> Self {
        Self(serde_json::json!({
            "log": { "format": "json" },
            "upstreams": { "mta": { "address": upstream.to_string(), "connect_timeout": "3s" } },
            "certificates": [],
            "listeners": {},
        }))
    }

    /// Merges `extra` into the top level (e.g. `{"metrics": {"listen": "127.0.0.1:0"}}`).
    pub fn top(mut self, extra: Value) -> Self {
        for (k, v) in extra.as_object().unwrap() {
            self.0[k] = v.clone();
        }
        self
    }

    /// Merges `extra` into upstream `mta` (e.g. `{"health_interval": "1s"}`).
    pub fn upstream(mut self, extra: Value) -> Self {
        for (k, v) in extra.as_object().unwrap() {
            self.0["upstreams"]["mta"][k] = v.clone();
        }
        self
    }

    pub fn certificate(mut self, c: &Issued) -> Self {
        let entry = serde_json::json!({ "cert": c.cert_path, "key": c.key_path });
        self.0["certificates"].as_array_mut().unwrap().push(entry);
        self
    }

    pub fn self_signed(mut self, names: &[&str]) -> Self {
        let entry = serde_json::json!({ "self_signed": names });
        self.0["certificates"].as_array_mut().unwrap().push(entry);
        self
    }

    fn listener(mut self, name: &str, mode: &str, hostname: &str, extra: Value) -> Self {
        let mut l = serde_json::json!({
            "listen": "127.0.0.1:0", "mode": mode, "hostname": hostname, "upstream": "mta",
        });
        for (k, v) in extra.as_object().unwrap() {
            l[k] = v.clone();
        }
        self.0["listeners"][name] = l;
        self
    }

    pub fn starttls(self, name: &str, hostname: &str, extra: Value) -> Self {
        self.listener(name, "starttls", hostname, extra)
    }

    pub fn implicit(self, name: &str, hostname: &str, extra: Value) -> Self {
        self.listener(name, "implicit", hostname, extra)
    }

    /// Starts the proxy on this config (see `spawn_proxy`).
    pub fn spawn(&self) -> RunningProxy {
        spawn_proxy(&self.0.to_string())
    }
}

/// A proxy config with one fake-MTA upstream, the given certificate entries and listeners.
pub fn yaml(
    upstream: SocketAddr,
    upstream_extra: &str,
    certificates: &str,
    listeners: &str,
) -> String {
    format!(
        "log: {{ format: json }}\nupstreams:\n  mta:\n    address: \"{upstream}\"\n    connect_timeout: 2s\n{upstream_extra}\ncertificates:\n{certificates}\nlisteners:\n{listeners}\n"
    )
}

/// A `certificates:` entry for issued files.
pub fn cert_entry(c: &Issued) -> String {
    format!(
        "  - cert: {}\n    key: {}\n",
        c.cert_path.display(),
        c.key_path.display()
    )
}

/// An implicit listener on 127.0.0.1:0 named `name` with extra indented keys.
pub fn implicit_listener(name: &str, hostname: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    listen: \"127.0.0.1:0\"\n    mode: implicit\n    hostname: {hostname}\n    upstream: mta\n{extra}"
    )
}

/// Handshake + greeting + EHLO + one message + QUIT through an implicit listener.
pub async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(smtp: &mut Smtp<S>, body: &str) {
    let greeting = smtp.reply().await.unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    let r = smtp
        .send_mail("a@client.test", "b@example.test", body)
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
}

/// Closes with a TCP RST (SO_LINGER 0): what a crashed or killed client looks like.
pub fn abort(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// TCP from `local_ip`, then a TLS handshake that must succeed: the stream and the
/// client's own address (to find its `session_line`).
pub async fn tls_client(
    local_ip: &str,
    to: SocketAddr,
    config: ClientConfig,
    sni: Option<&str>,
) -> (tokio_rustls::client::TlsStream<TcpStream>, SocketAddr) {
    let tcp = connect_from(local_ip, to).await;
    let client = tcp.local_addr().unwrap();
    let tls = tls_handshake(tcp, config, sni).await.unwrap();
    (tls, client)
}

// ---------------------------------------------------------------- HTTP / metrics

/// GET `path` over plain HTTP/1.1; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// One sample line: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parsed exposition: one entry per sample line.
pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    pub async fn get(addr: SocketAddr) -> Self {
        let (code, body) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        Self::parse(&body)
    }

    pub fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (n.to_owned(), labels)
                }
                None => (series.to_owned(), Vec::new()),
            };
            out.push((name, labels, value.parse().unwrap()));
        }
        Self(out)
    }

    /// Sum of the samples named `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// Where fixed ports come from: below the kernel's ephemeral range (32768–60999 by
/// default), which every `127.0.0.1:0` bind and every outgoing connection draws from.
const FIXED_PORTS: std::ops::Range<u32> = 20_000..32_000;

/// Ports handed out so far in this process.
static PORTS_TAKEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `n` distinct free ports on 127.0.0.1, free for TCP and UDP, for processes that must be
/// told their port beforehand (Postfix, Pebble, HAProxy, a proxy whose address goes in a
/// config). A port taken with `bind(0)` and released was free only until the next test's
/// `bind(0)` or connect took it (seen under load: "Address already in use", and a balancer
/// port served by another process). These come from outside the ephemeral range and are
/// never handed out twice in this process (a pid-based start keeps two test processes apart).
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::Ordering;
    let span = FIXED_PORTS.end - FIXED_PORTS.start;
    let start = std::process::id() % span;
    (0..n)
        .map(|_| {
            loop {
                let k = PORTS_TAKEN.fetch_add(1, Ordering::Relaxed);
                assert!(k < span, "ran out of fixed test ports");
                let port = (FIXED_PORTS.start + (start + k) % span) as u16;
                // Something else on this machine may listen there: skipped.
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                    && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
                {
                    break port;
                }
            }
        })
        .collect()
}

/// A free port on 127.0.0.1 (see `free_ports`).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}
