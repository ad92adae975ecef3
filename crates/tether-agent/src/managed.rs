//! What managed files and certificates (protocol.md §7) share on the agent:
//! the context of a reconcile pass, reports the server hears once per
//! change, and the owner and group names an assignment may give.

use std::collections::HashMap;

use tether_proto::files::ItemReport;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::session::{Failure, Session};
use crate::state::StateDir;

/// What one reconcile pass works with.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub session: &'a Session,
    pub cfg: &'a AgentConfig,
    pub state: &'a StateDir,
    /// Stops hooks when the agent stops.
    pub stop: &'a CancellationToken,
}

/// Which kind of item a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    File,
    Cert,
}

/// The reports the server accepted, so an unchanged outcome is not sent on
/// every pass. Kept in memory only: after a restart each item is reported
/// once more, which is cheap and tells a server that lost track.
#[derive(Debug)]
pub struct Reports {
    item: Item,
    sent: HashMap<i64, ItemReport>,
}

impl Reports {
    pub fn new(item: Item) -> Self {
        Self { item, sent: HashMap::new() }
    }

    /// Sends `report` on item `id` unless the server already has it; false
    /// when it could not be delivered (sent again on the next pass).
    pub async fn send(&mut self, session: &Session, id: i64, report: ItemReport) -> bool {
        if self.sent.get(&id) == Some(&report) {
            return true;
        }
        let r = &report;
        let item = self.item;
        let sent = session
            .call(|c| async move {
                match item {
                    Item::File => c.report_file(id, r).await,
                    Item::Cert => c.report_cert(id, r).await,
                }
            })
            .await;
        match sent {
            Ok(_) => {
                self.sent.insert(id, report);
                true
            }
            Err(Failure::Refused { status, what }) => {
                // Unassigned meanwhile: the next pass no longer holds it.
                tracing::debug!(id, status, what = %what, "Server refused a report; dropping it");
                true
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "Report not delivered; it is sent again on the next pass");
                false
            }
        }
    }
}

/// The uid of a user named in an assignment (a name, or a number).
pub fn user_id(name: &str) -> Result<u32, String> {
    match name.parse() {
        Ok(id) => Ok(id),
        Err(_) => nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .ok_or_else(|| format!("there is no user {name:?} on this machine")),
    }
}

/// The gid of a group named in an assignment (a name, or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    match name.parse() {
        Ok(id) => Ok(id),
        Err(_) => nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
            .ok_or_else(|| format!("there is no group {name:?} on this machine")),
    }
}
