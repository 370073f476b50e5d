//! Drivers for the interop set (`tests/it/interop.rs`): real third-party senders and TLS stacks
//! against the proxy binary and one shared test Postfix (`common::postfix`).
//!
//! - a PKI whose leaf certificates live 81 days (sslyze's Mozilla profiles check the lifespan,
//!   and `TestPki`'s certificates are valid until 4096), an ECDSA and an RSA twin for one name;
//! - a sending Postfix instance (its smtp(8) client), one transport per case;
//! - Exim 4.96 unpacked from Debian by `.ci/interop`, run as root with a private config;
//! - a line dialogue over a child's stdin/stdout (gnutls-cli), a one-shot TCP relay that
//!   connects from a chosen loopback address (gnutls-cli cannot bind its source address);
//! - small process helpers with timeouts.
//!
//! The interop set's helpers (`tests/it/interop.rs`).
// Test support: `pub` for the test files that use it, not an API.
#![allow(unreachable_pub)]
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::common::postfix::{group_alive, is_listening, wait_until, write_backdated};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// What to do when a tool is missing.
const HINT: &str = "`sudo .ci/interop` installs the interop tools";

/// Where `.ci/interop` puts the unpacked Exim and the sslyze venv.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("INTEROP_TOOLS") {
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop"),
    }
}

pub fn exim_binary() -> PathBuf {
    tools_dir().join("exim/usr/sbin/exim4")
}

pub fn sslyze_binary() -> PathBuf {
    tools_dir().join("venv/bin/sslyze")
}

/// nss_wrapper (Debian libnss-wrapper), for Exim's compiled-in user and the MX name.
pub fn nss_wrapper() -> PathBuf {
    let arch = std::env::consts::ARCH;
    PathBuf::from(format!("/usr/lib/{arch}-linux-gnu/libnss_wrapper.so"))
}

/// A temp dir in /tmp with mode 0755: Postfix (user postfix) and Exim (user nobody) read
/// files in it and must traverse it.
pub fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------- PKI

/// A CA that signs an ECDSA P-256 and an RSA-2048 certificate for the same names, and a second
/// CA nobody trusts (the negative control). Files are world-readable (keys 0600).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub untrusted_ca: PathBuf,
    pub ecdsa: (PathBuf, PathBuf),
    pub rsa: (PathBuf, PathBuf),
}

/// Leaf lifespan: 81 days (Mozilla "modern" allows 90, "intermediate" 366), from yesterday.
fn set_validity(params: &mut CertificateParams) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let day = Duration::from_secs(86_400);
    params.not_before = epoch + (now - day);
    params.not_after = epoch + (now + 80 * day);
}

impl Pki {
    pub fn new(names: &[&str]) -> Self {
        let dir = open_tempdir("interop-pki-");
        let (ca, ca_pem) = make_ca("smtp-tls-proxy interop CA");
        let (_, untrusted_pem) = make_ca("an interop CA nobody trusts");
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let ca_path = write("ca.pem", &ca_pem, 0o644);
        let untrusted = write("untrusted-ca.pem", &untrusted_pem, 0o644);
        let (cert, key) = make_leaf(&ca, names, false);
        let ecdsa = (
            write("mx-ecdsa.crt", &cert, 0o644),
            write("mx-ecdsa.key", &key, 0o600),
        );
        let (cert, key) = make_leaf(&ca, names, true);
        let rsa = (
            write("mx-rsa.crt", &cert, 0o644),
            write("mx-rsa.key", &key, 0o600),
        );
        Self {
            dir,
            ca: ca_path,
            untrusted_ca: untrusted,
            ecdsa,
            rsa,
        }
    }
}

fn make_ca(cn: &str) -> (CertifiedIssuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let pem = ca.pem();
    (ca, pem)
}

/// (certificate PEM, private key PEM): CN and SANs `names`, EKU serverAuth, AKI present (the
/// chain builder sslyze uses, pyca/cryptography's, wants what a public CA would issue).
fn make_leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    rsa: bool,
) -> (String, String) {
    let key = if rsa {
        KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
    } else {
        KeyPair::generate().unwrap()
    };
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.key_usages = if rsa {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

// ---------------------------------------------------------------- sending Postfix

/// One delivery route of the sending Postfix: mail to `recipient` goes through the smtp(8)
/// service `service` (master.cf), bound to `bind`, to `[nexthop]` — what `relayhost =
/// [127.0.0.1]:port` does, one transport per case so that one instance serves every case.
pub struct Route {
    pub service: String,
    pub recipient: String,
    pub nexthop: SocketAddr,
    pub bind: Ipv4Addr,
    /// Extra `-o name=value` options (TLS policy) for this service.
    pub options: Vec<String>,
}

/// A private sending Postfix (`postfix -c DIR`), injected into by SMTP on its own plain port.
pub struct SenderPostfix {
    dir: tempfile::TempDir,
    port: u16,
    master_pid: u32,
}

const POSTFIX: &str = "/usr/sbin/postfix";

impl SenderPostfix {
    pub fn start(routes: &[Route]) -> Self {
        assert_eq!(
            fs::metadata("/proc/self").map(|m| m.uid()).ok(),
            Some(0),
            "private Postfix instances need root"
        );
        for attempt in 1..=3 {
            match Self::try_start(routes) {
                Ok(pf) => return pf,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {}
                Err(log) => panic!("sending postfix failed to start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn try_start(routes: &[Route]) -> Result<Self, String> {
        let dir = open_tempdir("interop-sender-");
        let d = dir.path().to_str().unwrap().to_owned();
        for sub in ["conf", "queue"] {
            fs::create_dir(format!("{d}/{sub}")).unwrap();
        }
        let port = super::free_port();
        let transport = routes
            .iter()
            .map(|r| {
                let hop = match r.nexthop {
                    SocketAddr::V4(a) => format!("[{}]:{}", a.ip(), a.port()),
                    SocketAddr::V6(a) => format!("[ipv6:{}]:{}", a.ip(), a.port()),
                };
                format!("{{{} = {}:{hop}}}", r.recipient, r.service)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut master = format!("127.0.0.1:{port} inet n - n - - smtpd\n");
        for r in routes {
            master += &format!(
                "{} unix - - n - - smtp -o smtp_bind_address={} {}\n",
                r.service,
                r.bind,
                r.options
                    .iter()
                    .map(|o| format!("-o {o}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        master += crate::common::postfix::MASTER_INTERNAL;
        write_backdated(&format!("{d}/conf/master.cf"), &master);
        write_backdated(
            &format!("{d}/conf/main.cf"),
            &format!(
                r#"compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
myhostname = sender.example.test
mydomain = sender.example.test
myorigin = sender.example.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# Only the routes below leave the box; bounces (the 530 case) end here.
default_transport = error:no route in the interop sender
relay_transport = error:no route in the interop sender
transport_maps = inline:{{ {transport} }}
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
smtp_tls_loglevel = 1
smtp_dns_support_level = disabled
smtp_tls_servername = mx.example.test
# One attempt per message within the test: a deferred message (the untrusted-CA control)
# stays in the queue and is not retried while the set runs.
queue_run_delay = 300s
minimal_backoff_time = 300s
maximal_backoff_time = 600s
biff = no
"#
            ),
        );
        let out = Command::new(POSTFIX)
            .args(["-c", &format!("{d}/conf"), "start"])
            .output()
            .unwrap();
        let log = || fs::read_to_string(format!("{d}/maillog")).unwrap_or_default();
        if !out.status.success() {
            return Err(format!("postfix start: {out:?}\n{}", log()));
        }
        let master_pid = fs::read_to_string(format!("{d}/queue/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("no master.pid\n{}", log()))?;
        let pf = Self {
            dir,
            port,
            master_pid,
        };
        if !wait_until(Duration::from_secs(30), || {
            is_listening(port) && pf.log().contains("daemon started")
        }) {
            return Err(format!("sending postfix not listening\n{}", pf.log()));
        }
        Ok(pf)
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Queue ids of the messages in the deferred queue.
    pub fn deferred(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().join("queue/deferred")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(n) = p.file_name() {
                    out.push(n.to_string_lossy().into_owned());
                }
            }
        }
        out
    }
}

impl Drop for SenderPostfix {
    fn drop(&mut self) {
        let conf = self.conf_dir();
        let postfix = |cmd: &str| {
            let _ = Command::new(POSTFIX).arg("-c").arg(&conf).arg(cmd).output();
        };
        postfix("stop");
        let pgid = self.master_pid;
        if !wait_until(Duration::from_secs(10), || !group_alive(pgid)) {
            postfix("abort");
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("sending postfix kept in {}", self.dir.path().display());
        }
    }
}

/// One message by SMTP (blocking, bounded): greeting, EHLO, MAIL, RCPT, DATA, QUIT.
/// `body` lines end in CRLF; lines starting with "." are dot-stuffed here.
pub fn smtp_submit(to_addr: SocketAddr, from: &str, rcpt: &str, body: &str) -> Result<(), String> {
    let tcp =
        TcpStream::connect_timeout(&to_addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    let mut reply = || -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("closed after {all:?}"));
            }
            all += &line;
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return Ok(all);
            }
        }
    };
    let mut expect = |w: &mut TcpStream, send: Option<String>, code: &str| -> Result<(), String> {
        if let Some(s) = send {
            w.write_all(s.as_bytes()).map_err(|e| e.to_string())?;
        }
        let got = reply()?;
        if got.starts_with(code) {
            Ok(())
        } else {
            Err(format!("expected {code}, got {got:?}"))
        }
    };
    expect(&mut w, None, "220")?;
    expect(&mut w, Some("EHLO injector.test\r\n".into()), "250")?;
    expect(&mut w, Some(format!("MAIL FROM:<{from}>\r\n")), "250")?;
    expect(&mut w, Some(format!("RCPT TO:<{rcpt}>\r\n")), "250")?;
    expect(&mut w, Some("DATA\r\n".into()), "354")?;
    expect(&mut w, Some(format!("{}.\r\n", dot_stuff(body))), "250")?;
    expect(&mut w, Some("QUIT\r\n".into()), "221")
}

/// SMTP dot-stuffing (RFC 5321 §4.5.2) of CRLF-terminated lines.
pub fn dot_stuff(body: &str) -> String {
    body.split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}")
            } else {
                l.to_owned()
            }
        })
        .collect()
}

// ---------------------------------------------------------------- Exim

/// One Exim route: mail to `local_part@example.test` goes by `smtp` (STARTTLS, with
/// `hosts_require_tls`) or `smtps` (implicit TLS) to `mx.example.test:port`, from `bind`.
pub struct EximRoute {
    pub local_part: String,
    pub port: u16,
    pub smtps: bool,
    pub bind: Ipv4Addr,
}

/// Exim from Debian, unpacked (not installed) by `.ci/interop`, with a private config and
/// spool. Exim insists on its compiled-in user `Debian-exim` (it looks the name up before it
/// reads any config, even for `-bV`); postfix conflicts with the exim4 packages, so that user
/// does not exist here. nss_wrapper supplies it (as uid 65534, nobody) and resolves
/// `mx.example.test` to 127.0.0.1, so Exim checks the certificate against the MX name as it
/// would after a DNS lookup. Exim drops root for `-C` and delivers as that user.
pub struct Exim {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Exim {
    pub fn new(routes: &[EximRoute], ca: &Path) -> Self {
        let bin = exim_binary();
        assert!(
            bin.exists(),
            "{} missing: run .ci/interop (unpacks exim4-daemon-light with apt-get download + dpkg -x)",
            bin.display()
        );
        assert!(
            nss_wrapper().exists(),
            "{} missing: apt-get install libnss-wrapper",
            nss_wrapper().display()
        );
        let dir = open_tempdir("interop-exim-");
        let d = dir.path().to_str().unwrap().to_owned();
        // A private copy, mode 0755 (never setuid: a setuid re-exec would make the loader
        // drop the nss_wrapper preload), in /tmp: Exim re-executes itself for the delivery
        // after it has dropped to uid 65534, which may not traverse the checkout's parents.
        let bin = dir.path().join("exim4");
        fs::copy(exim_binary(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["spool", "log"] {
            fs::create_dir(format!("{d}/{sub}")).unwrap();
            std::os::unix::fs::chown(format!("{d}/{sub}"), Some(65534), Some(65534)).unwrap();
        }
        fs::write(
            format!("{d}/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n\
             Debian-exim:x:65534:65534:Exim:/nonexistent:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        fs::write(
            format!("{d}/group"),
            "root:x:0:\nDebian-exim:x:65534:\nnogroup:x:65534:\n",
        )
        .unwrap();
        fs::write(format!("{d}/hosts"), "127.0.0.1 mx.example.test\n").unwrap();
        let mut routers = String::new();
        let mut transports = String::new();
        for r in routes {
            let name = &r.local_part;
            routers += &format!(
                "{name}:\n  driver = manualroute\n  local_parts = {name}\n  \
                 route_list = * mx.example.test::{} byname\n  self = send\n  transport = {name}\n",
                r.port
            );
            transports += &format!(
                "{name}:\n  driver = smtp\n  allow_localhost\n  interface = {}\n  \
                 helo_data = sender.example.test\n{}  hosts_require_tls = *\n  \
                 tls_verify_hosts = *\n  tls_verify_certificates = {}\n  tls_sni = $host\n",
                r.bind,
                if r.smtps { "  protocol = smtps\n" } else { "" },
                ca.display()
            );
        }
        let conf = dir.path().join("exim.conf");
        fs::write(
            &conf,
            format!(
                "exim_path = {bin}\n\
                 primary_hostname = sender.example.test\n\
                 qualify_domain = sender.example.test\n\
                 spool_directory = {d}/spool\n\
                 log_file_path = {d}/log/%slog\n\
                 keep_environment = LD_PRELOAD : NSS_WRAPPER_PASSWD : NSS_WRAPPER_GROUP : NSS_WRAPPER_HOSTS\n\
                 host_lookup =\n\
                 rfc1413_hosts =\n\
                 log_selector = +tls_certificate_verified +tls_peerdn +tls_sni +outgoing_port +outgoing_interface\n\
                 begin routers\n{routers}\
                 begin transports\n{transports}\
                 begin retry\n* * F,1h,1h\n",
                bin = bin.display()
            ),
        )
        .unwrap();
        Self { dir, conf }
    }

    fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(d.join("exim4"));
        cmd.env("LD_PRELOAD", nss_wrapper())
            .env("NSS_WRAPPER_PASSWD", d.join("passwd"))
            .env("NSS_WRAPPER_GROUP", d.join("group"))
            .env("NSS_WRAPPER_HOSTS", d.join("hosts"))
            .arg("-C")
            .arg(&self.conf);
        cmd
    }

    /// `exim -bV`: the version banner.
    pub fn version(&self) -> String {
        let out = run_with_timeout(self.command().arg("-bV"), None, Duration::from_secs(10));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Submits one message on stdin and delivers it in the foreground (`-odi`).
    pub fn send(&self, rcpt: &str, message: &str) -> Output {
        let mut cmd = self.command();
        cmd.args(["-odi", "-f", "sender@sender.example.test", rcpt]);
        run_with_timeout(&mut cmd, Some(message.as_bytes()), Duration::from_secs(60))
    }

    pub fn mainlog(&self) -> String {
        fs::read_to_string(self.dir.path().join("log/mainlog")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- processes

/// Runs `cmd` with `stdin` and a deadline (killed at the deadline; the output says so).
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e} ({HINT})", cmd.get_program()));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || read_all(out_pipe));
    let err_t = std::thread::spawn(move || read_all(err_pipe));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            let mut err = err_t.join().unwrap();
            err.extend_from_slice(format!("\n[killed after {timeout:?}]").as_bytes());
            return Output {
                status: s,
                stdout: out_t.join().unwrap(),
                stderr: err,
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Both outputs of a finished command, for failure messages.
pub fn transcript(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An interactive child (gnutls-cli): lines of its stdout arrive on a channel, our lines go
/// to its stdin. Everything it printed is kept for the failure message.
pub struct Dialogue {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Dialogue {
    pub fn spawn(cmd: &mut Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e} ({HINT})", cmd.get_program()));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line satisfying `pred` and returns it.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim_end_matches('\r').to_owned();
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => return Err(format!("no such line; output:\n{}", self.seen.join("\n"))),
            }
        }
    }

    /// Waits for the final line of an SMTP reply (`ddd `) and checks its code.
    pub fn reply(&mut self, code: &str) -> Result<String, String> {
        let line = self.wait_line(|l| {
            l.len() >= 4
                && l.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                && l.as_bytes()[3] == b' '
        })?;
        if line.starts_with(code) {
            Ok(line)
        } else {
            Err(format!(
                "expected {code}, got {line:?}; output:\n{}",
                self.seen.join("\n")
            ))
        }
    }

    pub fn send(&mut self, text: &str) -> Result<(), String> {
        let stdin = self.child.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("write to child: {e}"))
    }

    /// Closes stdin and waits (bounded) for the exit.
    pub fn finish(mut self) -> (Option<i32>, Vec<String>) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (code, std::mem::take(&mut self.seen))
    }
}

impl Drop for Dialogue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-connection TCP relay on 127.0.0.1: the first client that connects is spliced to `to`
/// over a connection bound to `from` (the address the proxy and Postfix then see). Returns
/// the relay's own address. The relay thread ends when both directions have closed.
pub fn relay_from(from: IpAddr, to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        // Bounded: a client that never comes does not leave the thread waiting.
        let deadline = Instant::now() + Duration::from_secs(30);
        let inbound = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        };
        if inbound.set_nonblocking(false).is_err() {
            return;
        }
        let Ok(outbound) = connect_from(from, to) else {
            return;
        };
        let pump = |mut r: TcpStream, mut w: TcpStream| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            })
        };
        let a = pump(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
        let b = pump(outbound, inbound);
        let _ = a.join();
        let _ = b.join();
    });
    addr
}

/// A blocking TCP connection from a chosen local address.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(s.into())
}
