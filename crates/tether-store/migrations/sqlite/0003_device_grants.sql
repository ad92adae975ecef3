-- RFC 8628 device authorization grants. The device code is stored as its SHA-256.
CREATE TABLE device_grants (
    device_code_hash BLOB PRIMARY KEY,
    user_code        TEXT NOT NULL UNIQUE,
    public_key       BLOB NOT NULL,
    hostname         TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    interval_s       INTEGER NOT NULL,
    last_poll_at     INTEGER,
    -- pending | approved | denied | redeemed
    status           TEXT NOT NULL,
    labels           TEXT NOT NULL DEFAULT '{}',
    decided_by       TEXT
) WITHOUT ROWID;
