-- Operator tokens of the REST API. Only a SHA-256 of each token is kept: the token is
-- 256 random bits, so a plain hash cannot be reversed, and a stolen table grants nothing.
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash   text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,
    revoked_at   timestamptz
);
-- One live token per name, so audit entries (actor = token name) say who acted.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

-- A terminal's update history (the primary key leads with the campaign). Not on
-- updated_at: every state event changes that, and would move the entry each time.
CREATE INDEX executions_terminal ON executions (terminal_id);
