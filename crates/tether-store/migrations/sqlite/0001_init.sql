-- tether schema v1 for SQLite. Timestamps are milliseconds since the Unix epoch.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at    INTEGER NOT NULL,
    disabled_at   INTEGER
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    token_hash   BLOB NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
);

CREATE TABLE enroll_tokens (
    id          TEXT PRIMARY KEY,
    token_hash  BLOB NOT NULL UNIQUE,
    labels      TEXT NOT NULL,
    uses        INTEGER NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE agents (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    hostname            TEXT NOT NULL,
    labels              TEXT NOT NULL,
    facts               TEXT NOT NULL,
    public_key          BLOB NOT NULL,
    version             TEXT,
    applied_config_hash TEXT,
    -- The last heartbeat body as the agent sent it (free-form, capped by the server).
    heartbeat           TEXT,
    -- Stream generation and position (SPEC §4): signals (floor_seq, head_seq] are retained.
    epoch               INTEGER NOT NULL,
    head_seq            INTEGER NOT NULL DEFAULT 0,
    floor_seq           INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    last_seen           INTEGER,
    revoked_at          INTEGER,
    revoke_reason       TEXT
);

CREATE TABLE refresh_tokens (
    token_hash     BLOB PRIMARY KEY,
    family_id      TEXT NOT NULL,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    created_at     INTEGER NOT NULL,
    used_at        INTEGER,
    successor_hash BLOB,
    revoked_at     INTEGER
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

CREATE TABLE signals (
    agent_id TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    ts_ms    INTEGER NOT NULL,
    ref      TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    target          TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash    BLOB NOT NULL,
    UNIQUE (created_by, idempotency_key)
);

CREATE TABLE commands (
    id           TEXT PRIMARY KEY,
    batch_id     TEXT NOT NULL REFERENCES batches(id),
    agent_id     TEXT NOT NULL REFERENCES agents(id),
    name         TEXT NOT NULL,
    args         TEXT NOT NULL,
    timeout_s    INTEGER NOT NULL,
    priority     INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    status       TEXT NOT NULL,
    exit_code    INTEGER,
    stdout       TEXT NOT NULL DEFAULT '',
    stderr       TEXT NOT NULL DEFAULT '',
    output       TEXT NOT NULL DEFAULT 'null',
    truncated    INTEGER NOT NULL DEFAULT 0,
    reason       TEXT,
    result_hash  BLOB,
    -- 1 once its command.queued signal is in the agent's stream.
    released     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    not_before   INTEGER,
    delivered_at INTEGER,
    started_at   INTEGER,
    finished_at  INTEGER,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX commands_agent ON commands (agent_id, id);
CREATE INDEX commands_batch ON commands (batch_id, id);
CREATE INDEX commands_status ON commands (status, id);
CREATE INDEX commands_active ON commands (agent_id, priority, id) WHERE status IN ('queued', 'delivered', 'running');

CREATE TABLE audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    ip         TEXT,
    request_id TEXT,
    details    TEXT NOT NULL,
    prev_hash  BLOB NOT NULL,
    hash       BLOB NOT NULL
);
CREATE INDEX audit_actor ON audit (actor, id);
CREATE INDEX audit_action ON audit (action, id);
