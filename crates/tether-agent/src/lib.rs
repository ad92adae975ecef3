//! The tether agent daemon (protocol.md §5 agent side, §12): it enrolls, keeps its
//! identity and cursor in a private state dir, long-polls its stream, runs
//! allow-listed commands at most once each, and delivers every result even
//! across restarts and outages.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device_flow;
pub mod executor;
pub mod journal;
pub mod remote_config;
pub mod session;
pub mod shim;
pub mod spool;
pub mod state;

pub use config::{AgentConfig, Overrides};
pub use daemon::{Exit, Mode, Status, run};

/// Exit code for a revoked agent; the systemd unit does not restart on it.
pub const EXIT_REVOKED: i32 = 78;
