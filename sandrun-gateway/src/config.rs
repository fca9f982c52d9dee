//! The gateway's configuration: an optional TOML file (`--config`), then command-line flags on top.
//! Every key has a built-in default, so the gateway runs with no file at all. Unknown keys are an
//! error, so a typo never silently leaves a limit at its default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Default path of the root helper's socket.
pub const DEFAULT_HELPER_SOCKET: &str = sandrun_ipc::rules::DEFAULT_SOCKET;
/// Default unprivileged user the gateway drops to when started as root.
pub const DEFAULT_USER: &str = "sandrun";

/// Per-client quotas (a client is an IPv4 address or an IPv6 /64).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// CPU seconds a client's finished jobs may use in any sliding minute.
    pub cpu_seconds_per_minute: u64,
    /// Jobs a client may have queued or running at once.
    pub concurrent_jobs: u32,
    /// Submissions a client may make in any sliding hour.
    pub jobs_per_hour: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            cpu_seconds_per_minute: 10,
            concurrent_jobs: 2,
            jobs_per_hour: 20,
        }
    }
}

/// How long results are kept and how much memory they may use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Seconds a finished job is kept (completed jobs).
    pub ttl_s: u64,
    /// Seconds a failed job is kept.
    pub failed_ttl_s: u64,
    /// Bytes of logs, outputs and pending inputs the gateway holds in memory at most, all jobs
    /// together.
    pub memory_budget_bytes: u64,
    /// Bytes of stdout (and, separately, stderr) kept per job; the rest is dropped and flagged.
    pub log_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl_s: 3600,
            failed_ttl_s: 300,
            memory_budget_bytes: 1 << 30,
            log_bytes: 1 << 20,
        }
    }
}

/// HTTP/2's initial flow-control window (RFC 9113 6.9.2): a peer may send this much before it
/// has seen any SETTINGS or WINDOW_UPDATE, so no window can be smaller.
pub const H2_MIN_WINDOW: u32 = 65_535;

/// HTTP/2's largest flow-control window (2^31 - 1).
const H2_MAX_WINDOW: u32 = (1 << 31) - 1;

/// Connection-level protections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address or an IPv6 /64) may hold at once; more are
    /// closed at accept, so one slow client cannot take every slot. Trusted proxies are exempt.
    pub max_connections_per_client: usize,
    /// Milliseconds from accept to a completed TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Milliseconds from the TLS handshake to the first byte of the first request (HTTP/1.1)
    /// or the first stream (HTTP/2).
    pub first_request_timeout_ms: u64,
    /// Milliseconds a client has to send a complete request head once its first byte arrived
    /// (slowloris).
    pub header_timeout_ms: u64,
    /// Milliseconds an HTTP/1.1 connection may stay idle between the end of a response and the
    /// first byte of the next request.
    pub keep_alive_timeout_ms: u64,
    /// Milliseconds an HTTP/2 connection may have no open stream (after its first) before it
    /// gets GOAWAY and is closed; PINGs do not count as activity.
    pub http2_idle_timeout_ms: u64,
    /// Milliseconds a request body may stall between two chunks.
    pub body_idle_timeout_ms: u64,
    /// Bytes per second a request body must average once its grace period is over: after
    /// `body_rate_grace_ms`, each byte buys `1 / min_body_bytes_per_s` seconds more; a body
    /// that falls behind is answered 408.
    pub min_body_bytes_per_s: u64,
    /// Milliseconds a request body has before `min_body_bytes_per_s` applies.
    pub body_rate_grace_ms: u64,
    /// Seconds a connection may live (uploads included; WebSockets are not limited by this).
    pub max_connection_s: u64,
    /// Bytes of request head accepted.
    pub max_header_bytes: usize,
    /// HTTP/2: bytes of one stream's request body the client may send before the gateway reads
    /// them (the stream's initial flow-control window).
    pub http2_stream_window_bytes: u32,
    /// HTTP/2: bytes of request bodies, all streams together, the client may send before the
    /// gateway reads them (the connection's flow-control window). This is what one HTTP/2
    /// connection can make the gateway hold unread; it is charged to the client's memory share
    /// for the connection's life.
    pub http2_connection_window_bytes: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 4096,
            max_connections_per_client: 32,
            tls_handshake_timeout_ms: 5_000,
            first_request_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            keep_alive_timeout_ms: 15_000,
            http2_idle_timeout_ms: 30_000,
            body_idle_timeout_ms: 30_000,
            min_body_bytes_per_s: 4096,
            body_rate_grace_ms: 10_000,
            max_connection_s: 600,
            max_header_bytes: 16 * 1024,
            http2_stream_window_bytes: 256 * 1024,
            http2_connection_window_bytes: 512 * 1024,
        }
    }
}

impl HttpLimits {
    /// Every phase timeout, for validation.
    fn timeouts(&self) -> [Duration; 6] {
        [
            self.tls_handshake_timeout_ms,
            self.first_request_timeout_ms,
            self.header_timeout_ms,
            self.keep_alive_timeout_ms,
            self.http2_idle_timeout_ms,
            self.body_idle_timeout_ms,
        ]
        .map(Duration::from_millis)
    }
}

/// The share of each pooled resource one client (an IPv4 address or an IPv6 /64) may hold, in
/// percent of the pool. The defaults (25) always leave room for at least three other clients.
/// Trusted proxies carry many clients and are not held to a share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientShares {
    /// Of `http.max_connections`, upgraded WebSockets included. The per-client cap is the smaller
    /// of this share and `http.max_connections_per_client`.
    pub connections_percent: u8,
    /// Of `max_concurrent_uploads`.
    pub uploads_percent: u8,
    /// Of `queue_capacity`.
    pub queue_percent: u8,
    /// Of `retention.memory_budget_bytes`: uploads being expanded, queued bundles, logs, outputs
    /// awaiting download and WebSocket backlogs, all together.
    pub memory_percent: u8,
}

impl Default for ClientShares {
    fn default() -> Self {
        ClientShares {
            connections_percent: 25,
            uploads_percent: 25,
            queue_percent: 25,
            memory_percent: 25,
        }
    }
}

impl ClientShares {
    /// `percent` of `total`, rounded down but at least 1, so a small pool still serves everyone.
    pub fn of(total: u64, percent: u8) -> u64 {
        (total.saturating_mul(u64::from(percent)) / 100).max(1)
    }

    /// [`ClientShares::of`] for counts.
    pub fn of_count(total: usize, percent: u8) -> usize {
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        usize::try_from(Self::of(total, percent)).unwrap_or(usize::MAX)
    }

    fn invalid(&self) -> Option<&'static str> {
        let all = [
            self.connections_percent,
            self.uploads_percent,
            self.queue_percent,
            self.memory_percent,
        ];
        all.iter()
            .any(|p| !(1..=100).contains(p))
            .then_some("client_shares: every share is a percentage from 1 to 100")
    }
}

/// What a manifest may ask for; mirrors `manifest::ManifestPolicy` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub interpreters: Vec<String>,
    pub environments: Vec<String>,
    pub max_timeout_s: u64,
    pub max_memory_mb: u64,
    pub max_cpu_seconds: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            interpreters: ["python3", "node", "bash", "sh"].map(String::from).to_vec(),
            environments: Vec::new(),
            max_timeout_s: 3600,
            max_memory_mb: 2048,
            max_cpu_seconds: 60,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub helper_socket: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub worker_key: Option<PathBuf>,
    /// The user to drop to when started as root.
    pub user: String,
    /// Identifier reported by `/health` when there is no worker key.
    pub worker_id: Option<String>,
    /// Jobs sent to the helper at once (the helper's `max_concurrent`).
    pub max_running: usize,
    /// Jobs waiting in the global queue at most.
    pub queue_capacity: usize,
    /// Milliseconds to wait before the queue is offered to the helper again after it did not take
    /// a job (not running, busy, draining); doubled after each such pause in a row.
    pub busy_retry_ms: u64,
    /// The longest of those pauses, in milliseconds.
    pub busy_retry_max_ms: u64,
    /// Attempts to hand a job to the helper; after this many the job fails with reason
    /// `unavailable`.
    pub helper_attempts: u32,
    /// Peers whose `X-Forwarded-For` header is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Upload body size cap in bytes.
    pub max_body_bytes: u64,
    /// Uploads read and expanded at once (each holds a thread of the blocking pool while its
    /// body arrives); more wait for a slot.
    pub max_concurrent_uploads: usize,
    /// Milliseconds an upload waits for a slot before it is refused with 503 and `Retry-After`.
    pub upload_wait_ms: u64,
    /// Bytes of a job's standard input (the `stdin` part or `manifest.stdin`); 413 past it.
    pub max_stdin_bytes: u64,
    /// The longest a `POST /run` waits for its job to end, in seconds; a client's `wait` is
    /// cut to it. Less than `http.max_connection_s`, which would close the connection first.
    pub run_max_wait_s: u64,
    pub client_limits: ClientLimits,
    pub client_shares: ClientShares,
    pub retention: Retention,
    pub http: HttpLimits,
    pub policy: PolicyConfig,
    /// Origins whose web pages may call the API (CORS): `["*"]` (the default, as the original
    /// Sandrun) or a list such as `["https://app.example.org"]`.
    pub cors_allowed_origins: Vec<String>,
    /// Serve plain HTTP (no TLS) on the TLS port to loopback peers. Set by `--dev` only, never
    /// from the file: outside development a plain request is told to use `https://`.
    #[serde(skip)]
    pub dev_plain_http_on_loopback: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Invariant: the constant is a valid socket address literal.
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            helper_socket: PathBuf::from(DEFAULT_HELPER_SOCKET),
            cert: None,
            key: None,
            worker_key: None,
            user: DEFAULT_USER.to_owned(),
            worker_id: None,
            max_running: 8,
            queue_capacity: 64,
            busy_retry_ms: 500,
            busy_retry_max_ms: 8000,
            helper_attempts: 10,
            trusted_proxies: Vec::new(),
            max_body_bytes: 100 << 20,
            max_concurrent_uploads: 32,
            upload_wait_ms: 10_000,
            max_stdin_bytes: crate::upload::DEFAULT_MAX_STDIN_BYTES,
            run_max_wait_s: 60,
            client_limits: ClientLimits::default(),
            client_shares: ClientShares::default(),
            retention: Retention::default(),
            http: HttpLimits::default(),
            policy: PolicyConfig::default(),
            cors_allowed_origins: vec!["*".to_owned()],
            dev_plain_http_on_loopback: false,
        }
    }
}

/// Failure to load the configuration file. (Local configuration's fault.)
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        path: PathBuf,
        message: String,
    },
    Invalid {
        message: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "reading config file {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(f, "parsing config file {}: {message}", path.display())
            }
            ConfigError::Invalid { message } => write!(f, "invalid configuration: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would make the gateway useless or unsafe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            (self.max_running == 0, "max_running must be at least 1"),
            (
                self.queue_capacity == 0,
                "queue_capacity must be at least 1",
            ),
            (
                self.helper_attempts == 0,
                "helper_attempts must be at least 1",
            ),
            (
                self.busy_retry_max_ms < self.busy_retry_ms,
                "busy_retry_max_ms must be at least busy_retry_ms",
            ),
            (
                self.max_concurrent_uploads == 0,
                "max_concurrent_uploads must be at least 1",
            ),
            (
                self.http.max_connections == 0,
                "http.max_connections must be at least 1",
            ),
            (
                self.http.max_connections_per_client == 0,
                "http.max_connections_per_client must be at least 1",
            ),
            (
                self.http.timeouts().iter().any(|t| t.is_zero()),
                "every http.*_timeout_ms must be at least 1",
            ),
            (
                self.http.http2_stream_window_bytes < H2_MIN_WINDOW
                    || self.http.http2_connection_window_bytes < H2_MIN_WINDOW,
                "http.http2_*_window_bytes must be at least 65535 (HTTP/2's initial window)",
            ),
            (
                self.http.http2_stream_window_bytes > H2_MAX_WINDOW
                    || self.http.http2_connection_window_bytes > H2_MAX_WINDOW,
                "http.http2_*_window_bytes must be at most 2147483647",
            ),
            (
                self.http.http2_stream_window_bytes > self.http.http2_connection_window_bytes,
                "http.http2_stream_window_bytes must be at most http.http2_connection_window_bytes",
            ),
            (
                self.http.min_body_bytes_per_s == 0,
                "http.min_body_bytes_per_s must be at least 1",
            ),
            (
                self.client_limits.concurrent_jobs == 0,
                "client_limits.concurrent_jobs must be >= 1",
            ),
            (
                self.retention.log_bytes == 0,
                "retention.log_bytes must be at least 1",
            ),
            (
                self.run_max_wait_s >= self.http.max_connection_s,
                "run_max_wait_s must be less than http.max_connection_s",
            ),
        ];
        let bad = checks.iter().find(|(bad, _)| *bad).map(|(_, m)| *m);
        if let Some(message) = bad.or_else(|| self.client_shares.invalid()) {
            return Err(ConfigError::Invalid {
                message: message.to_owned(),
            });
        }
        self.check_memory_share_holds_a_connection()?;
        crate::server::cors::AllowedOrigins::parse(&self.cors_allowed_origins)
            .map(drop)
            .map_err(|message| ConfigError::Invalid { message })
    }

    /// Every HTTP/2 connection is charged its connection window, and every WebSocket its write
    /// buffer, to its client's memory share for its whole life: a share smaller than either
    /// would refuse every such connection (429), so the configuration is refused instead.
    fn check_memory_share_holds_a_connection(&self) -> Result<(), ConfigError> {
        let share = ClientShares::of(
            self.retention.memory_budget_bytes,
            self.client_shares.memory_percent,
        );
        let window = u64::from(self.http.http2_connection_window_bytes);
        let socket = crate::server::ws::WS_SOCKET_CHARGE;
        let message = if window > share {
            format!(
                "http.http2_connection_window_bytes ({window}) must fit in one client's memory \
                 share ({share} bytes: retention.memory_budget_bytes x \
                 client_shares.memory_percent), or every HTTP/2 connection is refused"
            )
        } else if socket > share {
            format!(
                "one client's memory share ({share} bytes: retention.memory_budget_bytes x \
                 client_shares.memory_percent) must hold a WebSocket's {socket}-byte write \
                 buffer, or every WebSocket is refused"
            )
        } else {
            return Ok(());
        };
        Err(ConfigError::Invalid { message })
    }

    /// Connections one client may hold at once: the smaller of
    /// `http.max_connections_per_client` and its `client_shares.connections_percent`.
    pub fn connections_per_client(&self) -> usize {
        let share = ClientShares::of_count(
            self.http.max_connections,
            self.client_shares.connections_percent,
        );
        self.http.max_connections_per_client.min(share)
    }

    /// Uploads one client may have in progress (or waiting for a slot) at once.
    pub fn uploads_per_client(&self) -> usize {
        ClientShares::of_count(
            self.max_concurrent_uploads,
            self.client_shares.uploads_percent,
        )
    }

    pub fn ttl(&self, failed: bool) -> Duration {
        let secs = if failed {
            self.retention.failed_ttl_s
        } else {
            self.retention.ttl_s
        };
        Duration::from_secs(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged example (packaging/etc/gateway.toml) with every key line and table header
    /// uncommented parses (unknown keys are refused, so a renamed key fails here) and shows the
    /// built-in values; only the optional paths and worker_id, which have no default, differ.
    #[test]
    fn given_the_packaged_example_uncommented_then_it_parses_to_the_defaults() {
        let text = include_str!("../../packaging/etc/gateway.toml");
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.contains("[policy]"), "{uncommented}");
        let mut example: Config = toml::from_str(&uncommented).unwrap();
        assert!(example.cert.is_some() && example.key.is_some() && example.worker_key.is_some());
        assert!(example.worker_id.is_some());
        example.cert = None;
        example.key = None;
        example.worker_key = None;
        example.worker_id = None;
        assert_eq!(example, Config::default());
    }

    #[test]
    fn given_no_keys_then_defaults_match_the_documented_values() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(config.client_limits.cpu_seconds_per_minute, 10);
        assert_eq!(config.client_limits.concurrent_jobs, 2);
        assert_eq!(config.client_limits.jobs_per_hour, 20);
        assert_eq!(config.retention.ttl_s, 3600);
        assert_eq!(config.retention.failed_ttl_s, 300);
    }

    #[test]
    fn given_unknown_key_then_parsing_fails_naming_it() {
        let err = toml::from_str::<Config>("[client_limits]\njobs_per_day = 3\n").unwrap_err();
        assert!(err.to_string().contains("jobs_per_day"), "{err}");
    }

    #[test]
    fn given_partial_section_then_other_keys_keep_defaults() {
        let config: Config = toml::from_str("[client_limits]\nconcurrent_jobs = 5\n").unwrap();
        assert_eq!(config.client_limits.concurrent_jobs, 5);
        assert_eq!(config.client_limits.jobs_per_hour, 20);
    }

    #[test]
    fn given_a_share_of_zero_or_over_100_percent_then_validation_refuses_it() {
        for p in [0u8, 101] {
            let mut config = Config::default();
            config.client_shares.uploads_percent = p;
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("client_shares"), "{err}");
        }
    }

    #[test]
    fn given_a_small_pool_then_a_share_is_at_least_one() {
        assert_eq!(ClientShares::of_count(3, 25), 1);
        assert_eq!(ClientShares::of_count(64, 25), 16);
        assert_eq!(ClientShares::of(1 << 30, 25), 1 << 28);
    }

    #[test]
    fn given_a_per_client_cap_above_its_share_then_the_share_is_the_cap() {
        let mut config = Config::default();
        config.http.max_connections = 64;
        assert_eq!(config.connections_per_client(), 16);
        config.http.max_connections = 4096;
        assert_eq!(config.connections_per_client(), 32);
        assert_eq!(config.uploads_per_client(), 8);
    }

    #[test]
    fn given_a_zero_timeout_or_body_rate_then_validation_refuses_it() {
        let mut config = Config::default();
        config.http.keep_alive_timeout_ms = 0;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.http.min_body_bytes_per_s = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn given_http2_windows_out_of_range_or_a_stream_window_above_the_connection_then_refused() {
        let config = Config::default();
        assert_eq!(
            (
                config.http.http2_stream_window_bytes,
                config.http.http2_connection_window_bytes
            ),
            (256 << 10, 512 << 10)
        );
        for (stream, conn) in [(65_534, 1 << 20), (1 << 20, 1 << 19), (1 << 20, 1 << 31)] {
            let mut config = Config::default();
            config.http.http2_stream_window_bytes = stream;
            config.http.http2_connection_window_bytes = conn;
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("http2_"), "{stream} {conn}: {err}");
        }
    }

    #[test]
    fn given_a_memory_share_smaller_than_an_http2_window_or_a_websocket_then_validation_refuses_it()
    {
        // 4 MiB budget, 25 %: a 1 MiB share.
        let mut config = Config::default();
        config.retention.memory_budget_bytes = 4 << 20;
        config.http.http2_stream_window_bytes = 1 << 20;
        config.http.http2_connection_window_bytes = 1 << 20;
        assert!(config.validate().is_ok());
        config.http.http2_connection_window_bytes = (1 << 20) + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("http.http2_connection_window_bytes")
                && err.contains("retention.memory_budget_bytes")
                && err.contains("client_shares.memory_percent"),
            "{err}"
        );
        // A share below one WebSocket's charge, with the smallest window.
        let mut config = Config::default();
        config.http.http2_stream_window_bytes = H2_MIN_WINDOW;
        config.http.http2_connection_window_bytes = H2_MIN_WINDOW;
        config.retention.memory_budget_bytes = 4 * crate::server::ws::WS_SOCKET_CHARGE - 4;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("WebSocket"), "{err}");
        config.retention.memory_budget_bytes = 4 * crate::server::ws::WS_SOCKET_CHARGE;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn given_a_run_wait_cap_the_connection_lifetime_would_cut_then_validation_refuses_it() {
        let mut config = Config::default();
        assert_eq!(
            (config.run_max_wait_s, config.max_stdin_bytes),
            (60, 1 << 20)
        );
        config.run_max_wait_s = config.http.max_connection_s;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("run_max_wait_s"), "{err}");
        config.run_max_wait_s -= 1;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn given_zero_queue_capacity_then_validation_refuses_it() {
        let config = Config {
            queue_capacity: 0,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
