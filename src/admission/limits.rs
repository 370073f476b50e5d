//! Connection limits as RAII slots: a slot is taken before a session may proceed and is
//! given back when the slot is dropped, however the session ends (normal end, error,
//! abort, panic unwinding). Counters outlive reloads; the maxima are read from the
//! snapshot at each accept, so a reload that changes a limit applies to new connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A count of live sessions with an atomic "take a slot if below max".
#[derive(Debug, Default)]
pub struct Counter(AtomicUsize);

impl Counter {
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn current(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One taken slot of a `Counter`.
#[derive(Debug)]
pub struct Slot(Arc<Counter>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Concurrent sessions per client address (the real one, after inbound PROXY; IPv4-mapped
/// IPv6 folded to IPv4). Entries disappear when their count reaches zero, so the map holds
/// only addresses with live sessions.
#[derive(Debug, Default)]
pub struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.clone(),
            ip,
        })
    }

    pub fn current(&self, ip: IpAddr) -> usize {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

#[derive(Debug)]
pub struct IpSlot {
    map: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Open descriptors a session needs at most: client and upstream sockets.
const FDS_PER_SESSION: u64 = 2;
/// Descriptors kept for listeners, the watcher, the metrics server, log files.
const FDS_RESERVED: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the default global
/// `max_connections`: as many sessions as the descriptors allow, so that a flood meets a
/// prompt refusal rather than EMFILE.
/// The result is also what [`default_max_connections`] returns from then on.
pub fn raise_nofile() -> (u64, usize) {
    let nofile = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024);
    let sessions = usize::try_from((nofile.saturating_sub(FDS_RESERVED) / FDS_PER_SESSION).max(1))
        .unwrap_or(usize::MAX);
    let _ = DEFAULT_MAX_CONNECTIONS.set(sessions);
    (nofile, sessions)
}

static DEFAULT_MAX_CONNECTIONS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// The global `max_connections` when the config sets none: derived from RLIMIT_NOFILE by
/// [`raise_nofile`] at start (a conservative 1,000 before it ran, e.g. for `check`).
pub fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS.get().copied().unwrap_or(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_refuses_over_max_and_frees_on_drop() {
        let c = Arc::new(Counter::default());
        let a = c.try_acquire(2).unwrap();
        let _b = c.try_acquire(2).unwrap();
        assert!(c.try_acquire(2).is_none());
        drop(a);
        assert_eq!(c.current(), 1);
        assert!(c.try_acquire(2).is_some());
    }

    #[test]
    fn per_ip_folds_mapped_addresses_and_forgets_idle_ones() {
        let m = Arc::new(PerIp::default());
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let a = m.try_acquire(v4, 2).unwrap();
        let b = m.try_acquire(mapped, 2).unwrap();
        assert!(m.try_acquire(v4, 2).is_none());
        assert!(m.try_acquire("192.0.2.2".parse().unwrap(), 2).is_some());
        drop((a, b));
        assert_eq!(m.current(v4), 0);
        assert!(m.0.lock().unwrap().is_empty());
    }
}
