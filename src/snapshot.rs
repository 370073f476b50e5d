//! `Snapshot`: a validated `Config` plus everything built from it (certificate store,
//! per-listener TLS configs, upstream connectors). It is the unit of reload: each
//! connection holds its listener's `Arc<ListenerRuntime>` (its config, TLS configs with the
//! certificate store, and upstream) for its whole life, so a reload never changes a session
//! in flight.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, StoresServerSessions};

use crate::acme::AcmeManager;
use crate::config::{
    ClientCertMode, Config, ConfigError, ListenerConfig, Mode, UnknownSni, UpstreamConfig,
};
use crate::tls::client_auth::{self, RequestAnyCert};
use crate::tls::resolve::ListenerResolver;
use crate::tls::upstream::UpstreamTlsClient;
use crate::tls::{CertStore, ListenerTls};
use crate::watch::{self, FileStamps};

/// Config + built runtime objects.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    /// The global `max_connections`: the config's, else derived from the open-file limit.
    pub max_connections: usize,
    pub store: Arc<CertStore>,
    pub upstreams: BTreeMap<String, Arc<UpstreamRuntime>>,
    pub listeners: BTreeMap<String, Arc<ListenerRuntime>>,
    /// The MTA-STS policies built from `config.mta_sts` (what `check` prints, what
    /// `https` listeners serve).
    pub(crate) mta_sts: Arc<crate::mta_sts::Policies>,
    /// The files this snapshot was built from, as they were just before they were read: a
    /// file-change reload that finds them all the same is skipped.
    pub files: FileStamps,
}

/// One listener as sessions use it.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    pub tls: ListenerTls,
    pub upstream: Arc<UpstreamRuntime>,
    /// The MTA-STS policies (served by `https` listeners; the same for every listener).
    pub(crate) mta_sts: Arc<crate::mta_sts::Policies>,
    /// This listener's metric handles.
    pub(crate) counters: crate::metrics::ListenerCounters,
    /// What TLS resumption depends on; the session cache is kept across reloads while it
    /// stays the same.
    resumption: Resumption,
}

/// The settings a resumed TLS session skips checking: a session made under other ones must
/// not resume (e.g. one made without a client certificate on a listener that now requires
/// one). Certificates are not among them: a renewal keeps the cache, as a client that
/// resumes has already authenticated the server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResumptionKey {
    mode: Mode,
    client_cert: ClientCertMode,
    /// The trust anchors loaded from `client_ca` (subject + key), not its path: derived
    /// from what the verifier uses, so the file is read once.
    client_ca: Option<Vec<Vec<u8>>>,
    session_tickets: bool,
    unknown_sni: UnknownSni,
}

#[derive(Clone)]
struct Resumption {
    key: ResumptionKey,
    /// TLS 1.2 session ids and TLS 1.3 (stateful) tickets both live here.
    cache: Arc<dyn StoresServerSessions>,
}

impl std::fmt::Debug for Resumption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumption")
            .field("key", &self.key)
            .finish()
    }
}

/// TLS sessions each listener remembers for resumption (rustls' default size).
const SESSION_CACHE: usize = 256;

/// One upstream as sessions use it.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub config: Arc<UpstreamConfig>,
    pub tls: Option<UpstreamTlsClient>,
    /// The upstream's own EHLO keywords that a plaintext hand-off can carry, learnt by the
    /// health probe and replaced whole at each success; `None` until a probe succeeded.
    pub capabilities: arc_swap::ArcSwapOption<Vec<String>>,
}

/// Reads the config file, stamping it and then every file it names just before anything
/// reads them (the stamps go to [`build`]).
pub fn read_config(path: &std::path::Path) -> Result<(Config, FileStamps), ConfigError> {
    let config_file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut files = FileStamps::read([config_file]);
    let config = crate::config::load(path)?;
    files.extend(FileStamps::read(watch::files_of(&config)));
    Ok((config, files))
}

/// Loads certificates and CA files and builds every TLS config. Errors carry key paths.
/// `previous` is the snapshot being replaced: its listeners' session caches carry over.
pub fn build(
    (config, files): (Config, FileStamps),
    acme: &AcmeManager,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ConfigError> {
    let provider = crate::tls::provider();
    let path = config.path.clone();
    let err = |key: String, reason: String| ConfigError::new(&path, key, reason);
    let store = Arc::new(CertStore::load(
        &path,
        &config.certificates,
        &provider,
        acme,
    )?);

    let mut upstreams = BTreeMap::new();
    for (name, up) in &config.upstreams {
        let tls = match &up.tls {
            Some(t) => Some(
                crate::tls::upstream::build(t, &provider)
                    .map_err(|(k, r)| err(format!("upstreams.{name}.{k}"), r))?,
            ),
            None => None,
        };
        // The same MTA keeps what its probe learnt, so the pre-TLS EHLO does not fall back
        // to the conservative set for the moment a reload takes.
        let learnt = previous
            .and_then(|p| p.upstreams.get(name))
            .filter(|p| p.config.address == up.address)
            .and_then(|p| p.capabilities.load_full());
        crate::metrics::metrics().upstream_series(name);
        upstreams.insert(
            name.clone(),
            Arc::new(UpstreamRuntime {
                config: up.clone(),
                tls,
                capabilities: arc_swap::ArcSwapOption::new(learnt),
            }),
        );
    }

    let mta_sts = Arc::new(crate::mta_sts::Policies::from_config(
        config.mta_sts.as_ref(),
    ));
    for policy in mta_sts.iter() {
        let host = format!("mta-sts.{}", policy.domain);
        if store.candidates(&host).is_none() {
            return Err(err(
                format!("mta_sts.domains.{}", policy.domain),
                format!(
                    "no certificate serves {host}: add it to a certificate file or a \
                     self_signed list, or order a name of {} with acme (then it is added)",
                    policy.domain
                ),
            ));
        }
        crate::metrics::metrics().mta_sts_series(&policy.domain);
    }

    let mut listeners = BTreeMap::new();
    for (name, l) in &config.listeners {
        let kept = previous
            .and_then(|p| p.listeners.get(name))
            .map(|l| &l.resumption);
        let (tls, resumption) = listener_tls(l, &store, &provider, kept)
            .map_err(|(k, r)| err(format!("listeners.{name}.{k}"), r))?;
        let upstream = if l.mode == Mode::Https {
            // Never connected: an https listener relays no mail.
            Arc::new(UpstreamRuntime {
                config: l.upstream.clone(),
                tls: None,
                capabilities: arc_swap::ArcSwapOption::empty(),
            })
        } else {
            upstreams.get(&l.upstream.name).cloned().ok_or_else(|| {
                err(
                    format!("listeners.{name}.upstream"),
                    "unknown upstream".into(),
                )
            })?
        };
        listeners.insert(
            name.clone(),
            Arc::new(ListenerRuntime {
                config: l.clone(),
                tls,
                upstream,
                mta_sts: mta_sts.clone(),
                counters: crate::metrics::metrics().listener_counters(
                    name,
                    (l.client_cert != ClientCertMode::None).then(|| l.client_cert.as_str()),
                    l.smuggling_guard != crate::config::SmugglingGuard::Off,
                ),
                resumption,
            }),
        );
    }
    Ok(Snapshot {
        max_connections: config
            .max_connections
            .unwrap_or_else(crate::admission::limits::default_max_connections),
        config,
        store,
        upstreams,
        listeners,
        mta_sts,
        files,
    })
}

fn listener_tls(
    l: &ListenerConfig,
    store: &Arc<CertStore>,
    provider: &Arc<CryptoProvider>,
    kept: Option<&Resumption>,
) -> Result<(ListenerTls, Resumption), (String, String)> {
    if store.candidates(&l.hostname).is_none() {
        return Err((
            "hostname".to_owned(),
            format!(
                "no certificate serves {:?} (the listener's default certificate)",
                l.hostname
            ),
        ));
    }
    let resolver = Arc::new(ListenerResolver {
        store: store.clone(),
        default_name: l.hostname.clone(),
        policy: l.unknown_sni,
    });
    let roots = match &l.client_ca {
        Some(p) => Some(client_auth::load_roots(p).map_err(|r| ("client_ca".to_owned(), r))?),
        None => None,
    };
    let key = ResumptionKey {
        mode: l.mode,
        client_cert: l.client_cert,
        client_ca: roots.as_ref().map(|r| {
            r.roots
                .iter()
                .map(|t| [t.subject.as_ref(), t.subject_public_key_info.as_ref()].concat())
                .collect()
        }),
        session_tickets: l.session_tickets,
        unknown_sni: l.unknown_sni,
    };
    let resumption = match kept {
        Some(k) if k.key == key => k.clone(),
        _ => Resumption {
            key,
            cache: if l.session_tickets {
                ServerSessionMemoryCache::new(SESSION_CACHE)
            } else {
                Arc::new(NoServerSessionStorage {})
            },
        },
    };
    let judge: Option<Arc<dyn ClientCertVerifier>> = match &roots {
        Some(r) => Some(
            client_auth::chain_verifier(r.clone(), provider)
                .map_err(|r| ("client_ca".to_owned(), r))?,
        ),
        None => None,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("mode".to_owned(), e.to_string()))?;
    let builder = match l.client_cert {
        // No CertificateRequest at all: the Gmail "Send mail as" fix.
        ClientCertMode::None => builder.with_no_client_auth(),
        ClientCertMode::Request => builder
            .with_client_cert_verifier(Arc::new(RequestAnyCert::new(roots.as_ref(), provider))),
        ClientCertMode::Require => {
            builder.with_client_cert_verifier(judge.clone().ok_or_else(|| {
                (
                    "client_ca".to_owned(),
                    "required for client_cert: require".to_owned(),
                )
            })?)
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    // ALPACA mitigation (catalogue TL-6, RFC 7301 3.2): a client that offers ALPN without
    // "smtp" (e.g. http/1.1 or h2 redirected to a mail port) gets no_application_protocol;
    // no ALPN proceeds as usual. ACME's acme-tls/1 is answered before this config applies.
    config.alpn_protocols = if l.mode == Mode::Https {
        // The MTA-STS policy host speaks HTTP/1.1 only (`mta_sts`).
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"smtp".to_vec()]
    };
    // The provider's suite order (AES-128-GCM first, see `tls::provider`) decides.
    config.ignore_client_order = true;
    if !l.session_tickets {
        // outlook.com's senders abort STARTTLS after a TLS 1.3 ticket (catalogue G).
        config.send_tls13_tickets = 0;
    }
    config.session_storage = resumption.cache.clone();
    // TLS 1.3 sessions leave rustls after the handshake for our record layer (`record`).
    config.enable_secret_extraction = true;
    Ok((
        ListenerTls {
            config: Arc::new(config),
            resolver,
            judge,
        },
        resumption,
    ))
}
