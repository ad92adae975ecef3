-- State that servers sharing one database keep in step (protocol.md §13),
-- in the embedded schema too so both backends answer the same calls.

-- Server secrets (the token signing key, the key for certificate material)
-- for stores that keep them in the database.
CREATE TABLE server_keys (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- Nonces of signed agent requests, remembered across servers until expires_at (Unix s).
CREATE TABLE request_nonces (
    agent_id   TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (agent_id, nonce)
) WITHOUT ROWID;
CREATE INDEX request_nonces_expires_at ON request_nonces (expires_at);

-- When the stream state a server holds in memory last changed (head,
-- floor, revocation, token cut-off), so other servers can catch up.
ALTER TABLE agents ADD COLUMN stream_changed_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX agents_stream_changed_at ON agents (stream_changed_at);
