//! A private, throw-away Postfix instance per test (Debian bookworm, Postfix 3.7, must run as root).
//!
//! Each instance lives entirely in its own temp dir (config, queue, data, Maildir, log) and only
//! listens on 127.0.0.1 ports picked at random, so tests can run in parallel. The system's default
//! instance (/etc/postfix) is never touched: as root, `postfix -c DIR` needs no
//! `alternate_config_directories` / `multi_instance_*` entry in /etc/postfix/main.cf (that check
//! only applies to non-root callers and the setgid postdrop/postqueue, which we do not use).
#![allow(dead_code)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const POSTFIX: &str = "/usr/sbin/postfix";
/// uid/gid of nobody/nogroup on Debian; the virtual(8) agent writes the Maildir as this user.
const NOBODY: u32 = 65534;

#[derive(Clone, Debug, Default)]
pub struct PostfixOptions {
    /// Extra smtpd in TLS wrapper mode (implicit TLS, like port 465) that also expects PROXY.
    /// (certificate chain PEM, private key PEM); read by smtpd as root on first connection.
    pub wrapper_tls: Option<(PathBuf, PathBuf)>,
    /// Extra plain smtpd (no PROXY) offering STARTTLS with this (cert chain PEM, key PEM).
    pub starttls_plain: Option<(PathBuf, PathBuf)>,
    /// Cyrus SASL on the PROXY port (`smtpd_sasl_auth_enable`), PLAIN/LOGIN against a private
    /// sasldb holding this (user, password) in realm example.test (Debian's sasl2-bin).
    pub sasl: Option<(String, String)>,
    /// Extra main.cf lines (e.g. `message_size_limit = 12345678`).
    pub main_cf_extra: String,
}

pub struct Postfix {
    dir: tempfile::TempDir,
    proxy_port: u16,
    plain_port: u16,
    wrapper_port: Option<u16>,
    starttls_port: Option<u16>,
    master_pid: u32,
}

impl Postfix {
    /// Starts an instance; panics (with the instance log) if it does not come up.
    /// Ports are found by binding 127.0.0.1:0 and dropping the listener, so another process may
    /// grab one before master binds it; master then dies with "Address already in use" and we
    /// retry with fresh ports (up to 3 attempts).
    pub fn start(opts: PostfixOptions) -> Self {
        assert!(
            Path::new(POSTFIX).exists(),
            "{POSTFIX} missing: apt-get install postfix"
        );
        let euid = fs::metadata("/proc/self").map(|m| m.uid());
        assert_eq!(euid.ok(), Some(0), "private Postfix instances need root");
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_start(&opts) {
                Ok(pf) => return pf,
                Err(log) if attempts < 3 && log.contains("Address already in use") => {}
                Err(log) => panic!("postfix failed to start (attempt {attempts}):\n{log}"),
            }
        }
    }

    fn try_start(opts: &PostfixOptions) -> Result<Self, String> {
        // Explicitly in /tmp: every parent directory must be traversable by the postfix and
        // nobody users (a TMPDIR below /root would break that).
        let dir = tempfile::Builder::new()
            .prefix("postfix-test-")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        let d = dir
            .path()
            .to_str()
            .expect("temp dir path must be UTF-8")
            .to_owned();
        // tempfile creates 0700; master opens data/master.lock *after* dropping to the postfix
        // user ("open lock file .../data/master.lock: Permission denied"), so open it up.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        for sub in ["conf", "queue", "mail"] {
            // queue_directory must exist: `postfix` chdir()s there before anything else.
            // Its subdirectories and data/ are created with the right owners by `postfix start`
            // (postfix-script check-fatal runs post-install create-missing).
            fs::create_dir(format!("{d}/{sub}")).expect("mkdir");
        }
        std::os::unix::fs::chown(format!("{d}/mail"), Some(NOBODY), Some(NOBODY)).expect("chown");

        let ports = super::free_ports(4);
        let (proxy_port, plain_port) = (ports[0], ports[1]);
        let wrapper_port = opts.wrapper_tls.as_ref().map(|_| ports[2]);
        let starttls_port = opts.starttls_plain.as_ref().map(|_| ports[3]);

        // Columns: service type private unpriv chroot wakeup maxproc command.
        // chroot MUST be n everywhere: a chroot would be the queue dir, lacking libs/etc files.
        let mut master = format!(
            "127.0.0.1:{proxy_port} inet n - n - - smtpd {}\n\
             127.0.0.1:{plain_port} inet n - n - - smtpd\n",
            proxy_port_options()
        );
        if let (Some(port), Some(files)) = (wrapper_port, &opts.wrapper_tls) {
            let o = format!(
                "{} -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt",
                proxy_port_options()
            );
            master += &tls_service(port, &o, files);
        }
        if let (Some(port), Some(files)) = (starttls_port, &opts.starttls_plain) {
            master += &tls_service(port, "-o smtpd_tls_security_level=may", files);
        }
        master += MASTER_INTERNAL;
        write_backdated(&format!("{d}/conf/master.cf"), &master);
        let mut main = main_cf(&d);
        if let Some((user, password)) = &opts.sasl {
            main += &sasl_setup(&d, user, password);
        }
        main += &opts.main_cf_extra;
        write_backdated(&format!("{d}/conf/main.cf"), &main);

        let out = Command::new(POSTFIX)
            .args(["-c", &format!("{d}/conf"), "start"])
            .output()
            .expect("run postfix start");
        let log = || fs::read_to_string(format!("{d}/maillog")).unwrap_or_default();
        if !out.status.success() {
            let (o, e) = (&out.stdout, &out.stderr);
            let (o, e) = (String::from_utf8_lossy(o), String::from_utf8_lossy(e));
            return Err(format!(
                "postfix start: {}\n{o}{e}\n--- {d}/maillog ---\n{}",
                out.status,
                log()
            ));
        }
        let master_pid = fs::read_to_string(format!("{d}/queue/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("no master.pid\n{}", log()))?;
        let pf = Self {
            dir,
            proxy_port,
            plain_port,
            wrapper_port,
            starttls_port,
            master_pid,
        };
        // `postfix start` runs `master -w`, which only returns once master is up, so this is
        // normally satisfied at once. We check LISTEN in /proc/net/tcp instead of connecting:
        // a probe connection would add "connect from unknown[127.0.0.1]" / "haproxy read: EOF"
        // noise to the log that tests match against.
        let all = [
            Some(proxy_port),
            Some(plain_port),
            wrapper_port,
            starttls_port,
        ];
        let ready = wait_until(Duration::from_secs(30), || {
            all.iter().flatten().all(|p| is_listening(*p)) && pf.log().contains("daemon started")
        });
        if !ready {
            // Dropping `pf` stops the instance.
            return Err(format!(
                "postfix did not start listening within 30 s\n{}",
                pf.log()
            ));
        }
        Ok(pf)
    }

    /// Stops the instance's master (all its ports close) to simulate an MTA outage.
    pub fn stop_for_outage(&self) {
        self.control("stop", false);
    }

    /// Starts the instance again after `stop_for_outage`.
    pub fn restart_after_outage(&self) {
        self.control("start", true);
    }

    /// `postfix -c DIR <action>`, then waits (bounded) until the PROXY port is (not) listening.
    fn control(&self, action: &str, listening: bool) {
        let out = Command::new(POSTFIX)
            .arg("-c")
            .arg(self.conf_dir())
            .arg(action)
            .output()
            .expect("run postfix");
        assert!(out.status.success(), "postfix {action}: {out:?}");
        let port = self.proxy_port;
        assert!(
            wait_until(Duration::from_secs(30), || is_listening(port) == listening),
            "postfix {action}: port {port} listening is not {listening}"
        );
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }
    pub fn proxy_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.proxy_port).into()
    }
    pub fn plain_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.plain_port).into()
    }
    pub fn wrapper_addr(&self) -> Option<SocketAddr> {
        self.wrapper_port.map(|p| (Ipv4Addr::LOCALHOST, p).into())
    }
    pub fn starttls_addr(&self) -> Option<SocketAddr> {
        self.starttls_port.map(|p| (Ipv4Addr::LOCALHOST, p).into())
    }

    /// Contents of the instance's `maillog_file`.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Waits until a log line contains `needle` and returns that (first) line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let find = || {
            self.log()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
        };
        if wait_until(timeout, || find().is_some())
            && let Some(line) = find()
        {
            return line;
        }
        panic!(
            "no log line containing {needle:?} within {timeout:?}; log:\n{}",
            self.log()
        );
    }

    /// All delivered messages (Maildir new/ and cur/), oldest file name first. virtual(8) writes
    /// into tmp/ and renames, so every file seen here is complete.
    pub fn messages(&self) -> Vec<String> {
        let maildir = self.dir.path().join("mail/Maildir");
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .filter_map(|sub| fs::read_dir(maildir.join(sub)).ok())
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort_by_key(|p| p.file_name().map(ToOwned::to_owned));
        files
            .iter()
            .filter_map(|p| fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    /// Waits until a delivered message contains `needle` and returns the whole message.
    pub fn wait_for_message(&self, needle: &str, timeout: Duration) -> String {
        let find = || self.messages().into_iter().find(|m| m.contains(needle));
        if wait_until(timeout, || find().is_some())
            && let Some(msg) = find()
        {
            return msg;
        }
        panic!(
            "no delivered message containing {needle:?} within {timeout:?}; {} message(s); log:\n{}",
            self.messages().len(),
            self.log()
        );
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let postfix = |cmd: &str| {
            let _ = Command::new(POSTFIX)
                .arg("-c")
                .arg(self.conf_dir())
                .arg(cmd)
                .output();
        };
        // `postfix stop` SIGTERMs master (which takes its children down) and waits up to 5 s,
        // then kill -9's the whole process group itself. `abort` is the last resort.
        postfix("stop");
        let pgid = self.master_pid;
        if !wait_until(Duration::from_secs(10), || !group_alive(pgid)) {
            postfix("abort");
            if !wait_until(Duration::from_secs(5), || !group_alive(pgid)) {
                eprintln!("warning: processes of postfix instance (pgid {pgid}) still running");
            }
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "postfix test instance kept in {} (log: maillog)",
                self.dir.path().display()
            );
        }
    }
}

fn main_cf(d: &str) -> String {
    format!(
        r#"compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
myhostname = mx.example.test
mydomain = example.test
myorigin = example.test
# Listeners are explicit 127.0.0.1:port entries in master.cf; this also binds the SMTP client.
inet_interfaces = 127.0.0.1
# Must include IPv6 although we only listen on IPv4: otherwise a PROXY header with an IPv6
# client is refused ("haproxy read: Postfix IPv6 support is disabled").
inet_protocols = all
# Nothing is delivered locally; no aliases/local users (avoids lookups of missing tables).
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8 [::1]/128
# Any client may send to example.test: it is a virtual mailbox domain, so it passes
# reject_unauth_destination whatever client address the PROXY header claims.
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
# Every recipient @example.test goes to one Maildir: {d}/mail/Maildir/ (trailing / = Maildir).
virtual_mailbox_domains = example.test
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:{NOBODY}
virtual_gid_maps = static:{NOBODY}
# Never try to send anything off the box (e.g. bounces to external senders).
default_transport = error:outbound mail disabled in tests
relay_transport = error:outbound mail disabled in tests
# Log to a file via postlogd (needs the postlog service in master.cf). The file must lie under
# one of maillog_file_prefixes (default /var, /dev/stdout), hence the override.
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
# Log "Anonymous TLS connection established from ..." lines.
smtpd_tls_loglevel = 1
# No DNS: clients are logged as unknown[addr], no reverse lookups, no MX lookups.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
# Speed: no penalty sleeps after client errors, no inflow throttling, fast retries.
smtpd_error_sleep_time = 0
in_flow_delay = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
"#
    )
}

/// A private Cyrus sasldb with one user, its `smtpd.conf`, and the main.cf lines that use it.
/// `smtpd_tls_auth_only` stays at its default (no): behind the proxy every session looks
/// plaintext to Postfix, and the proxy itself refuses AUTH before TLS.
fn sasl_setup(d: &str, user: &str, password: &str) -> String {
    const SASLPASSWD2: &str = "/usr/sbin/saslpasswd2";
    assert!(
        Path::new(SASLPASSWD2).exists(),
        "{SASLPASSWD2} missing: apt-get install sasl2-bin libsasl2-modules"
    );
    // Debian's Postfix reads `$config_directory/sasl/smtpd.conf` (cyrus_sasl_config_path
    // is not consulted there, as strace shows).
    let sasl = format!("{d}/conf/sasl");
    fs::create_dir(&sasl).expect("mkdir sasl");
    let db = format!("{d}/sasldb2");
    let mut child = Command::new(SASLPASSWD2)
        .args(["-p", "-c", "-f", &db, "-u", "example.test", user])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run saslpasswd2");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("password to saslpasswd2");
    assert!(
        child.wait().expect("saslpasswd2").success(),
        "saslpasswd2 failed"
    );
    // smtpd runs as the postfix user and opens the db itself (no saslauthd).
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod sasldb");
    fs::write(
        format!("{sasl}/smtpd.conf"),
        format!("pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {db}\n"),
    )
    .expect("write smtpd.conf");
    "smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = cyrus\nsmtpd_sasl_path = smtpd\n\
     smtpd_sasl_local_domain = example.test\n"
        .to_owned()
}

/// Internal services (subset of Debian's master.cf) with chroot = n. virtual has unpriv = n: it
/// starts as root and switches to `virtual_uid_maps`. postlog is needed for `maillog_file`;
/// scache serves the sending instances of the interop set (`common::interop`).
pub const MASTER_INTERNAL: &str = "\
pickup    unix  n  -  n  60     1  pickup
cleanup   unix  n  -  n  -      0  cleanup
qmgr      unix  n  -  n  300    1  qmgr
tlsmgr    unix  -  -  n  1000?  1  tlsmgr
rewrite   unix  -  -  n  -      -  trivial-rewrite
bounce    unix  -  -  n  -      0  bounce
defer     unix  -  -  n  -      0  bounce
trace     unix  -  -  n  -      0  bounce
error     unix  -  -  n  -      -  error
retry     unix  -  -  n  -      -  error
virtual   unix  -  n  n  -      -  virtual
anvil     unix  -  -  n  -      1  anvil
scache    unix  -  -  n  -      1  scache
postlog   unix-dgram n - n - 1     postlogd
";

/// An smtpd line for master.cf with TLS (cert chain, key) files; paths must not contain whitespace
/// or commas (`-o name=value` syntax, comma-separated list). `smtpd_tls_chain_files` wants the key first.
fn tls_service(port: u16, opts: &str, (cert, key): &(PathBuf, PathBuf)) -> String {
    for p in [cert, key] {
        let s = p.to_str().expect("TLS path must be UTF-8");
        assert!(p.is_file(), "TLS file {s} does not exist");
        assert!(
            !s.contains(|c: char| c.is_whitespace() || c == ','),
            "bad TLS path {s:?}"
        );
    }
    let (cert, key) = (cert.display(), key.display());
    format!("127.0.0.1:{port} inet n - n - - smtpd {opts} -o smtpd_tls_chain_files={key},{cert}\n")
}

/// Writes a config file with an mtime one minute in the past. Postfix refuses to use a main.cf
/// modified within the current second or so and re-reads it every 300 ms until it is older,
/// which costs ~2 s per start with a freshly written file.
pub fn write_backdated(path: &str, contents: &str) {
    fs::write(path, contents).expect("write postfix config");
    let old = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
}

/// Is anything in LISTEN state (st 0A) on local TCP port `port`, per /proc/net/tcp?
pub fn is_listening(port: u16) -> bool {
    let tcp = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Is any non-zombie process in process group `pgid` alive? master calls setsid(), so all its
/// children share its pgid. Zombies count as dead: in containers PID 1 often does not reap the
/// re-parented (daemonized) master, and kill(pid, 0) would still succeed for a zombie.
pub fn group_alive(pgid: u32) -> bool {
    let Ok(rd) = fs::read_dir("/proc") else {
        return false;
    };
    rd.filter_map(|e| fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .any(|stat| {
            // "pid (comm) state ppid pgrp ..." - comm may contain spaces, so split after the last ')'.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.len() > 2 && f[0] != "Z" && f[0] != "X" && f[2].parse::<u32>().ok() == Some(pgid)
        })
}

pub use super::wait_until;

/// The proxy-facing smtpd parameters, from the file the deployment examples also use.
pub const PROXY_PORT_CF: &str = include_str!("../../../containers/postfix/proxy-port.cf");

/// `PROXY_PORT_CF` as master.cf `-o name=value` options.
pub fn proxy_port_options() -> String {
    PROXY_PORT_CF
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| format!("-o {l}"))
        .collect::<Vec<_>>()
        .join(" ")
}
