-- 0002: the campaign engine: policies and targets, exclusions, admission, per-phase
-- deadlines, retries, the health gate, and a hash-chained audit log.

-- Campaigns keep their rules as validated JSON (fleet/policy.py) next to the columns the
-- runner's SQL needs.
ALTER TABLE campaigns DROP CONSTRAINT campaigns_control_check;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_control_check
    CHECK (control IN ('draft', 'running', 'paused', 'canceled', 'aborted'));
ALTER TABLE campaigns
    ADD COLUMN policy jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN target jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN rollback_of bigint REFERENCES campaigns (id),
    -- When the current wave met the success threshold; its soak time counts from here.
    ADD COLUMN wave_ready_at timestamptz;

ALTER TABLE campaign_waves ADD COLUMN soak_s real NOT NULL DEFAULT 0;

ALTER TABLE packages
    ADD COLUMN from_versions text[] NOT NULL DEFAULT '{}',
    ADD COLUMN requires jsonb NOT NULL DEFAULT '{}';

-- The latest heartbeat's health, for the health gate and the plan; heartbeat_at is on the
-- controller's clock.
ALTER TABLE terminals
    ADD COLUMN health jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN heartbeat_at timestamptz;

ALTER TABLE executions
    -- Attempts started so far; a retry is a new attempt of the same execution.
    ADD COLUMN attempt integer NOT NULL DEFAULT 0,
    -- Set when a start command admits the terminal; NULL: the controller holds it.
    ADD COLUMN admitted_at timestamptz,
    -- retry_wait / postponed: not before this.
    ADD COLUMN next_attempt_at timestamptz,
    -- When the execution entered its current deadline phase.
    ADD COLUMN phase_since timestamptz,
    ADD COLUMN postpones integer NOT NULL DEFAULT 0,
    ADD COLUMN resends integer NOT NULL DEFAULT 0,
    ADD COLUMN cancel_sent_at timestamptz,
    ADD COLUMN package text,
    ADD COLUMN versions_before jsonb,
    ADD COLUMN baseline_error_rate float8;
CREATE INDEX executions_admission ON executions (campaign_id, wave, bucket)
    WHERE admitted_at IS NULL;
-- The runner's per-state passes (unreachable, health gate, resends) and its offline check
-- read few rows of large campaigns; these keep them from scanning every execution.
CREATE INDEX executions_state ON executions (campaign_id, state);
CREATE INDEX terminals_offline ON terminals (id) WHERE NOT online;

-- Members of a campaign's groups that do not take part, and why (fleet/targeting.py).
CREATE TABLE campaign_exclusions (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    terminal_id  text NOT NULL REFERENCES terminals (id),
    reason       text NOT NULL,
    detail       text NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (campaign_id, terminal_id)
);

-- The state machine gains retry_wait and health_check, and each state its deadline phase;
-- the whole transition table is restated from fleet/states.py (a test keeps them equal).
ALTER TABLE execution_states ADD COLUMN phase text;
INSERT INTO execution_states (state, final) VALUES ('retry_wait', false), ('health_check', false);
UPDATE execution_states s SET phase = p.phase
FROM (VALUES
    ('pending', 'start'),
    ('queued', 'start'),
    ('deferred', 'start'),
    ('downloading', 'download'),
    ('downloaded', 'download'),
    ('verifying', 'download'),
    ('verified', 'download'),
    ('backing_up', 'install'),
    ('installing', 'install'),
    ('rebooting', 'reboot'),
    ('self_testing', 'reboot'),
    ('succeeded', NULL),
    ('failed', NULL),
    ('rolled_back', NULL),
    ('rejected', NULL),
    ('already_installed', NULL),
    ('timed_out', NULL),
    ('canceled', NULL),
    ('canceling', NULL),
    ('unreachable', NULL),
    ('retry_wait', NULL),
    ('health_check', 'health')
) AS p (state, phase)
WHERE s.state = p.state;

DELETE FROM state_transitions;
INSERT INTO state_transitions (from_state, to_state) VALUES
    ('backing_up', 'failed'),
    ('backing_up', 'installing'),
    ('backing_up', 'retry_wait'),
    ('backing_up', 'timed_out'),
    ('backing_up', 'unreachable'),
    ('canceling', 'already_installed'),
    ('canceling', 'canceled'),
    ('canceling', 'deferred'),
    ('canceling', 'downloading'),
    ('canceling', 'failed'),
    ('canceling', 'health_check'),
    ('canceling', 'queued'),
    ('canceling', 'rejected'),
    ('canceling', 'retry_wait'),
    ('canceling', 'timed_out'),
    ('canceling', 'unreachable'),
    ('deferred', 'canceled'),
    ('deferred', 'deferred'),
    ('deferred', 'downloading'),
    ('deferred', 'failed'),
    ('deferred', 'pending'),
    ('deferred', 'queued'),
    ('deferred', 'retry_wait'),
    ('deferred', 'timed_out'),
    ('deferred', 'unreachable'),
    ('downloaded', 'canceled'),
    ('downloaded', 'downloading'),
    ('downloaded', 'failed'),
    ('downloaded', 'retry_wait'),
    ('downloaded', 'timed_out'),
    ('downloaded', 'unreachable'),
    ('downloaded', 'verifying'),
    ('downloading', 'canceled'),
    ('downloading', 'downloaded'),
    ('downloading', 'downloading'),
    ('downloading', 'failed'),
    ('downloading', 'retry_wait'),
    ('downloading', 'timed_out'),
    ('downloading', 'unreachable'),
    ('health_check', 'failed'),
    ('health_check', 'retry_wait'),
    ('health_check', 'succeeded'),
    ('health_check', 'timed_out'),
    ('installing', 'failed'),
    ('installing', 'rebooting'),
    ('installing', 'retry_wait'),
    ('installing', 'rolled_back'),
    ('installing', 'self_testing'),
    ('installing', 'timed_out'),
    ('installing', 'unreachable'),
    ('pending', 'already_installed'),
    ('pending', 'canceled'),
    ('pending', 'canceling'),
    ('pending', 'deferred'),
    ('pending', 'downloading'),
    ('pending', 'failed'),
    ('pending', 'health_check'),
    ('pending', 'queued'),
    ('pending', 'rejected'),
    ('pending', 'retry_wait'),
    ('pending', 'timed_out'),
    ('pending', 'unreachable'),
    ('queued', 'already_installed'),
    ('queued', 'canceled'),
    ('queued', 'deferred'),
    ('queued', 'downloading'),
    ('queued', 'failed'),
    ('queued', 'health_check'),
    ('queued', 'rejected'),
    ('queued', 'retry_wait'),
    ('queued', 'timed_out'),
    ('queued', 'unreachable'),
    ('rebooting', 'failed'),
    ('rebooting', 'retry_wait'),
    ('rebooting', 'rolled_back'),
    ('rebooting', 'self_testing'),
    ('rebooting', 'timed_out'),
    ('rebooting', 'unreachable'),
    ('retry_wait', 'already_installed'),
    ('retry_wait', 'backing_up'),
    ('retry_wait', 'canceled'),
    ('retry_wait', 'deferred'),
    ('retry_wait', 'downloaded'),
    ('retry_wait', 'downloading'),
    ('retry_wait', 'failed'),
    ('retry_wait', 'health_check'),
    ('retry_wait', 'installing'),
    ('retry_wait', 'pending'),
    ('retry_wait', 'queued'),
    ('retry_wait', 'rebooting'),
    ('retry_wait', 'rejected'),
    ('retry_wait', 'rolled_back'),
    ('retry_wait', 'self_testing'),
    ('retry_wait', 'succeeded'),
    ('retry_wait', 'unreachable'),
    ('retry_wait', 'verified'),
    ('retry_wait', 'verifying'),
    ('self_testing', 'backing_up'),
    ('self_testing', 'failed'),
    ('self_testing', 'health_check'),
    ('self_testing', 'retry_wait'),
    ('self_testing', 'rolled_back'),
    ('self_testing', 'succeeded'),
    ('self_testing', 'timed_out'),
    ('self_testing', 'unreachable'),
    ('unreachable', 'already_installed'),
    ('unreachable', 'backing_up'),
    ('unreachable', 'canceled'),
    ('unreachable', 'deferred'),
    ('unreachable', 'downloaded'),
    ('unreachable', 'downloading'),
    ('unreachable', 'failed'),
    ('unreachable', 'health_check'),
    ('unreachable', 'installing'),
    ('unreachable', 'pending'),
    ('unreachable', 'queued'),
    ('unreachable', 'rebooting'),
    ('unreachable', 'rejected'),
    ('unreachable', 'retry_wait'),
    ('unreachable', 'rolled_back'),
    ('unreachable', 'self_testing'),
    ('unreachable', 'succeeded'),
    ('unreachable', 'timed_out'),
    ('unreachable', 'verified'),
    ('unreachable', 'verifying'),
    ('verified', 'backing_up'),
    ('verified', 'canceled'),
    ('verified', 'downloading'),
    ('verified', 'failed'),
    ('verified', 'retry_wait'),
    ('verified', 'timed_out'),
    ('verified', 'unreachable'),
    ('verifying', 'failed'),
    ('verifying', 'rejected'),
    ('verifying', 'retry_wait'),
    ('verifying', 'timed_out'),
    ('verifying', 'unreachable'),
    ('verifying', 'verified');

ALTER TABLE update_events
    ADD COLUMN attempt integer,
    ADD COLUMN package text;

-- Wait before retry number `attempt` of an execution: the campaign's exponential backoff
-- (fleet/policy.py Retries).
CREATE FUNCTION fleet_backoff(policy jsonb, attempt integer) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_interval(secs => least(
        (policy -> 'retries' ->> 'backoff_s')::float8
            * power((policy -> 'retries' ->> 'backoff_factor')::float8, greatest(attempt - 1, 0)),
        (policy -> 'retries' ->> 'backoff_max_s')::float8))
$$;

-- A number a terminal reported in its heartbeat health, or NULL if it is not a number.
CREATE FUNCTION fleet_health_number(health jsonb, key text) RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(health -> key) = 'number' THEN (health ->> key)::float8 END
$$;

-- Campaigns started under 0001 keep the rules they were started with: their waves and
-- thresholds, no window, no health gate, no retries, no cumulative threshold; their
-- executions under way count as admitted (attempt 1), so deadlines reach them.
UPDATE campaigns c SET policy = jsonb_build_object(
    'waves', (SELECT jsonb_agg(jsonb_build_object('percent', w.bucket_hi / 100.0, 'soak_s', 0)
                               ORDER BY w.wave)
              FROM campaign_waves w WHERE w.campaign_id = c.id),
    'success_threshold', c.success_threshold,
    'failure_threshold', c.failure_threshold,
    'cumulative_failure_threshold', 1.0,
    'threshold_action', 'pause',
    'health_gate', jsonb_build_object('enabled', false, 'tolerance', 0.02),
    'deadlines', jsonb_build_object('start_s', 3600, 'download_s', 3600, 'install_s', 3600,
                                    'reboot_s', 3600, 'health_s', 3600,
                                    'unreachable_s', 259200),
    'retries', jsonb_build_object('download', 0, 'verify', 0, 'install', 0, 'self_test', 0,
                                  'health', 0, 'timeout', 0, 'backoff_s', 300,
                                  'backoff_factor', 2, 'backoff_max_s', 21600),
    'window', NULL,
    'max_postpones', 0,
    'postpone_delay_s', 3600,
    'resend_after_s', 120,
    'max_resends', 3,
    'allow_downgrade', false,
    'expected_duration_s', 600);
UPDATE executions
SET attempt = 1, admitted_at = updated_at, phase_since = updated_at
WHERE state NOT IN ('pending', 'canceling');

-- Every operator action and automatic decision. Each row's hash covers the previous row's
-- hash and the row itself (fleet/audit.py), so an edited, inserted or deleted row breaks
-- the chain; the triggers make the table append-only for everyone but a superuser who
-- disables them, and the chain catches that too. campaign_log, its unchained
-- predecessor, is kept as it was, read-only history.
ALTER TABLE campaign_log RENAME TO campaign_log_0001;
CREATE TABLE audit_log (
    id           bigint PRIMARY KEY,
    at           timestamptz NOT NULL,
    actor        text NOT NULL,
    action       text NOT NULL,
    campaign_id  bigint,
    -- Canonical JSON text, exactly what the hash covers (jsonb would renormalise it).
    detail       text NOT NULL,
    prev_hash    text NOT NULL,
    hash         text NOT NULL UNIQUE
);
CREATE INDEX audit_log_campaign ON audit_log (campaign_id, id);

CREATE FUNCTION fleet_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION fleet_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fleet_audit_append_only();
