//! The tether agent daemon (protocol.md §5 agent side, §7, §12): it enrolls,
//! keeps its identity and cursor in a private state dir, long-polls its
//! stream, runs allow-listed commands at most once each, delivers every
//! result even across restarts and outages, and keeps the files and
//! certificates the server assigns it in place (only where its own
//! `agent.toml` allows).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device_flow;
pub mod executor;
pub mod journal;
pub mod managed;
pub mod managed_certs;
pub mod managed_files;
pub mod metrics;
pub mod remote_config;
pub mod session;
pub mod shim;
pub mod spool;
pub mod state;
pub mod transport;

pub use config::{AgentConfig, Overrides};
pub use daemon::{Exit, Mode, Status, run};

/// Exit code for a revoked agent; the systemd unit does not restart on it.
pub const EXIT_REVOKED: i32 = 78;
