//! The binary's start-up, as one list of steps:
//! 0. have the allocator return large freed buffers to the system (see
//!    [`return_large_buffers_to_the_system`]);
//! 1. parse the command line and load the configuration;
//! 2. load TLS material and the worker key (from flags, the config, or systemd credentials);
//! 3. take the listener from systemd or bind it;
//! 4. if root, drop to the `sandrun` user for good (before any thread or untrusted byte);
//! 5. start the runtime, serve, and tell systemd we are ready;
//! 6. on SIGTERM or SIGINT, stop accepting and let open requests finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::config::Config;
use crate::server::{self, tls};
use crate::signing::WorkerKey;
use crate::state::AppState;
use crate::{privdrop, systemd};

#[derive(Debug, Parser)]
#[command(name = "sandrun-gateway", version, about = "sandrun's HTTPS gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (default 127.0.0.1:8443). Port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// sandrund's Unix socket.
    #[arg(long)]
    helper_socket: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Development mode: a self-signed certificate for localhost, generated in memory, and plain
    /// HTTP served on the same port to loopback peers (`http://localhost:8443`).
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    dev: bool,
    /// With --dev: also write the (public) development certificate to this file, for clients.
    #[arg(long, requires = "dev")]
    dev_cert_out: Option<PathBuf>,
    /// Ed25519 worker key (PKCS#8 PEM) that signs results.
    #[arg(long)]
    worker_key: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// User to become when started as root.
    #[arg(long)]
    user: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generates a worker key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a self-signed TLS certificate and its key (for a fresh installation or development;
    /// put a real certificate in their place for production). Refuses to overwrite either file.
    Cert {
        /// Certificate file to create (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Private key file to create (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// DNS names or IP addresses the certificate is for (default: this host's name,
        /// localhost, 127.0.0.1 and ::1).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    init_logging();
    return_large_buffers_to_the_system();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sandrun-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

/// Allocations from this size up get their own mapping, unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const LARGE_BUFFER_BYTES: libc::c_int = 128 * 1024;

/// Logs, outputs, uploads and `/logs` answers are large and short-lived, and glibc keeps freed
/// memory in its heaps, where fragmentation holds RSS at past peaks: in the 2,000-job soak the
/// gateway grew from 18.5 to 22.3 MB with nothing held. So: large buffers get their own mappings
/// (fixed mmap and trim thresholds, instead of glibc raising them after the first large free),
/// and one arena serves every thread instead of one heap per thread that each fragment (the
/// runtime has a handful of threads; per-thread caches still serve small allocations).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_system() {
    for (param, value, name) in [
        (
            libc::M_MMAP_THRESHOLD,
            LARGE_BUFFER_BYTES,
            "M_MMAP_THRESHOLD",
        ),
        (
            libc::M_TRIM_THRESHOLD,
            LARGE_BUFFER_BYTES,
            "M_TRIM_THRESHOLD",
        ),
        (libc::M_ARENA_MAX, 1, "M_ARENA_MAX"),
    ] {
        // SAFETY: mallopt only sets a glibc tuning parameter (no pointer is passed), and it runs
        // in `main` before any other thread exists, so no allocation races with the change.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::warn!(
                param = name,
                "mallopt refused; freed memory may stay in the heap"
            );
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}

/// Every connection is a descriptor: raises the soft limit to the hard one, and warns if that is
/// still below what `http.max_connections` needs (then accepts fail and back off).
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(256);
    if hard < needed {
        tracing::warn!(
            limit = hard,
            needed,
            "descriptor limit below http.max_connections"
        );
    }
}

fn run(cli: Cli) -> Result<(), BoxError> {
    if let Some(Command::Keygen { out }) = &cli.command {
        let key = WorkerKey::generate();
        key.save(out)?;
        println!(
            "worker key written to {}; worker_id {}",
            out.display(),
            key.worker_id()
        );
        return Ok(());
    }
    if let Some(Command::Cert { cert, key, names }) = &cli.command {
        return write_self_signed(cert, key, names);
    }
    let config = load_config(&cli)?;
    let tls = load_tls(&cli, &config)?;
    let worker_key = load_worker_key(&config)?;
    let listener = match systemd::activated_listener() {
        Some(listener) => listener,
        None => std::net::TcpListener::bind(config.listen)
            .map_err(|e| format!("binding {}: {e}", config.listen))?,
    };
    raise_fd_limit(config.http.max_connections);
    if let Some((uid, gid)) = privdrop::drop_privileges_if_root(&config.user)? {
        tracing::info!(
            uid = uid.as_raw(),
            gid = gid.as_raw(),
            "dropped root privileges"
        );
    }
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(listener, tls, AppState::new(config, worker_key)))
}

/// `sandrun-gateway cert`: the key is created first with mode 0600 and `create_new`, so an
/// existing key or certificate is never replaced and the key is never readable by others.
fn write_self_signed(cert: &PathBuf, key: &PathBuf, names: &[String]) -> Result<(), BoxError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned());
    let names: Vec<String> = if names.is_empty() {
        let mut v = vec![host.clone()];
        for n in ["localhost", "127.0.0.1", "::1"] {
            if !v.iter().any(|x| x == n) {
                v.push(n.to_owned());
            }
        }
        v
    } else {
        names.to_vec()
    };
    let (cert_pem, key_pem) = tls::self_signed_pem(&names, &host)?;
    let create = |path: &PathBuf, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| format!("creating {}: {e}", path.display()))
    };
    if cert.exists() {
        return Err(format!("{} already exists", cert.display()).into());
    }
    create(key, 0o600)?
        .write_all(key_pem.as_bytes())
        .map_err(|e| format!("writing {}: {e}", key.display()))?;
    create(cert, 0o644)?
        .write_all(cert_pem.as_bytes())
        .map_err(|e| format!("writing {}: {e}", cert.display()))?;
    println!(
        "self-signed certificate for {} written to {} (key {})",
        names.join(", "),
        cert.display(),
        key.display()
    );
    Ok(())
}

fn load_config(cli: &Cli) -> Result<Config, BoxError> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let cred = systemd::credential;
    config.listen = cli.listen.unwrap_or(config.listen);
    config.helper_socket = cli.helper_socket.clone().unwrap_or(config.helper_socket);
    config.cert = cli
        .cert
        .clone()
        .or(config.cert)
        .or_else(|| cred("cert.pem"));
    config.key = cli.key.clone().or(config.key).or_else(|| cred("key.pem"));
    config.worker_key = cli
        .worker_key
        .clone()
        .or(config.worker_key)
        .or_else(|| cred("worker.key"));
    config.user = cli.user.clone().unwrap_or(config.user);
    config.dev_plain_http_on_loopback = cli.dev;
    config.validate()?;
    Ok(config)
}

fn load_tls(cli: &Cli, config: &Config) -> Result<Arc<ServerConfig>, BoxError> {
    if cli.dev {
        let dev = tls::dangerous_dev_cert()?;
        let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&dev.cert_der));
        tracing::warn!(
            sha256 = %fingerprint,
            "DEVELOPMENT MODE: using a self-signed certificate for localhost generated in memory; \
             do not use --dev in production"
        );
        if let Some(out) = &cli.dev_cert_out {
            std::fs::write(out, &dev.cert_pem)
                .map_err(|e| format!("writing the dev certificate to {}: {e}", out.display()))?;
        }
        return Ok(dev.config);
    }
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => Ok(tls::load(cert, key)?),
        _ => Err(
            "no TLS certificate: pass --cert and --key (or credentials cert.pem and key.pem), \
                  or --dev for a local self-signed one"
                .into(),
        ),
    }
}

fn load_worker_key(config: &Config) -> Result<WorkerKey, BoxError> {
    match &config.worker_key {
        Some(path) => Ok(WorkerKey::load(path)?),
        None => {
            let key = WorkerKey::generate();
            tracing::warn!(
                worker_id = %key.worker_id(),
                "no --worker-key: signing results with an ephemeral key that dies with this process"
            );
            Ok(key)
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<ServerConfig>,
    state: Arc<AppState>,
) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, helper = %state.config.helper_socket.display(), "listening");
    // A machine-readable line for scripts and tests.
    println!("listening on {addr}");
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        systemd::notify_stopping();
        let _ = stop.send(true);
    });
    systemd::notify_ready();
    server::run(listener, tls, state, shutdown).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on SIGTERM by default.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
