//! Per-client quotas: who a client is, and what it may still do.
//!
//! A client is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64).
//! `X-Forwarded-For` is believed only when the TCP peer is a configured trusted proxy, and then the
//! client is the right-most address that is not itself a trusted proxy.
//!
//! Three quotas, all sliding windows: CPU seconds used by finished jobs per minute, jobs queued or
//! running at once, and submissions per hour. A refusal says which quota and when to retry.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::config::ClientLimits;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
/// Retry hint when the client is at its concurrency limit (we cannot know when a job ends).
const CONCURRENCY_RETRY: Duration = Duration::from_secs(5);

/// A client identity for quotas and fairness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix([u8; 8]),
}

impl ClientKey {
    pub fn from_ip(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ClientKey::V6Prefix(prefix)
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::V4(o) => write!(f, "{}.{}.{}.{}", o[0], o[1], o[2], o[3]),
            ClientKey::V6Prefix(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                write!(f, "{}/64", Ipv6Addr::from(full))
            }
        }
    }
}

/// Identifies the client of a request from its TCP peer and, when the peer is a trusted proxy,
/// its `X-Forwarded-For` header.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted_proxy(*ip, trusted);
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut hops = header.split(',').rev().map(|h| h.trim().parse::<IpAddr>());
    loop {
        match hops.next() {
            Some(Ok(ip)) if is_trusted(&ip) => continue,
            Some(Ok(ip)) => return ip,
            // A malformed hop: trust nothing before it.
            Some(Err(_)) | None => return peer,
        }
    }
}

/// Whether `ip` is one of the `trusted` proxies; an IPv4-mapped IPv6 address (a peer of a
/// dual-stack listener) is its IPv4 address.
pub fn is_trusted_proxy(ip: IpAddr, trusted: &[IpAddr]) -> bool {
    trusted.iter().any(|t| canonical(*t) == canonical(ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Which quota refused a request; also the `cause` label of the rejection metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaKind {
    Concurrency,
    JobsPerHour,
    CpuPerMinute,
}

impl QuotaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Concurrency => "concurrent_jobs",
            QuotaKind::JobsPerHour => "jobs_per_hour",
            QuotaKind::CpuPerMinute => "cpu_seconds_per_minute",
        }
    }
}

/// The numbers behind the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaHeader {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window frees at least one unit.
    pub reset_s: u64,
}

/// A refused submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub kind: QuotaKind,
    pub retry_after: Duration,
    pub header: QuotaHeader,
}

/// A client's usage, reported by `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClientQuota {
    pub active_jobs: u32,
    pub concurrent_jobs_limit: u32,
    pub jobs_last_hour: u32,
    pub jobs_per_hour_limit: u32,
    pub cpu_seconds_last_minute: f64,
    pub cpu_seconds_per_minute_limit: u64,
}

#[derive(Debug, Default)]
struct Usage {
    active: u32,
    submissions: VecDeque<Instant>,
    cpu: VecDeque<(Instant, u64)>,
}

impl Usage {
    fn prune(&mut self, now: Instant) {
        while self
            .submissions
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            self.submissions.pop_front();
        }
        while self
            .cpu
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= MINUTE)
        {
            self.cpu.pop_front();
        }
    }

    fn cpu_ms(&self) -> u64 {
        self.cpu.iter().map(|(_, ms)| ms).sum()
    }

    fn is_idle(&self) -> bool {
        self.active == 0 && self.submissions.is_empty() && self.cpu.is_empty()
    }
}

/// The quota book of every client.
#[derive(Debug)]
pub struct RateLimiter {
    limits: ClientLimits,
    clients: HashMap<ClientKey, Usage>,
}

impl RateLimiter {
    pub fn new(limits: ClientLimits) -> Self {
        RateLimiter {
            limits,
            clients: HashMap::new(),
        }
    }

    /// Checks every quota without recording anything (before the upload is parsed).
    pub fn check(&mut self, client: ClientKey, now: Instant) -> Result<QuotaHeader, Refusal> {
        let limits = self.limits.clone();
        let usage = self.clients.entry(client).or_default();
        usage.prune(now);
        check_usage(&limits, usage, now)
    }

    /// Checks again and records a submission that is about to be queued.
    pub fn admit(&mut self, client: ClientKey, now: Instant) -> Result<QuotaHeader, Refusal> {
        let mut header = self.check(client, now)?;
        let usage = self.clients.entry(client).or_default();
        usage.active += 1;
        usage.submissions.push_back(now);
        header.remaining = header.remaining.saturating_sub(1);
        Ok(header)
    }

    /// Undoes [`RateLimiter::admit`] when the job could not be queued after all.
    pub fn unadmit(&mut self, client: ClientKey) {
        if let Some(usage) = self.clients.get_mut(&client) {
            usage.active = usage.active.saturating_sub(1);
            usage.submissions.pop_back();
        }
    }

    /// Records the end of a job and the CPU time it used.
    pub fn finish(&mut self, client: ClientKey, cpu_ms: u64, now: Instant) {
        let usage = self.clients.entry(client).or_default();
        usage.active = usage.active.saturating_sub(1);
        if cpu_ms > 0 {
            usage.cpu.push_back((now, cpu_ms));
        }
    }

    pub fn quota(&mut self, client: ClientKey, now: Instant) -> ClientQuota {
        let usage = self.clients.entry(client).or_default();
        usage.prune(now);
        ClientQuota {
            active_jobs: usage.active,
            concurrent_jobs_limit: self.limits.concurrent_jobs,
            jobs_last_hour: u32::try_from(usage.submissions.len()).unwrap_or(u32::MAX),
            jobs_per_hour_limit: self.limits.jobs_per_hour,
            cpu_seconds_last_minute: ms_to_seconds(usage.cpu_ms()),
            cpu_seconds_per_minute_limit: self.limits.cpu_seconds_per_minute,
        }
    }

    /// Forgets clients with nothing left in any window (bounds memory).
    pub fn sweep(&mut self, now: Instant) {
        self.clients.retain(|_, usage| {
            usage.prune(now);
            !usage.is_idle()
        });
    }

    pub fn tracked_clients(&self) -> usize {
        self.clients.len()
    }
}

fn ms_to_seconds(ms: u64) -> f64 {
    // Precision loss above 2^52 ms is irrelevant for a display value.
    #[allow(clippy::cast_precision_loss)]
    let seconds = ms as f64 / 1000.0;
    seconds
}

fn check_usage(limits: &ClientLimits, usage: &Usage, now: Instant) -> Result<QuotaHeader, Refusal> {
    let until = |t: Instant, window: Duration| window.saturating_sub(now.duration_since(t));
    let hourly = QuotaHeader {
        limit: u64::from(limits.jobs_per_hour),
        remaining: u64::from(limits.jobs_per_hour).saturating_sub(usage.submissions.len() as u64),
        reset_s: usage
            .submissions
            .front()
            .map_or(0, |t| ceil_secs(until(*t, HOUR))),
    };
    if usage.active >= limits.concurrent_jobs {
        let header = QuotaHeader {
            limit: u64::from(limits.concurrent_jobs),
            remaining: 0,
            reset_s: CONCURRENCY_RETRY.as_secs(),
        };
        return Err(Refusal {
            kind: QuotaKind::Concurrency,
            retry_after: CONCURRENCY_RETRY,
            header,
        });
    }
    if hourly.remaining == 0 {
        let retry_after = Duration::from_secs(hourly.reset_s.max(1));
        return Err(Refusal {
            kind: QuotaKind::JobsPerHour,
            retry_after,
            header: hourly,
        });
    }
    let cpu_limit_ms = limits.cpu_seconds_per_minute.saturating_mul(1000);
    if usage.cpu_ms() >= cpu_limit_ms {
        let retry_after = cpu_retry(usage, cpu_limit_ms, now);
        let header = QuotaHeader {
            limit: limits.cpu_seconds_per_minute,
            remaining: 0,
            reset_s: ceil_secs(retry_after),
        };
        return Err(Refusal {
            kind: QuotaKind::CpuPerMinute,
            retry_after,
            header,
        });
    }
    Ok(hourly)
}

/// When enough CPU time leaves the window to go back under the limit.
fn cpu_retry(usage: &Usage, limit_ms: u64, now: Instant) -> Duration {
    let mut used = usage.cpu_ms();
    for (t, ms) in &usage.cpu {
        used -= ms;
        if used < limit_ms {
            let left = MINUTE.saturating_sub(now.duration_since(*t));
            return Duration::from_secs(ceil_secs(left).max(1));
        }
    }
    MINUTE
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> RateLimiter {
        RateLimiter::new(ClientLimits::default())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn given_two_addresses_in_one_ipv6_64_then_they_are_the_same_client() {
        let a = ClientKey::from_ip(ip("2001:db8:1:2::1"));
        let b = ClientKey::from_ip(ip("2001:db8:1:2:ffff::9"));
        let c = ClientKey::from_ip(ip("2001:db8:1:3::1"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn given_ipv4_mapped_ipv6_then_it_is_the_ipv4_client() {
        assert_eq!(
            ClientKey::from_ip(ip("::ffff:10.0.0.1")),
            ClientKey::from_ip(ip("10.0.0.1"))
        );
    }

    #[test]
    fn given_untrusted_peer_then_forwarded_for_is_ignored() {
        let got = client_ip(ip("203.0.113.5"), Some("1.2.3.4"), &[ip("127.0.0.1")]);
        assert_eq!(got, ip("203.0.113.5"));
    }

    #[test]
    fn given_trusted_proxy_then_rightmost_untrusted_hop_is_the_client() {
        let trusted = [ip("127.0.0.1"), ip("10.0.0.2")];
        let got = client_ip(
            ip("127.0.0.1"),
            Some("6.6.6.6, 1.2.3.4, 10.0.0.2"),
            &trusted,
        );
        assert_eq!(got, ip("1.2.3.4"));
    }

    #[test]
    fn given_a_proxy_seen_through_a_dual_stack_listener_then_it_is_still_trusted() {
        let trusted = [ip("10.0.0.2")];
        assert!(is_trusted_proxy(ip("::ffff:10.0.0.2"), &trusted));
        assert!(is_trusted_proxy(ip("10.0.0.2"), &[ip("::ffff:10.0.0.2")]));
        assert!(!is_trusted_proxy(ip("10.0.0.3"), &trusted));
    }

    #[test]
    fn given_trusted_proxy_and_garbage_header_then_the_proxy_is_the_client() {
        let got = client_ip(ip("127.0.0.1"), Some("not-an-ip"), &[ip("127.0.0.1")]);
        assert_eq!(got, ip("127.0.0.1"));
    }

    #[test]
    fn given_two_active_jobs_when_third_submitted_then_concurrency_refuses() {
        let mut rl = limiter();
        let c = ClientKey::from_ip(ip("1.1.1.1"));
        let now = Instant::now();
        rl.admit(c, now).unwrap();
        rl.admit(c, now).unwrap();
        let refusal = rl.check(c, now).unwrap_err();
        assert_eq!(refusal.kind, QuotaKind::Concurrency);
        rl.finish(c, 0, now);
        rl.check(c, now).unwrap();
    }

    #[test]
    fn given_twenty_jobs_in_an_hour_then_the_21st_waits_for_the_oldest_to_age_out() {
        let mut rl = limiter();
        let c = ClientKey::from_ip(ip("1.1.1.1"));
        let start = Instant::now();
        for i in 0..20 {
            rl.admit(c, start + Duration::from_secs(i)).unwrap();
            rl.finish(c, 0, start + Duration::from_secs(i));
        }
        let at = start + Duration::from_secs(100);
        let refusal = rl.check(c, at).unwrap_err();
        assert_eq!(refusal.kind, QuotaKind::JobsPerHour);
        assert_eq!(refusal.retry_after, Duration::from_secs(3500));
        rl.check(c, start + HOUR).unwrap();
    }

    #[test]
    fn given_cpu_minute_used_up_then_refusal_until_it_ages_out() {
        let mut rl = limiter();
        let c = ClientKey::from_ip(ip("1.1.1.1"));
        let start = Instant::now();
        rl.admit(c, start).unwrap();
        rl.finish(c, 10_000, start);
        let refusal = rl.check(c, start + Duration::from_secs(20)).unwrap_err();
        assert_eq!(refusal.kind, QuotaKind::CpuPerMinute);
        assert_eq!(refusal.retry_after, Duration::from_secs(40));
        rl.check(c, start + MINUTE).unwrap();
    }

    #[test]
    fn given_unadmit_then_the_submission_does_not_count() {
        let mut rl = limiter();
        let c = ClientKey::from_ip(ip("1.1.1.1"));
        let now = Instant::now();
        rl.admit(c, now).unwrap();
        rl.unadmit(c);
        let quota = rl.quota(c, now);
        assert_eq!((quota.active_jobs, quota.jobs_last_hour), (0, 0));
        rl.sweep(now);
        assert_eq!(rl.tracked_clients(), 0);
    }
}
