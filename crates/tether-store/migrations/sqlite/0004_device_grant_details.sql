-- Device grants: what the approval page shows, what redemption issued, and
-- an index for the retention job (which now does the cleanup that every
-- authorization request used to do while holding the single writer).
CREATE INDEX device_grants_expires_at ON device_grants (expires_at);
-- The address the authorization request came from (RFC 8628 §5.4: shown to
-- the approving operator).
ALTER TABLE device_grants ADD COLUMN requested_ip TEXT;
-- Set when an approved grant is redeemed: the agent it created and the hash
-- of the refresh token issued, so a poll repeated after a lost response can
-- be answered for the same agent (SPEC §3 lost-response grace).
ALTER TABLE device_grants ADD COLUMN redeemed_at INTEGER;
ALTER TABLE device_grants ADD COLUMN agent_id TEXT;
ALTER TABLE device_grants ADD COLUMN refresh_token_hash BLOB;
