-- Telemetry (protocol.md §8): presence, metric points with hourly and
-- daily rollups, inventory, and the anchor audit retention leaves behind.

-- The presence last recorded by the presence job: 1 online, 0 offline,
-- NULL not decided yet (agents from before this migration; a new agent
-- starts online). Each partial index holds the agents that could change
-- one way, by last_seen, so a run that changes nothing reads no rows.
ALTER TABLE agents ADD COLUMN online INTEGER;
CREATE INDEX agents_may_come_online ON agents (last_seen) WHERE revoked_at IS NULL AND online IS NOT 1;
CREATE INDEX agents_may_go_offline ON agents (last_seen) WHERE revoked_at IS NULL AND online IS NOT 0;

-- Batch ids already stored per agent, so a retried batch is stored once.
CREATE TABLE metric_batches (
    agent_id    TEXT NOT NULL REFERENCES agents (id),
    batch_id    TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (agent_id, batch_id)
) WITHOUT ROWID;
CREATE INDEX metric_batches_received_at ON metric_batches (received_at);

-- One agent's metric name and label set. `labels` is canonical JSON
-- (sorted keys, no whitespace), so one label set has one text.
CREATE TABLE metric_series (
    id         INTEGER PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents (id),
    name       TEXT NOT NULL,
    labels     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (agent_id, name, labels)
);

-- Raw points, clustered by series and time (a query is one range per
-- series). No foreign key: points are the hot path, and the series they
-- belong to only go with the agent (delete_agent) or never.
CREATE TABLE metric_points (
    series_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    value     REAL NOT NULL,
    PRIMARY KEY (series_id, ts_ms)
) WITHOUT ROWID;
CREATE INDEX metric_points_ts ON metric_points (ts_ms);

-- Rollups by bucket start (hour; UTC day), kept incrementally from the
-- points each batch inserted.
CREATE TABLE metric_hourly (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE INDEX metric_hourly_bucket ON metric_hourly (bucket);

CREATE TABLE metric_daily (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE INDEX metric_daily_bucket ON metric_daily (bucket);

-- What each agent reports it looks after; `attrs` is free-form JSON.
CREATE TABLE inventory (
    agent_id   TEXT NOT NULL REFERENCES agents (id),
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    attrs      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (agent_id, kind, key)
) WITHOUT ROWID;

-- The last audit row retention deleted: the chain now starts after it
-- (the first remaining row's prev_hash is this hash).
CREATE TABLE audit_anchor (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    id        INTEGER NOT NULL,
    hash      BLOB NOT NULL
);

-- Finished commands by when they finished, for retention.
CREATE INDEX commands_finished_at ON commands (finished_at) WHERE finished_at IS NOT NULL;

-- Deleting an agent finds its rows without scanning whole tables.
CREATE INDEX agent_items_agent ON agent_items (agent_id);
CREATE INDEX device_grants_agent ON device_grants (agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX issued_certs_agent ON issued_certs (agent_id);

-- Deleted agents, for a day: other servers catch up from here (the agent
-- row is gone) and revoke the agent's stream they hold in memory.
CREATE TABLE deleted_agents (
    id          TEXT PRIMARY KEY,
    epoch       BIGINT NOT NULL,
    head_seq    BIGINT NOT NULL,
    floor_seq   BIGINT NOT NULL,
    deleted_at  BIGINT NOT NULL
);
CREATE INDEX deleted_agents_at ON deleted_agents (deleted_at);
