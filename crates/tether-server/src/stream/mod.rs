//! The in-memory side of every agent's stream: its head seq, epoch and
//! revocation, and the waiters parked on it. Idle polls are answered from
//! here alone; the store is read only when there are signals to send.
//!
//! Each agent has one `watch` channel. Appends publish the new head through a
//! [`Notifier`], which wakes every waiter with the head in the message (no
//! lookup needed). A new poll bumps `poll_gen`, which ends the previous one.
//!
//! With several servers on one database, the same [`StreamEvent`]s travel
//! between them over NATS ([`nats`]), and each server also catches up from
//! the database now and then ([`Streams::catch_up`]) in case a message was lost.

pub mod nats;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;
use tether_proto::AgentId;
use tether_store::{AgentRecord, Head, Millis, Store, StoreError, StreamChange};
use tokio::sync::watch;

/// What a waiter needs to decide whether to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub epoch: u64,
    pub head: u64,
    /// Signals with seq ≤ floor are no longer retained.
    pub floor: u64,
    /// Incremented by each new poll: the previous poll sees the change and ends.
    pub poll_gen: u64,
    pub revoked: bool,
}

#[derive(Debug)]
pub struct AgentStream {
    state: watch::Sender<StreamState>,
    /// Last authenticated request (ms); flushed to the store in batches.
    last_seen: AtomicI64,
    flushed_seen: AtomicI64,
    revocation: std::sync::OnceLock<(Millis, String)>,
    /// The enrolled Ed25519 key, for signed requests (protocol.md §3). An agent's
    /// key never changes (re-enrolling makes a new agent), so this copy
    /// cannot go stale. Raw bytes keep idle streams small (a decoded key
    /// is ~190 bytes); only signed requests pay for decoding it.
    public_key: Option<[u8; 32]>,
    /// Access tokens issued at or before this instant (ms) are refused; 0
    /// for none. Set when refresh-token reuse revokes the agent's tokens.
    tokens_valid_after: AtomicI64,
}

impl AgentStream {
    fn new(rec: &AgentRecord) -> Self {
        let state = StreamState {
            epoch: rec.epoch,
            head: rec.head_seq,
            floor: rec.floor_seq,
            poll_gen: 0,
            revoked: rec.revoked_at.is_some(),
        };
        let revocation = std::sync::OnceLock::new();
        if let Some(at) = rec.revoked_at {
            let _ = revocation.set((at, rec.revoke_reason.clone().unwrap_or_default()));
        }
        let seen = rec.last_seen.unwrap_or(0);
        Self {
            state: watch::Sender::new(state),
            last_seen: AtomicI64::new(seen),
            flushed_seen: AtomicI64::new(seen),
            revocation,
            public_key: rec.public_key.as_slice().try_into().ok(),
            tokens_valid_after: AtomicI64::new(rec.tokens_valid_after.unwrap_or(0)),
        }
    }

    /// The agent's enrolled public key (raw), if it enrolled with one.
    pub fn public_key(&self) -> Option<&[u8; 32]> {
        self.public_key.as_ref()
    }

    pub fn state(&self) -> StreamState {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<StreamState> {
        self.state.subscribe()
    }

    /// Starts a poll: ends any poll already waiting and returns this poll's generation.
    pub fn begin_poll(&self) -> u64 {
        let mut generation = 0;
        self.state.send_modify(|s| {
            s.poll_gen += 1;
            generation = s.poll_gen;
        });
        generation
    }

    /// Whether an access token issued at `iat_s` (seconds) was revoked by a
    /// detected refresh-token reuse. `iat` has whole seconds, so a token of
    /// the very second of the reuse counts as revoked too.
    pub fn token_revoked(&self, iat_s: u64) -> bool {
        let after = self.tokens_valid_after.load(Ordering::Relaxed);
        after > 0 && (iat_s as i64).saturating_mul(1000) <= after
    }

    pub fn revocation(&self) -> Option<&(Millis, String)> {
        self.revocation.get()
    }

    pub fn seen(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    fn advance(&self, head: Head) {
        self.state.send_if_modified(|s| {
            let newer = head.epoch != s.epoch || head.seq > s.head;
            if newer {
                s.epoch = head.epoch;
                s.head = head.seq;
            }
            newer
        });
    }

    fn revoke(&self, at: Millis, reason: &str) {
        let _ = self.revocation.set((at, reason.to_owned()));
        self.state.send_if_modified(|s| !std::mem::replace(&mut s.revoked, true));
    }

    /// Refuses access tokens issued until `at` and ends the waiting poll,
    /// once per new cut-off.
    fn revoke_tokens(&self, at: Millis) {
        if self.tokens_valid_after.fetch_max(at, Ordering::Relaxed) < at {
            self.state.send_modify(|st| st.poll_gen += 1);
        }
    }

    fn set_floor(&self, floor: u64) {
        // Waiters are not woken: a parked poll re-checks the floor when it wakes.
        self.state.send_if_modified(|st| {
            st.floor = st.floor.max(floor);
            false
        });
    }
}

/// Every loaded agent stream, keyed by agent id.
#[derive(Debug, Default)]
pub struct Streams {
    agents: DashMap<AgentId, Arc<AgentStream>>,
    /// Counts published heads, so a load racing with an append can notice it.
    published: AtomicU64,
    /// Polls waiting right now (see [`Streams::parked`]).
    parked: std::sync::atomic::AtomicUsize,
}

/// Counts one waiting poll for as long as it lives.
#[derive(Debug)]
pub struct Parked<'a>(&'a Streams);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Streams {
    /// The agent's stream, loading it from the store on first use only.
    /// `None` when the agent does not exist.
    pub async fn get(&self, store: &dyn Store, id: AgentId) -> Result<Option<Arc<AgentStream>>, StoreError> {
        if let Some(s) = self.agents.get(&id) {
            return Ok(Some(s.clone()));
        }
        loop {
            let before = self.published.load(Ordering::Acquire);
            let Some(rec) = store.get_agent(id).await? else {
                return Ok(None);
            };
            // An append published while we were reading may have been missed: read again.
            if self.published.load(Ordering::Acquire) != before {
                continue;
            }
            let stream = self.agents.entry(id).or_insert_with(|| Arc::new(AgentStream::new(&rec))).clone();
            return Ok(Some(stream));
        }
    }

    /// Applies an event to the loaded stream it is about (an agent not
    /// loaded here reads the committed state when it is) and wakes its
    /// waiters. Counted, so a load racing with the event reads again.
    pub fn apply(&self, event: &StreamEvent) {
        if matches!(event, StreamEvent::Heads(heads) if heads.is_empty()) {
            return;
        }
        self.published.fetch_add(1, Ordering::AcqRel);
        match event {
            StreamEvent::Heads(heads) => {
                for head in heads {
                    if let Some(s) = self.agents.get(&head.agent_id) {
                        s.advance(*head);
                    }
                }
            }
            StreamEvent::Revoked { agent_id, at, reason } => {
                if let Some(s) = self.agents.get(agent_id) {
                    s.revoke(*at, reason);
                }
            }
            StreamEvent::TokensRevoked { agent_id, at } => {
                if let Some(s) = self.agents.get(agent_id) {
                    s.revoke_tokens(*at);
                }
            }
        }
    }

    /// Moves retention floors of loaded streams.
    pub fn set_floors(&self, floors: &[(AgentId, u64)]) {
        for (id, floor) in floors {
            if let Some(s) = self.agents.get(id) {
                s.set_floor(*floor);
            }
        }
    }

    /// Brings loaded streams up to what the database says changed: heads,
    /// floors, revocations and token cut-offs another server made while its
    /// message did not reach this one. Applying what is already known
    /// changes nothing and wakes no one.
    pub fn catch_up(&self, changes: &[StreamChange]) {
        self.published.fetch_add(1, Ordering::AcqRel);
        for change in changes {
            let Some(s) = self.agents.get(&change.agent_id) else { continue };
            s.advance(Head { agent_id: change.agent_id, epoch: change.epoch, seq: change.head_seq });
            s.set_floor(change.floor_seq);
            if let Some(at) = change.revoked_at {
                s.revoke(at, change.revoke_reason.as_deref().unwrap_or_default());
            }
            if let Some(at) = change.tokens_valid_after {
                s.revoke_tokens(at);
            }
        }
    }

    /// `last_seen` values that changed since the previous call; give them
    /// back with [`Self::unflushed`] if writing them failed.
    pub fn take_seen(&self) -> Vec<(AgentId, Millis)> {
        let mut out = Vec::new();
        for entry in self.agents.iter() {
            let seen = entry.last_seen.load(Ordering::Relaxed);
            if entry.flushed_seen.swap(seen, Ordering::Relaxed) != seen {
                out.push((*entry.key(), seen));
            }
        }
        out
    }

    /// Marks these `last_seen` values as not written, so the next
    /// [`Self::take_seen`] returns them again.
    pub fn unflushed(&self, seen: &[(AgentId, Millis)]) {
        for (id, _) in seen {
            if let Some(s) = self.agents.get(id) {
                s.flushed_seen.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The in-memory `last_seen` of a loaded agent.
    pub fn last_seen(&self, id: AgentId) -> Option<Millis> {
        self.agents.get(&id).map(|s| s.last_seen()).filter(|&t| t > 0)
    }

    /// Marks a poll as waiting until the guard drops.
    pub fn park(&self) -> Parked<'_> {
        self.parked.fetch_add(1, Ordering::Relaxed);
        Parked(self)
    }

    /// Polls (updates and next-command) waiting right now: tests wait on it
    /// instead of sleeping until a poll has parked.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    pub fn loaded(&self) -> usize {
        self.agents.len()
    }
}

/// A change to agents' streams that every server holding them must see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", content = "body", rename_all = "snake_case")]
pub enum StreamEvent {
    /// New signals were appended (committed).
    Heads(Vec<Head>),
    /// The agent was revoked: every further call is refused, polls end now.
    Revoked { agent_id: AgentId, at: Millis, reason: String },
    /// Refresh-token reuse: access tokens issued until `at` are refused.
    TokensRevoked { agent_id: AgentId, at: Millis },
}

/// Carries stream events to every server that may hold the agents' streams:
/// in-process for a single server, over NATS when several share a database.
pub trait Notifier: Send + Sync + std::fmt::Debug + 'static {
    /// Applies the event here at once and passes it on; never blocks.
    fn publish(&self, event: StreamEvent);
    /// Whether events reach the other servers right now. While they may not,
    /// servers catch up from the database more often.
    fn connected(&self) -> bool;
    /// Events exchanged with other servers so far.
    fn counters(&self) -> PeerCounters {
        PeerCounters::default()
    }
}

/// What a [`Notifier`] exchanged with other servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Events received from other servers and applied here.
    pub received: u64,
    /// Events not passed on because the queue to NATS was full.
    pub dropped: u64,
}

/// The single-server notifier: wakes local waiters directly.
#[derive(Debug)]
pub struct LocalNotifier(pub Arc<Streams>);

impl Notifier for LocalNotifier {
    fn publish(&self, event: StreamEvent) {
        self.0.apply(&event);
    }

    fn connected(&self) -> bool {
        true
    }
}
