//! Admission: whether a connection may become a session, in two steps. At accept, the
//! process-wide and the listener's connection slots (`limits`), or the limit that refuses;
//! then, on the real client address (after an inbound PROXY header) and before any TLS
//! work, the listener's `allow`/`deny`, the polled deny file, `per_ip_rate` (`abuse`) and
//! the per-IP slot. One `Admission` per accept loop; it outlives reloads (the maxima are
//! read from the current snapshot at each step). What a session holds, its `Permits`,
//! travels in its facts and gives every slot back when dropped, however the session ends.

pub(crate) mod abuse;
pub mod limits;

use std::net::IpAddr;
use std::sync::Arc;

use abuse::{DenyReason, RateLimiter, SharedDenyList};
use limits::{Counter, IpSlot, PerIp, Slot};

use crate::config::ListenerConfig;

/// Which limit refused a session (the `reason` of `outcome=limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    /// The process-wide `max_connections`.
    MaxConnections,
    /// The listener's `limits.max_connections`.
    ListenerMaxConnections,
    /// `limits.per_ip`.
    PerIp,
    /// `limits.per_ip_rate`.
    PerIpRate,
}

impl LimitKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::ListenerMaxConnections => "listener_max_connections",
            Self::PerIp => "per_ip",
            Self::PerIpRate => "per_ip_rate",
        }
    }
}

/// Why the real client address was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Denied(DenyReason),
    Limit(LimitKind),
}

/// The admission state of one accept loop.
#[derive(Debug)]
pub(crate) struct Admission {
    global: Arc<Counter>,
    listener: Arc<Counter>,
    per_ip: Arc<PerIp>,
    rate: RateLimiter,
    deny_file: SharedDenyList,
}

impl Admission {
    /// `global` counts sessions across every listener; `deny_file` is the shared list.
    pub(crate) fn new(global: Arc<Counter>, deny_file: SharedDenyList) -> Arc<Self> {
        Arc::new(Self {
            global,
            listener: Arc::default(),
            per_ip: Arc::default(),
            rate: RateLimiter::default(),
            deny_file,
        })
    }

    /// At accept: a global slot (below `global_max`) and a listener slot (below
    /// `listener_max`), or the limit that refuses the connection.
    pub(crate) fn at_accept(
        self: &Arc<Self>,
        global_max: usize,
        listener_max: usize,
    ) -> Result<Permits, LimitKind> {
        let global = self
            .global
            .try_acquire(global_max)
            .ok_or(LimitKind::MaxConnections)?;
        let listener = self
            .listener
            .try_acquire(listener_max)
            .ok_or(LimitKind::ListenerMaxConnections)?;
        Ok(Permits {
            admission: self.clone(),
            _global: global,
            _listener: listener,
            ip: None,
        })
    }
}

/// What an admitted connection holds until its session ends.
#[derive(Debug)]
pub(crate) struct Permits {
    admission: Arc<Admission>,
    _global: Slot,
    _listener: Slot,
    ip: Option<IpSlot>,
}

impl Permits {
    /// On the real client address: the listener's `allow`/`deny`, the deny file,
    /// `per_ip_rate`, then a per-IP slot (kept in the permits), in that order.
    pub(crate) fn admit(&mut self, l: &ListenerConfig, ip: IpAddr) -> Result<(), Refusal> {
        let a = &self.admission;
        let denied = abuse::listener_verdict(l, ip).or_else(|| {
            a.deny_file
                .load()
                .contains(ip)
                .then_some(DenyReason::DenyFile)
        });
        if let Some(reason) = denied {
            return Err(Refusal::Denied(reason));
        }
        let rate_ok = l
            .limits
            .per_ip_rate
            .is_none_or(|r| a.rate.allow(ip, r, std::time::Instant::now()));
        if !rate_ok {
            return Err(Refusal::Limit(LimitKind::PerIpRate));
        }
        let slot = a
            .per_ip
            .try_acquire(ip, l.limits.per_ip)
            .ok_or(Refusal::Limit(LimitKind::PerIp))?;
        self.ip = Some(slot);
        Ok(())
    }
}
