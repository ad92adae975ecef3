-- Refresh reuse (protocol.md §3): a used token's one lost-response retry is
-- remembered, and a detected reuse kills every access token the agent was
-- issued until then (JWTs with iat at or before this ms are refused).
ALTER TABLE refresh_tokens ADD COLUMN retried_at INTEGER;
ALTER TABLE agents ADD COLUMN tokens_valid_after INTEGER;
-- 1 for API tokens created with the user's password (HTTP Basic, as
-- `tether login` does, or a dashboard session): they are sessions and end
-- when the password changes. Tokens created with another token stay.
ALTER TABLE api_tokens ADD COLUMN from_password INTEGER NOT NULL DEFAULT 0;
