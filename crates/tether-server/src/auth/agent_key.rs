//! Long-lived agent keys (`tta_…`, protocol.md §16.5): the credential of
//! printer-fleet agents, which never refresh a token. The store holds only
//! each key's SHA-256; the agent a key names is remembered here once found,
//! so an agent's requests cost a hash and a map read, not a store round
//! trip each. Whether that agent may still act is not decided here: its
//! stream's revocation (which deletion sets too) is checked on every
//! request, so a remembered key of a revoked or deleted agent is refused at
//! once all the same.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tether_proto::AgentId;
use tether_store::{Store, StoreError};

use super::secret::{AGENT_KEY_PREFIX, hash_token};

/// Length of a key: the prefix and 32 random bytes in base64url (unpadded).
const KEY_LEN: usize = AGENT_KEY_PREFIX.len() + 43;
/// Most keys remembered (about 100 bytes each); beyond it the store answers.
const REMEMBERED_KEYS: usize = 100_000;

/// Whether `token` has the form of an agent key (not whether one exists).
pub fn looks_like_key(token: &str) -> bool {
    token.len() == KEY_LEN
        && token.starts_with(AGENT_KEY_PREFIX)
        && token[AGENT_KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Key hash → agent, for keys that were found in the store.
#[derive(Debug, Default)]
pub struct AgentKeys {
    known: DashMap<[u8; 32], AgentId>,
    /// Tracked apart from the map: `DashMap::len` locks every shard.
    len: AtomicUsize,
}

impl AgentKeys {
    /// The agent holding `key`: from memory, or from the store (then
    /// remembered). `None` for anything that is not a stored key; only
    /// found keys are remembered, so guessing fills nothing.
    pub async fn agent_of(&self, store: &dyn Store, key: &str) -> Result<Option<AgentId>, StoreError> {
        if !looks_like_key(key) {
            return Ok(None);
        }
        let hash = hash_token(key);
        if let Some(id) = self.known.get(&hash) {
            return Ok(Some(*id));
        }
        let found = store.find_agent_key(hash).await?;
        if let Some(id) = found
            && let Entry::Vacant(slot) = self.known.entry(hash)
        {
            if self.len.fetch_add(1, Ordering::Relaxed) < REMEMBERED_KEYS {
                slot.insert(id);
            } else {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(found)
    }

    /// Forgets a key whose agent no longer exists.
    pub fn forget(&self, key: &str) {
        if self.known.remove(&hash_token(key)).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::secret::new_token;

    #[test]
    fn only_keys_of_the_issued_form_look_like_keys() {
        assert!(looks_like_key(&new_token(AGENT_KEY_PREFIX)));
        assert!(!looks_like_key(&new_token(crate::auth::secret::API_TOKEN_PREFIX)));
        let key = new_token(AGENT_KEY_PREFIX);
        assert!(!looks_like_key(&key[..KEY_LEN - 1]), "too short");
        assert!(!looks_like_key(&format!("{}=", &key[..KEY_LEN - 1])), "not base64url");
        assert!(!looks_like_key(&format!("{key}A")), "too long");
    }
}
