-- Long-lived agent keys (`tta_…`) of printer-fleet agents, which never
-- refresh a token (protocol.md §16.5): stored only as the SHA-256 of the
-- secret, with its last four characters to tell keys apart. A key lives as
-- long as its agent (deleting the agent deletes its keys).
CREATE TABLE agent_keys (
    id         TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents(id),
    key_hash   BLOB NOT NULL UNIQUE,
    last4      TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX agent_keys_agent ON agent_keys (agent_id);
