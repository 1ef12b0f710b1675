-- What EMQX (compose profile `cluster`, deploy/emqx/emqx.conf) authenticates and
-- authorises against: a login role that reads terminal ids and group memberships only,
-- pgcrypto for HMAC-SHA256, and the secrets the queries need as settings of that role
-- (so no secret is written into EMQX's configuration). Idempotent; run after `migrate`.
-- Secrets come from the environment (psql 15's \getenv), never from this file.
\set ON_ERROR_STOP on
\getenv auth_password EMQX_AUTH_DB_PASSWORD
\getenv terminal_secret FLEET_TERMINAL_SECRET
\getenv controller_username FLEET_MQTT_USERNAME
\getenv controller_password FLEET_MQTT_PASSWORD

CREATE EXTENSION IF NOT EXISTS pgcrypto;

SELECT 'CREATE ROLE emqx_auth LOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'emqx_auth') \gexec

ALTER ROLE emqx_auth PASSWORD :'auth_password';
ALTER ROLE emqx_auth SET fleet.terminal_secret = :'terminal_secret';
ALTER ROLE emqx_auth SET fleet.controller_username = :'controller_username';
ALTER ROLE emqx_auth SET fleet.controller_password = :'controller_password';

GRANT CONNECT ON DATABASE :"DBNAME" TO emqx_auth;
GRANT USAGE ON SCHEMA public TO emqx_auth;
GRANT SELECT (id) ON terminals TO emqx_auth;
GRANT SELECT (terminal_id, group_name) ON group_members TO emqx_auth;
