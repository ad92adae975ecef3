-- Managed files and certificates (protocol.md §7).

-- File contents, content-addressed, stored in chunks so that neither an
-- upload nor a download ever holds a whole file.
CREATE TABLE blobs (
    sha256     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE blob_chunks (
    sha256 TEXT NOT NULL REFERENCES blobs (sha256),
    idx    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (sha256, idx)
) WITHOUT ROWID;

-- A blob put at a path on the agents of a target. `target_key` is the
-- target in one canonical text, so one path has one active assignment per target.
CREATE TABLE file_assignments (
    id         INTEGER PRIMARY KEY,
    path       TEXT NOT NULL,
    sha256     TEXT NOT NULL REFERENCES blobs (sha256),
    mode       INTEGER NOT NULL,
    owner      TEXT,
    grp        TEXT,
    hook       TEXT,
    target     TEXT NOT NULL,
    target_key TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    removed_at INTEGER
);
CREATE UNIQUE INDEX file_assignments_active ON file_assignments (path, target_key) WHERE removed_at IS NULL;

-- Certificates: uploaded ones carry their material (the key sealed by the
-- server), issued ones the names agents may ask the CA for.
CREATE TABLE certs (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    source        TEXT NOT NULL CHECK (source IN ('uploaded', 'issued')),
    target        TEXT NOT NULL,
    grp           TEXT,
    hook          TEXT,
    version       INTEGER NOT NULL,
    serial        TEXT,
    not_after     INTEGER,
    cert_pem      TEXT,
    chain_pem     TEXT,
    key_sealed    BLOB,
    dns_names     TEXT NOT NULL,
    ip_addresses  TEXT NOT NULL,
    validity_days INTEGER,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE UNIQUE INDEX certs_active_name ON certs (name) WHERE revoked_at IS NULL;

-- The server's CAs: one active (it signs); others stay trusted until retired.
CREATE TABLE cas (
    id         INTEGER PRIMARY KEY,
    serial     TEXT NOT NULL,
    cert_pem   TEXT NOT NULL,
    key_sealed BLOB NOT NULL,
    not_after  INTEGER NOT NULL,
    active     BOOLEAN NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE UNIQUE INDEX cas_one_active ON cas (active) WHERE active;

-- Every certificate the CA signed, and for whom.
CREATE TABLE issued_certs (
    serial    TEXT PRIMARY KEY,
    cert_id   INTEGER NOT NULL REFERENCES certs (id),
    agent_id  TEXT NOT NULL,
    ca_id     INTEGER NOT NULL REFERENCES cas (id),
    version   INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
) WITHOUT ROWID;

-- What each agent last reported about each file assignment or certificate.
CREATE TABLE agent_items (
    agent_id   TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('file', 'cert')),
    item_id    INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('applied', 'failed')),
    error      TEXT,
    serial     TEXT,
    not_after  INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (kind, item_id, agent_id)
) WITHOUT ROWID;

-- Serials already announced as expiring soon (one audit row each).
CREATE TABLE cert_expiry_announced (
    serial       TEXT PRIMARY KEY,
    announced_at INTEGER NOT NULL
) WITHOUT ROWID;
