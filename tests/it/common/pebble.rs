//! A private Pebble ACME server (Debian's `pebble` package) with `pebble-challtestsrv` as
//! its DNS (every name -> 127.0.0.1), on free loopback ports. Its validator connects to
//! `tls_port` for tls-alpn-01, i.e. to the proxy's implicit listener under test. Both
//! processes are killed by PID on drop; readiness is read from their logs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PEBBLE: &str = "/usr/bin/pebble";
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

pub struct Pebble {
    pub dir: tempfile::TempDir,
    pub api: SocketAddr,
    pub management: SocketAddr,
    /// The CA of Pebble's own HTTPS certificate (what `directory_ca` must name).
    pub api_ca: PathBuf,
    api_ca_der: CertificateDer<'static>,
    children: Vec<Child>,
    logs: Arc<Mutex<String>>,
}

/// pebble-challtestsrv as a DNS server only (on `dns`), answering every name with 127.0.0.1,
/// managed over HTTP on `management`.
pub fn challtestsrv_args(dns: &str, management: &str) -> Vec<String> {
    [
        "-dns01",
        dns,
        "-defaultIPv4",
        "127.0.0.1",
        "-defaultIPv6",
        "",
        "-http01",
        "",
        "-https01",
        "",
        "-tlsalpn01",
        "",
        "-management",
        management,
    ]
    .map(str::to_owned)
    .to_vec()
}

impl Pebble {
    /// Starts challtestsrv and Pebble; returns once Pebble serves its directory.
    pub fn start(tls_port: u16) -> Self {
        Self::start_with_validity(tls_port, None)
    }

    /// As `start`, with certificates valid for `validity_s` seconds (Pebble's
    /// `certificateValidityPeriod`; default five years): short lifetimes make the proxy
    /// renew while the test watches, through its real schedule (two thirds of the lifetime).
    pub fn start_with_validity(tls_port: u16, validity_s: Option<u64>) -> Self {
        Self::start_with(tls_port, validity_s, false)
    }

    /// As `start`, with Pebble's validation sleep left on (0-15 s before each validation,
    /// as a real CA takes its time): an order stays in flight long enough to interrupt.
    pub fn start_with_va_sleep(tls_port: u16) -> Self {
        Self::start_with(tls_port, None, true)
    }

    fn start_with(tls_port: u16, validity_s: Option<u64>, va_sleep: bool) -> Self {
        assert!(
            Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists(),
            "apt-get install pebble"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // Pebble's API certificate: a small CA and a CA:FALSE leaf for 127.0.0.1.
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pebble API test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
        std::fs::write(d.join("api-ca.pem"), ca.pem()).unwrap();
        std::fs::write(d.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(d.join("key.pem"), leaf_key.serialize_pem()).unwrap();

        let [api, management, dns, dns_management, http] = super::free_ports(5)[..] else {
            unreachable!("five ports")
        };
        std::fs::write(
            d.join("pebble-config.json"),
            format!(
                r#"{{ "pebble": {{
  "listenAddress": "127.0.0.1:{api}", "managementListenAddress": "127.0.0.1:{management}",
  "certificate": "cert.pem", "privateKey": "key.pem",
  "httpPort": {http}, "tlsPort": {tls_port},
  "ocspResponderURL": "", "externalAccountBindingRequired": false{validity} }} }}"#,
                validity = validity_s
                    .map(|v| format!(", \"certificateValidityPeriod\": {v}"))
                    .unwrap_or_default()
            ),
        )
        .unwrap();

        let logs: Arc<Mutex<String>> = Arc::default();
        let mut pebble = Self {
            api: SocketAddr::from(([127, 0, 0, 1], api)),
            management: SocketAddr::from(([127, 0, 0, 1], management)),
            api_ca: d.join("api-ca.pem"),
            api_ca_der: ca.der().clone(),
            children: Vec::new(),
            logs,
            dir,
        };
        let mut cts = Command::new(CHALLTESTSRV);
        cts.args(challtestsrv_args(
            &format!("127.0.0.1:{dns}"),
            &format!("127.0.0.1:{dns_management}"),
        ));
        pebble.spawn(cts, "Starting management server on");
        let mut pb = Command::new(PEBBLE);
        pb.current_dir(pebble.dir.path())
            .args([
                "-config",
                "pebble-config.json",
                "-dnsserver",
                &format!("127.0.0.1:{dns}"),
                "-strict=false",
            ])
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        if !va_sleep {
            pb.env("PEBBLE_VA_NOSLEEP", "1");
        }
        pebble.spawn(pb, "ACME directory available at");
        pebble
    }

    /// Starts `cmd` with its output collected; waits (bounded) for `ready` in it.
    fn spawn(&mut self, mut cmd: Command, ready: &str) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = self.logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        self.children.push(child);
        super::eventually_blocking(
            Duration::from_secs(20),
            &format!("{ready:?} logged"),
            || {
                self.log()
                    .contains(ready)
                    .then_some(())
                    .ok_or_else(|| self.log())
            },
        );
    }

    pub fn log(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.api)
    }

    /// Waits for `proxy`'s first ACME certificate, checks that Pebble's validation was
    /// answered on `listener`, and returns the root that certificate chains to.
    pub async fn first_issuance(
        &self,
        proxy: &super::RunningProxy,
        listener: &str,
    ) -> CertificateDer<'static> {
        proxy
            .wait_for_nth_log(1, Duration::from_secs(60), |v| {
                v["message"] == "acme certificate deployed"
            })
            .await;
        let challenge = proxy
            .find_log(|v| v["message"] == "session" && v["outcome"] == "acme_challenge")
            .unwrap_or_else(|| panic!("Pebble validated through the {listener} listener"));
        assert_eq!(challenge["listener"], listener);
        self.issuance_root().await
    }

    /// Pebble's issuance root (new at every start), from its management API.
    pub async fn issuance_root(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.api_ca_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.management)
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"GET /roots/0 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8(raw).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(body.as_bytes()).unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- pebble log ---\n{}", self.log());
        }
    }
}
