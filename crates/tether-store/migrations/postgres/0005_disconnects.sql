-- When the agent's last WebSocket closed (protocol.md §9). An agent seen at
-- or before this instant is offline at once, without waiting for
-- `last_seen` to age past the threshold; any later request makes it online.
ALTER TABLE agents ADD COLUMN disconnected_at BIGINT;
