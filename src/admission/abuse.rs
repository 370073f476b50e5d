//! Abuse controls at the edge (SPEC "Abuse controls at the edge"): who may connect, decided
//! on the real client address (after an inbound PROXY header) before any TLS work or
//! upstream contact — per-listener `allow`/`deny`, the process-wide `deny_file`, and
//! `limits.per_ip_rate`.
//!
//! Hand-written, on purpose: the deny list is `ipnet` networks (already a dependency) turned
//! into merged, sorted address ranges with a binary search — 16 bytes per bound, O(log n)
//! per lookup (about 17 comparisons for 100,000 entries), a few dozen lines, where a prefix
//! trie crate would add a dependency for the same answer. The rate limiter is a token bucket
//! per address in one bounded map; `governor` does this too, but with a concurrent map and
//! clock machinery this one check does not need.
//!
//! The deny file is polled (one `stat` a second, re-read when inode, size, mtime or ctime
//! change): fail2ban and CrowdSec rewrite or replace it, and a poll sees both without the
//! reload machinery; a change applies to new connections within about a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::config::{ListenerConfig, Rate};

/// An address in one number space: IPv4 as IPv4-mapped IPv6.
fn key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn range(net: &IpNet) -> (u128, u128) {
    let (lo, hi) = (net.network(), net.broadcast());
    (key(lo), key(hi))
}

/// Networks as merged, sorted, disjoint ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct DenyList(Vec<(u128, u128)>);

impl DenyList {
    pub(crate) fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut ranges: Vec<(u128, u128)> = nets.into_iter().map(|n| range(&n)).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self(merged)
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let k = key(ip);
        let i = self.0.partition_point(|(lo, _)| *lo <= k);
        i > 0 && self.0[i - 1].1 >= k
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Parses a deny file: one IP or CIDR a line, `#` starts a comment. Bad lines are returned
/// with their number (1-based) and skipped, never fatal.
pub(crate) fn parse_deny_file(text: &str) -> (DenyList, Vec<(usize, String)>) {
    let mut nets = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        match entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        {
            Ok(net) => nets.push(net),
            Err(_) => bad.push((i + 1, entry.chars().take(80).collect())),
        }
    }
    (DenyList::new(nets), bad)
}

/// Why a client was refused before its session began (the `reason` of `outcome=denied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenyReason {
    /// Not in the listener's `allow` list.
    NotAllowed,
    /// In the listener's `deny` list.
    ListenerDeny,
    /// In the `deny_file`.
    DenyFile,
}

impl DenyReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::ListenerDeny => "listener_deny",
            Self::DenyFile => "deny_file",
        }
    }
}

/// The listener's own lists, decided first.
pub(crate) fn listener_verdict(l: &ListenerConfig, ip: IpAddr) -> Option<DenyReason> {
    let ip = ip.to_canonical();
    if !l.allow.is_empty() && !l.allow.iter().any(|n| n.contains(&ip)) {
        return Some(DenyReason::NotAllowed);
    }
    if l.deny.iter().any(|n| n.contains(&ip)) {
        return Some(DenyReason::ListenerDeny);
    }
    None
}

/// The current deny file's list, swapped in by [`watch_deny_file`].
pub(crate) type SharedDenyList = Arc<ArcSwap<DenyList>>;

/// Polls `path()` every second; a changed file is parsed and swapped in. Runs until the
/// task is dropped. `path()` is read each time, so a reload that changes `deny_file` is
/// followed (and `None` clears the list).
pub(crate) async fn watch_deny_file(
    list: SharedDenyList,
    path: impl Fn() -> Option<std::path::PathBuf>,
) {
    // The file last loaded and how it looked just before: a new path or a new stamp reloads.
    let mut seen: Option<(std::path::PathBuf, crate::watch::FileStamps)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(p) = path() else {
            if seen.take().is_some() {
                list.store(Arc::default());
            }
            continue;
        };
        let stamp = crate::watch::FileStamps::read([p.clone()]);
        if seen
            .as_ref()
            .is_some_and(|(sp, ss)| *sp == p && *ss == stamp)
        {
            continue;
        }
        seen = Some((p.clone(), stamp));
        load_deny_file(&list, &p);
    }
}

fn load_deny_file(list: &SharedDenyList, path: &Path) {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let (parsed, bad) = parse_deny_file(&text);
            for (line, entry) in &bad {
                tracing::warn!(file = %path.display(), line, entry = %entry, "deny file: not an IP address or CIDR; line skipped");
            }
            tracing::info!(file = %path.display(), ranges = parsed.len(), skipped = bad.len(), "deny file loaded");
            list.store(Arc::new(parsed));
        }
        Err(e) => {
            // A missing file denies nobody (fail2ban creates it on its first ban).
            tracing::warn!(file = %path.display(), error = %e, "deny file unreadable; denying no one by it");
            list.store(Arc::default());
        }
    }
}

/// Buckets kept before full ones are forgotten (a full bucket is the same as none); the
/// scan that forgets them then runs at most once per RATE_ENTRIES / 10 new addresses.
const RATE_ENTRIES: usize = 100_000;

/// `limits.per_ip_rate` for one listener: a token bucket per client address.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter(Mutex<HashMap<IpAddr, (f64, Instant)>>);

impl RateLimiter {
    /// Takes one token for `ip`; false when its bucket is empty.
    pub(crate) fn allow(&self, ip: IpAddr, rate: Rate, now: Instant) -> bool {
        let capacity = f64::from(rate.count);
        let per_second = capacity / rate.per.as_secs_f64();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= RATE_ENTRIES && !map.contains_key(&ip) {
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_second < capacity
            });
            // Still nearly full: more than RATE_ENTRIES addresses are connecting at once.
            // Forget them all rather than scan the map again at every new address (a
            // per-address limit cannot stop a distributed flood; max_connections bounds it).
            if map.len() >= RATE_ENTRIES * 9 / 10 {
                map.clear();
            }
        }
        let (tokens, at) = map.entry(ip.to_canonical()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_lookups_find_exactly_the_members() {
        let (list, bad) = parse_deny_file(
            "# fail2ban\n192.0.2.7\n198.51.100.0/24 # a whole net\n198.51.101.0/24\nnot-an-ip\n2001:db8::/32\n\n",
        );
        assert_eq!(bad, vec![(5, "not-an-ip".to_owned())]);
        assert_eq!(list.len(), 3, "the two /24s are adjacent: one range");
        for yes in [
            "192.0.2.7",
            "198.51.100.0",
            "198.51.101.255",
            "2001:db8::1",
            "::ffff:192.0.2.7",
        ] {
            assert!(list.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "192.0.2.6",
            "192.0.2.8",
            "198.51.102.0",
            "2001:db9::1",
            "10.0.0.1",
        ] {
            assert!(!list.contains(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn the_bucket_allows_n_per_duration_then_refills() {
        let limiter = RateLimiter::default();
        let rate = Rate {
            count: 3,
            per: Duration::from_secs(60),
        };
        let (ip, t0) = ("192.0.2.1".parse().unwrap(), Instant::now());
        assert!((0..3).all(|_| limiter.allow(ip, rate, t0)));
        assert!(!limiter.allow(ip, rate, t0));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limiter.allow(other, rate, t0), "buckets are per address");
        assert!(
            limiter.allow(ip, rate, t0 + Duration::from_secs(20)),
            "one token per 20 s"
        );
        assert!(!limiter.allow(ip, rate, t0 + Duration::from_secs(21)));
    }
}
