//! The benchmark's client side and its SMTP sink. Every subcommand prints one JSON line;
//! `bench/bench.py` reads the candidates' CPU and memory from /proc around each run.
//!
//! - `sink`: the upstream every candidate relays to: accepts PROXY v1/v2 or none, greets,
//!   answers a minimal SMTP dialogue and discards message content (until CRLF.CRLF).
//! - `handshakes`: full TLS connections (no resumption): connect, handshake, first byte of
//!   the relayed greeting, close.
//! - `throughput`: one TLS session sending `--bytes` of message content through DATA.
//! - `idle`: opens `--n` TLS sessions (greeting received), says `ready`, holds them until
//!   stdin closes.
//! - `sessions`: complete STARTTLS SMTP sessions (greeting, EHLO, STARTTLS, handshake, EHLO,
//!   MAIL, RCPT, DATA `--size`, QUIT).
//! - `latency`: sequential connections, connect -> first greeting byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    Handshakes {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value_t = 2000)]
        n: usize,
        #[arg(long, default_value_t = 8)]
        conc: usize,
        /// Offer X25519MLKEM768 first (else X25519 only, the same group for every candidate).
        #[arg(long)]
        pq: bool,
    },
    Throughput {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Sessions in parallel, each sending `bytes / conns` (a relay carries many).
        #[arg(long, default_value_t = 4)]
        conns: u64,
    },
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 64)]
        conc: usize,
        /// STARTTLS sessions held after the EHLO that follows the handshake.
        #[arg(long)]
        starttls: bool,
    },
    Sessions {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, default_value_t = 8)]
        conc: usize,
        #[arg(long, default_value_t = 2048)]
        size: usize,
    },
    Latency {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value_t = 500)]
        n: usize,
        /// Plain TCP to the sink (the baseline the added latency is measured against).
        #[arg(long)]
        plain: bool,
    },
}

fn main() -> Res<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Sink { listen } => sink(listen).await,
            Cmd::Handshakes {
                addr,
                sni,
                n,
                conc,
                pq,
            } => handshakes(addr, sni, n, conc, pq).await,
            Cmd::Throughput {
                addr,
                sni,
                bytes,
                conns,
            } => throughput(addr, sni, bytes, conns).await,
            Cmd::Idle {
                addr,
                sni,
                n,
                conc,
                starttls,
            } => idle(addr, sni, n, conc, starttls).await,
            Cmd::Sessions {
                addr,
                sni,
                n,
                conc,
                size,
            } => sessions(addr, sni, n, conc, size).await,
            Cmd::Latency {
                addr,
                sni,
                n,
                plain,
            } => latency(addr, sni, n, plain).await,
        }
    })
}

// ------------------------------------------------------------------ sink

async fn sink(listen: SocketAddr) -> Res<()> {
    let l = TcpListener::bind(listen).await?;
    println!(
        "{}",
        serde_json::json!({ "listening": l.local_addr()?.to_string() })
    );
    loop {
        let (s, _) = l.accept().await?;
        tokio::spawn(async move {
            let _ = sink_conn(s).await;
        });
    }
}

async fn sink_conn(s: TcpStream) -> Res<()> {
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    // PROXY header, if any (v1 line or v2 binary).
    let head = r.fill_buf().await?;
    if head.starts_with(b"PROXY ") {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await?;
    } else if head.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
        let mut fixed = [0u8; 16];
        r.read_exact(&mut fixed).await?;
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
        r.read_exact(&mut rest).await?;
    }
    w.write_all(b"220 sink.bench ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(512);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match &verb[..] {
            b"EHLO" => b"250-sink.bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            b"HELO" => b"250 sink.bench\r\n",
            b"DATA" => {
                w.write_all(b"354 go ahead\r\n").await?;
                discard_data(&mut r).await?;
                b"250 2.0.0 discarded\r\n"
            }
            b"QUIT" => {
                w.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            b"STAR" => b"502 5.5.1 not here\r\n",
            _ => b"250 2.0.0 ok\r\n",
        };
        w.write_all(reply).await?;
    }
}

/// Consumes message content up to and including CRLF.CRLF, chunk by chunk.
async fn discard_data<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Res<()> {
    // The last 4 bytes seen, to find a terminator split across chunks.
    let mut tail: Vec<u8> = b"\r\n".to_vec();
    let mut seen = 0u64;
    loop {
        let mut stalls = 0;
        let buf = loop {
            match tokio::time::timeout(STALL, r.fill_buf()).await {
                Ok(buf) => break buf?,
                Err(_) => {
                    eprintln!(
                        "{}",
                        serde_json::json!({ "sink_stall": "DATA", "content_bytes": seen, "last_bytes": format!("{:?}", String::from_utf8_lossy(&tail)) })
                    );
                    stalls += 1;
                    if stalls == MAX_STALLS {
                        return Err("no content for MAX_STALLS x STALL".into());
                    }
                }
            }
        };
        if buf.is_empty() {
            return Err("eof in DATA".into());
        }
        let mut window = tail.clone();
        window.extend_from_slice(&buf[..buf.len().min(5)]);
        if let Some(p) = memchr::memmem::find(&window, b"\r\n.\r\n") {
            let consumed = p + 5 - tail.len();
            r.consume(consumed);
            return Ok(());
        }
        if let Some(p) = memchr::memmem::find(buf, b"\r\n.\r\n") {
            r.consume(p + 5);
            return Ok(());
        }
        let n = buf.len();
        // The last 4 bytes of everything seen, not of this chunk alone: a chunk shorter
        // than 4 bytes (a relay forwarding "." and "\r\n" apart) must not drop the
        // earlier bytes, or the terminator is never seen and the run hangs (it did, about
        // once per full bench run, for a different candidate each time).
        tail.extend_from_slice(&buf[n.saturating_sub(4)..]);
        let excess = tail.len().saturating_sub(4);
        tail.drain(..excess);
        seen += n as u64;
        r.consume(n);
    }
}

// ------------------------------------------------------------------ TLS client

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
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
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.3, no resumption; X25519 only unless `pq`. The client skips verification: its own
/// cost is not what is measured. Its suites are rustls' defaults (AES-256-GCM first, as the
/// OpenSSL clients of the peers' world offer), so each server's own preference decides,
/// unless `LOADGEN_TLS13=aes128` makes it offer TLS_AES_128_GCM_SHA256 alone (the
/// same-cipher mode: every candidate then runs the same suite). `LOADGEN_TLS12=aes128|aes256`
/// makes it a TLS 1.2 client offering only ECDHE-ECDSA with that AES-GCM suite (the
/// cipher-order measurement).
fn connector(pq: bool) -> TlsConnector {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !pq {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let tls12 = std::env::var("LOADGEN_TLS12").ok();
    let versions: &[&rustls::SupportedProtocolVersion] = match tls12.as_deref() {
        Some("aes128") => {
            provider.cipher_suites = vec![cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256];
            &[&rustls::version::TLS12]
        }
        Some("aes256") => {
            provider.cipher_suites = vec![cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384];
            &[&rustls::version::TLS12]
        }
        _ => {
            if std::env::var("LOADGEN_TLS13").as_deref() == Ok("aes128") {
                provider.cipher_suites = vec![cs::TLS13_AES_128_GCM_SHA256];
            }
            &[&rustls::version::TLS13]
        }
    };
    let provider = Arc::new(provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

async fn tls(
    c: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> Res<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(c.connect(ServerName::try_from(sni.to_owned())?, tcp)
        .await?)
}

/// A STARTTLS session up to the EHLO after the handshake: greeting, EHLO, STARTTLS, TLS,
/// EHLO.
async fn starttls_ehlo(
    c: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> Res<BufReader<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = BufReader::new(tcp);
    reply(&mut s).await?;
    cmd(&mut s, b"EHLO loadgen.bench\r\n", 250).await?;
    cmd(&mut s, b"STARTTLS\r\n", 220).await?;
    let tls = c
        .connect(ServerName::try_from(sni.to_owned())?, s.into_inner())
        .await?;
    let mut s = BufReader::new(tls);
    cmd(&mut s, b"EHLO loadgen.bench\r\n", 250).await?;
    Ok(s)
}

/// Reads one complete (multi-line) reply; returns its code.
async fn reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Res<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err("closed".into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or("bad reply")?);
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    line: &[u8],
    want: u16,
) -> Res<()> {
    s.get_mut().write_all(line).await?;
    // tokio-rustls keeps what the socket did not take inside rustls until a flush: without
    // it, a command written while the send buffer is full never leaves (the throughput
    // run's end-of-data hang, about once per full bench run, any candidate).
    s.get_mut().flush().await?;
    let code = reply(s).await?;
    if code != want {
        return Err(format!("{} -> {code}", String::from_utf8_lossy(line).trim_end()).into());
    }
    Ok(())
}

/// Runs `n` jobs with `conc` in flight; returns (ok, failed, wall seconds).
async fn run_jobs<F, Fut>(n: usize, conc: usize, job: F) -> (u64, u64, f64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..conc {
        let (job, next, ok, failed) = (job.clone(), next.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                match tokio::time::timeout(Duration::from_secs(30), job()).await {
                    Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
    )
}

fn report(kind: &str, ok: u64, failed: u64, wall: f64) {
    println!(
        "{}",
        serde_json::json!({ "kind": kind, "ok": ok, "failed": failed, "wall_s": wall })
    );
}

async fn handshakes(addr: SocketAddr, sni: String, n: usize, conc: usize, pq: bool) -> Res<()> {
    let c = connector(pq);
    let (ok, failed, wall) = run_jobs(n, conc, move || {
        let (c, sni) = (c.clone(), sni.clone());
        async move {
            let mut s = tls(&c, addr, &sni).await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            s.shutdown().await?;
            Ok(())
        }
    })
    .await;
    report("handshakes", ok, failed, wall);
    Ok(())
}

/// How long a throughput session or the sink may see no progress before it says so on
/// stderr (what it sent or saw last); after `MAX_STALLS` in a row it gives up.
const STALL: Duration = Duration::from_secs(20);
const MAX_STALLS: u32 = 6;

async fn throughput(addr: SocketAddr, sni: String, bytes: u64, conns: u64) -> Res<()> {
    let c = connector(false);
    let conns = conns.max(1);
    let start = Instant::now();
    let mut jobs = Vec::new();
    for i in 0..conns {
        let (c, sni) = (c.clone(), sni.clone());
        jobs.push(tokio::spawn(async move {
            throughput_one(&c, addr, &sni, bytes / conns, i).await
        }));
    }
    let mut sent = 0;
    let mut cipher = String::new();
    for j in jobs {
        let (n, suite) = j.await??;
        sent += n;
        cipher = suite;
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "kind": "throughput", "bytes": sent, "wall_s": wall, "cipher": cipher, "conns": conns })
    );
    Ok(())
}

async fn throughput_one(
    c: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
    bytes: u64,
    id: u64,
) -> Res<(u64, String)> {
    let s = tls(c, addr, sni).await?;
    let mut s = BufReader::new(s);
    reply(&mut s).await?;
    cmd(&mut s, b"EHLO loadgen.bench\r\n", 250).await?;
    cmd(&mut s, b"MAIL FROM:<a@loadgen.bench>\r\n", 250).await?;
    cmd(&mut s, b"RCPT TO:<b@sink.bench>\r\n", 250).await?;
    cmd(&mut s, b"DATA\r\n", 354).await?;
    // What mail looks like: 78 characters + CRLF per line (RFC 5322's recommended length),
    // in writes of 819 lines (64 KiB less 16 bytes).
    let mut line = vec![b'x'; 78];
    line.extend_from_slice(b"\r\n");
    let chunk: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 819)
        .collect();
    let cipher = s
        .get_ref()
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let mut sent = 0u64;
    while sent < bytes {
        let mut write = std::pin::pin!(s.get_mut().write_all(&chunk));
        let mut stalls = 0;
        loop {
            match tokio::time::timeout(STALL, &mut write).await {
                Ok(r) => break r?,
                Err(_) => {
                    eprintln!(
                        "{}",
                        serde_json::json!({ "client_stall": id, "sent": sent, "phase": "content" })
                    );
                    stalls += 1;
                    if stalls == MAX_STALLS {
                        return Err("content not taken for MAX_STALLS x STALL".into());
                    }
                }
            }
        }
        sent += chunk.len() as u64;
    }
    s.get_mut().write_all(b".\r\n").await?;
    s.get_mut().flush().await?;
    // read_until, not read_line: it keeps what a timed-out attempt read.
    let mut last = Vec::new();
    let mut stalls = 0;
    loop {
        match tokio::time::timeout(STALL, s.read_until(b'\n', &mut last)).await {
            Ok(r) => {
                if r? == 0 {
                    return Err("closed before the end-of-data reply".into());
                }
                break;
            }
            Err(_) => {
                eprintln!(
                    "{}",
                    serde_json::json!({ "client_stall": id, "sent": sent, "phase": "end-of-data reply", "read": String::from_utf8_lossy(&last) })
                );
                stalls += 1;
                if stalls == MAX_STALLS {
                    return Err("no end-of-data reply for MAX_STALLS x STALL".into());
                }
            }
        }
    }
    if !last.starts_with(b"250") {
        return Err(format!(
            "end of data -> {}",
            String::from_utf8_lossy(&last).trim_end()
        )
        .into());
    }
    let _ = cmd(&mut s, b"QUIT\r\n", 221).await;
    Ok((sent, cipher))
}

async fn idle(addr: SocketAddr, sni: String, n: usize, conc: usize, starttls: bool) -> Res<()> {
    let c = connector(false);
    let held = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
    let keep = held.clone();
    let (ok, failed, wall) = run_jobs(n, conc, move || {
        let (c, sni, keep) = (c.clone(), sni.clone(), keep.clone());
        async move {
            let s = if starttls {
                starttls_ehlo(&c, addr, &sni).await?.into_inner()
            } else {
                let mut s = tls(&c, addr, &sni).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                s
            };
            keep.lock().await.push(s);
            Ok(())
        }
    })
    .await;
    println!(
        "{}",
        serde_json::json!({ "kind": "idle", "ok": ok, "failed": failed, "wall_s": wall, "ready": true })
    );
    // Hold until the driver closes stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(held);
    Ok(())
}

async fn sessions(addr: SocketAddr, sni: String, n: usize, conc: usize, size: usize) -> Res<()> {
    let c = connector(false);
    let mut body = Vec::with_capacity(size + 8);
    while body.len() < size {
        body.extend_from_slice(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n",
        );
    }
    body.truncate(size);
    body.extend_from_slice(b"\r\n.\r\n");
    let body = Arc::new(body);
    let (ok, failed, wall) = run_jobs(n, conc, move || {
        let (c, sni, body) = (c.clone(), sni.clone(), body.clone());
        async move {
            let mut s = starttls_ehlo(&c, addr, &sni).await?;
            cmd(&mut s, b"MAIL FROM:<a@loadgen.bench>\r\n", 250).await?;
            cmd(&mut s, b"RCPT TO:<b@sink.bench>\r\n", 250).await?;
            cmd(&mut s, b"DATA\r\n", 354).await?;
            s.get_mut().write_all(&body).await?;
            s.get_mut().flush().await?;
            let code = reply(&mut s).await?;
            if code != 250 {
                return Err(format!("end of data -> {code}").into());
            }
            cmd(&mut s, b"QUIT\r\n", 221).await?;
            Ok(())
        }
    })
    .await;
    report("sessions", ok, failed, wall);
    Ok(())
}

async fn latency(addr: SocketAddr, sni: String, n: usize, plain: bool) -> Res<()> {
    let c = connector(false);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut b = [0u8; 1];
        if plain {
            // The sink waits for a PROXY header (or the first command) before greeting,
            // as the candidates always send one: the baseline sends the shortest.
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"PROXY UNKNOWN\r\n").await?;
            s.read_exact(&mut b).await?;
            samples.push(start.elapsed());
        } else {
            let mut s = tls(&c, addr, &sni).await?;
            s.read_exact(&mut b).await?;
            samples.push(start.elapsed());
            let _ = s.shutdown().await;
        }
    }
    samples.sort();
    let us = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_micros() as u64;
    println!(
        "{}",
        serde_json::json!({ "kind": "latency", "n": n, "median_us": us(0.5), "p99_us": us(0.99) })
    );
    Ok(())
}
