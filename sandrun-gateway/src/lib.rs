//! # sandrun-gateway: the unprivileged public face of sandrun
//!
//! Everything that parses untrusted bytes lives here, running as the unprivileged `sandrun` user:
//! TLS, HTTP, multipart, archives, the JSON manifest, rate limiting, the queue and the job table.
//! Validated jobs go to the root helper `sandrund` over the typed `sandrun-ipc` protocol, one
//! connection per job.

pub mod budget;
pub mod bundle;
pub mod config;
pub mod helper_client;
pub mod jobs;
pub mod manifest;
pub mod metrics;
pub mod privdrop;
pub mod queue;
pub mod ratelimit;
pub mod requirements;
pub mod scheduler;
pub mod server;
pub mod signing;
pub mod startup;
pub mod state;
pub mod systemd;
pub mod upload;
