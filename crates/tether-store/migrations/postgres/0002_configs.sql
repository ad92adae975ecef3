-- Configuration distribution (protocol.md §6): every version of every
-- scope's document, the current version per scope, and per agent the
-- effective configuration it should run and what it reported about it.
CREATE TABLE config_versions (
    scope      TEXT NOT NULL,
    version    BIGINT NOT NULL,
    -- Canonical JSON (sorted keys, no whitespace): what `hash` covers.
    doc        TEXT NOT NULL,
    hash       TEXT NOT NULL,
    author     TEXT NOT NULL,
    comment    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, version)
);

CREATE TABLE config_scopes (
    scope      TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('global', 'label', 'agent')),
    version    BIGINT NOT NULL,
    hash       TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The hash of the agent's effective configuration (what it should run).
ALTER TABLE agents ADD COLUMN config_hash TEXT;
-- The last desired hash the agent could not apply, and why.
ALTER TABLE agents ADD COLUMN config_failed_hash TEXT;
ALTER TABLE agents ADD COLUMN config_error TEXT;
