-- tether schema for PostgreSQL: the same tables and values as the embedded
-- SQLite schema, so one set of row decoders reads both. Timestamps are
-- milliseconds since the Unix epoch (BIGINT); JSON documents are kept as the
-- exact text written (TEXT), and labels are matched through a jsonb index.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at    BIGINT NOT NULL,
    disabled_at   BIGINT
);

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users(id),
    name          TEXT NOT NULL,
    token_hash    BYTEA NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    revoked_at    BIGINT,
    -- Created with the user's password (a session): ends when it changes.
    from_password BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

-- Dashboard login sessions: the cookie secret is stored as its SHA-256.
CREATE TABLE sessions (
    token_hash BYTEA PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id),
    csrf       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE enroll_tokens (
    id          TEXT PRIMARY KEY,
    token_hash  BYTEA NOT NULL UNIQUE,
    labels      TEXT NOT NULL,
    uses        BIGINT NOT NULL,
    used        BIGINT NOT NULL DEFAULT 0,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE agents (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    hostname            TEXT NOT NULL,
    labels              TEXT NOT NULL,
    facts               TEXT NOT NULL,
    public_key          BYTEA NOT NULL,
    version             TEXT,
    applied_config_hash TEXT,
    -- The last heartbeat body as the agent sent it (free-form, capped by the server).
    heartbeat           TEXT,
    -- Stream generation and position (protocol.md §4): signals (floor_seq, head_seq] are retained.
    epoch               BIGINT NOT NULL,
    head_seq            BIGINT NOT NULL DEFAULT 0,
    floor_seq           BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    last_seen           BIGINT,
    revoked_at          BIGINT,
    revoke_reason       TEXT,
    -- Access tokens issued at or before this ms are refused (refresh reuse).
    tokens_valid_after  BIGINT,
    -- When the stream state servers hold in memory last changed (head,
    -- floor, revocation, token cut-off), so other servers can catch up.
    stream_changed_at   BIGINT NOT NULL DEFAULT 0
);
-- Label targets and filters match with `labels::jsonb @> …`.
CREATE INDEX agents_labels ON agents USING GIN ((labels::jsonb) jsonb_path_ops);
CREATE INDEX agents_stream_changed_at ON agents (stream_changed_at);

CREATE TABLE refresh_tokens (
    token_hash     BYTEA PRIMARY KEY,
    family_id      TEXT NOT NULL,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    created_at     BIGINT NOT NULL,
    used_at        BIGINT,
    successor_hash BYTEA,
    revoked_at     BIGINT,
    -- When a lost-response retry used this token's one grace.
    retried_at     BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_agent ON refresh_tokens (agent_id);

CREATE TABLE signals (
    agent_id TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    ts_ms    BIGINT NOT NULL,
    ref      TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    target          TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash    BYTEA NOT NULL,
    UNIQUE (created_by, idempotency_key)
);

CREATE TABLE commands (
    id           TEXT PRIMARY KEY,
    batch_id     TEXT NOT NULL REFERENCES batches(id),
    agent_id     TEXT NOT NULL REFERENCES agents(id),
    name         TEXT NOT NULL,
    args         TEXT NOT NULL,
    timeout_s    BIGINT NOT NULL,
    priority     BIGINT NOT NULL,
    created_by   TEXT NOT NULL,
    status       TEXT NOT NULL,
    exit_code    BIGINT,
    stdout       TEXT NOT NULL DEFAULT '',
    stderr       TEXT NOT NULL DEFAULT '',
    output       TEXT NOT NULL DEFAULT 'null',
    truncated    BOOLEAN NOT NULL DEFAULT false,
    reason       TEXT,
    result_hash  BYTEA,
    -- True once its command.queued signal is in the agent's stream.
    released     BOOLEAN NOT NULL DEFAULT false,
    created_at   BIGINT NOT NULL,
    not_before   BIGINT,
    delivered_at BIGINT,
    started_at   BIGINT,
    finished_at  BIGINT,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX commands_agent ON commands (agent_id, id);
CREATE INDEX commands_batch ON commands (batch_id, id);
CREATE INDEX commands_status ON commands (status, id);
CREATE INDEX commands_active ON commands (agent_id, priority, id) WHERE status IN ('queued', 'delivered', 'running');

CREATE TABLE audit (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    ip         TEXT,
    request_id TEXT,
    details    TEXT NOT NULL,
    prev_hash  BYTEA NOT NULL,
    hash       BYTEA NOT NULL
);
CREATE INDEX audit_actor ON audit (actor, id);
CREATE INDEX audit_action ON audit (action, id);

-- The hash of the newest audit row. Every append locks this one row
-- (`FOR UPDATE`) before reading it, so appends from several servers are
-- serialised and never fork the chain (protocol.md §10).
CREATE TABLE audit_head (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    hash      BYTEA NOT NULL
);
INSERT INTO audit_head (hash) VALUES ('\x0000000000000000000000000000000000000000000000000000000000000000');

-- RFC 8628 device authorization grants. The device code is stored as its SHA-256.
CREATE TABLE device_grants (
    device_code_hash   BYTEA PRIMARY KEY,
    user_code          TEXT NOT NULL UNIQUE,
    public_key         BYTEA NOT NULL,
    hostname           TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL,
    interval_s         BIGINT NOT NULL,
    last_poll_at       BIGINT,
    -- pending | approved | denied | redeemed
    status             TEXT NOT NULL,
    labels             TEXT NOT NULL DEFAULT '{}',
    decided_by         TEXT,
    -- The address the request came from (RFC 8628 §5.4: shown to the approver).
    requested_ip       TEXT,
    -- Set on redemption: the agent made and the refresh token issued, so a
    -- repeat after a lost response is answered for the same agent.
    redeemed_at        BIGINT,
    agent_id           TEXT,
    refresh_token_hash BYTEA
);
CREATE INDEX device_grants_expires_at ON device_grants (expires_at);

-- Server secrets (the token signing key, the key for certificate material),
-- wrapped by TETHER_MASTER_KEY when it is set; every replica reads the same.
CREATE TABLE server_keys (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

-- Nonces of signed agent requests, shared by every replica until
-- expires_at (Unix s). Unlogged: a crash of the database forgets them,
-- which reopens a replay window of at most 300 s, for a write per signed
-- request without WAL.
CREATE UNLOGGED TABLE request_nonces (
    agent_id   TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, nonce)
);
CREATE INDEX request_nonces_expires_at ON request_nonces (expires_at);
