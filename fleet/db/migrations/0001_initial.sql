-- 0001: inventory, packages, campaigns, executions, events, heartbeats, dead letters.

CREATE TABLE schema_version (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    id              text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    model           text NOT NULL DEFAULT 'unknown',
    merchant_id     text NOT NULL DEFAULT '',
    timezone        text NOT NULL DEFAULT 'UTC',
    versions        jsonb NOT NULL DEFAULT '{}',
    attributes      jsonb NOT NULL DEFAULT '{}',
    online          boolean NOT NULL DEFAULT false,
    last_seen       timestamptz,
    boot_id         text,
    -- Highest event seq stored, and how many times a jump over missing seqs was seen.
    last_event_seq  bigint NOT NULL DEFAULT 0,
    seq_gaps        bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE groups (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE group_members (
    group_name   text NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
    terminal_id  text NOT NULL REFERENCES terminals (id) ON DELETE CASCADE,
    added_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, terminal_id)
);
CREATE INDEX group_members_terminal ON group_members (terminal_id);

CREATE TABLE packages (
    id                 bigserial PRIMARY KEY,
    name               text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    kind               text NOT NULL CHECK (kind IN ('firmware', 'app', 'params')),
    version            text NOT NULL CHECK (version ~ '^[A-Za-z0-9._+-]{1,64}$'),
    size               bigint NOT NULL CHECK (size >= 0),
    sha256             text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    compatible_models  text[] NOT NULL CHECK (cardinality(compatible_models) > 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);

-- The state machine of fleet/states.py as data; a test keeps the two equal.
CREATE TABLE execution_states (
    state  text PRIMARY KEY,
    final  boolean NOT NULL
);

CREATE TABLE state_transitions (
    from_state  text NOT NULL REFERENCES execution_states (state),
    to_state    text NOT NULL REFERENCES execution_states (state),
    PRIMARY KEY (from_state, to_state)
);

INSERT INTO execution_states (state, final) VALUES
    ('pending', false), ('queued', false), ('deferred', false), ('downloading', false),
    ('downloaded', false), ('verifying', false), ('verified', false), ('backing_up', false),
    ('installing', false), ('rebooting', false), ('self_testing', false),
    ('unreachable', false), ('canceling', false),
    ('succeeded', true), ('failed', true), ('rolled_back', true), ('rejected', true),
    ('already_installed', true), ('timed_out', true), ('canceled', true);

INSERT INTO state_transitions (from_state, to_state)
SELECT f, t FROM (VALUES
    ('pending', 'queued'), ('pending', 'deferred'), ('pending', 'downloading'),
    ('pending', 'rejected'), ('pending', 'already_installed'), ('pending', 'canceling'),
    -- A cancel raced the terminal's first report: the report wins.
    ('canceling', 'queued'), ('canceling', 'deferred'), ('canceling', 'downloading'),
    ('canceling', 'rejected'), ('canceling', 'already_installed'),
    ('queued', 'deferred'), ('queued', 'downloading'), ('queued', 'rejected'),
    ('queued', 'already_installed'),
    ('deferred', 'deferred'), ('deferred', 'queued'), ('deferred', 'downloading'),
    ('downloading', 'downloading'), ('downloading', 'downloaded'),
    ('downloaded', 'verifying'), ('downloaded', 'downloading'),
    ('verifying', 'verified'), ('verifying', 'rejected'),
    ('verified', 'downloading'), ('verified', 'backing_up'),
    ('backing_up', 'installing'),
    ('installing', 'rebooting'), ('installing', 'rolled_back'),
    ('rebooting', 'self_testing'), ('rebooting', 'rolled_back'),
    ('self_testing', 'succeeded'), ('self_testing', 'rolled_back')
) AS forward (f, t)
UNION ALL
-- Every non-final state may fail, time out or lose its terminal.
SELECT s.state, a.t
FROM execution_states s
CROSS JOIN (VALUES ('failed'), ('timed_out'), ('unreachable')) AS a (t)
WHERE NOT s.final AND s.state <> 'unreachable'
UNION ALL
-- Cancel reaches an execution only before it starts changing the terminal.
SELECT c, 'canceled' FROM (VALUES
    ('queued'), ('deferred'), ('downloading'), ('downloaded'), ('verified'),
    ('canceling'), ('unreachable')
) AS cancelable (c)
UNION ALL
-- A terminal that comes back reports where it is, and resumes from there.
SELECT 'unreachable', s.state
FROM execution_states s
WHERE s.state NOT IN ('pending', 'unreachable', 'canceled', 'canceling');

CREATE TABLE campaigns (
    id                 bigserial PRIMARY KEY,
    name               text NOT NULL UNIQUE,
    -- The operator's intent; whether it has completed is derived from executions.
    control            text NOT NULL DEFAULT 'draft'
                       CHECK (control IN ('draft', 'running', 'paused', 'canceled')),
    current_wave       integer NOT NULL DEFAULT 0,
    success_threshold  real NOT NULL CHECK (success_threshold > 0 AND success_threshold <= 1),
    failure_threshold  real NOT NULL CHECK (failure_threshold > 0 AND failure_threshold <= 1),
    -- Bumped on every desired-state publish, so terminals can drop stale copies.
    desired_revision   bigint NOT NULL DEFAULT 0,
    paused_reason      text,
    -- Failures per wave that an operator accepted by resuming after an automatic pause;
    -- thresholds count only failures beyond them, e.g. {"1": 7}.
    acknowledged_failures  jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaign_groups (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    group_name   text NOT NULL REFERENCES groups (name),
    PRIMARY KEY (campaign_id, group_name)
);

CREATE TABLE campaign_packages (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    position     integer NOT NULL,
    package_id   bigint NOT NULL REFERENCES packages (id),
    PRIMARY KEY (campaign_id, position),
    UNIQUE (campaign_id, package_id)
);

-- Wave n lets buckets [0, bucket_hi) start; bucket_hi grows with n.
CREATE TABLE campaign_waves (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    wave         integer NOT NULL CHECK (wave >= 1),
    bucket_hi    integer NOT NULL CHECK (bucket_hi BETWEEN 1 AND 10000),
    opened_at    timestamptz,
    PRIMARY KEY (campaign_id, wave)
);

CREATE TABLE executions (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    terminal_id  text NOT NULL REFERENCES terminals (id),
    wave         integer NOT NULL,
    bucket       integer NOT NULL CHECK (bucket BETWEEN 0 AND 9999),
    state        text NOT NULL DEFAULT 'pending' REFERENCES execution_states (state),
    progress     smallint,
    stage        text,
    error_code   text,
    detail       text,
    last_seq     bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (campaign_id, terminal_id)
);
CREATE INDEX executions_progress ON executions (campaign_id, wave, state);

CREATE TABLE update_events (
    id           bigserial PRIMARY KEY,
    msg_id       text NOT NULL UNIQUE,
    terminal_id  text NOT NULL,
    campaign_id  bigint NOT NULL,
    seq          bigint NOT NULL,
    state        text NOT NULL,
    progress     smallint,
    stage        text,
    error_code   text,
    detail       text,
    device_ts    timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    -- Whether the event moved its execution (false: a repeat, or refused as illegal).
    applied      boolean NOT NULL
);
CREATE INDEX update_events_terminal ON update_events (terminal_id, seq);

CREATE TABLE heartbeats (
    terminal_id      text NOT NULL,
    received_at      timestamptz NOT NULL,
    device_ts        timestamptz NOT NULL,
    versions         jsonb NOT NULL,
    battery_pct      smallint NOT NULL,
    storage_free_mb  integer NOT NULL,
    busy             boolean NOT NULL,
    health           jsonb NOT NULL
) PARTITION BY RANGE (received_at);

-- Creates the daily partitions from yesterday to `days_ahead` days from now; idempotent.
CREATE FUNCTION fleet_ensure_heartbeat_partitions(days_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    created integer := 0;
    part text;
BEGIN
    FOR day IN SELECT generate_series(current_date - 1, current_date + days_ahead, '1 day')::date
    LOOP
        part := 'heartbeats_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF heartbeats FOR VALUES FROM (%L) TO (%L)',
                part, day::timestamptz, (day + 1)::timestamptz);
            EXECUTE format('CREATE INDEX %I ON %I (terminal_id, received_at)',
                part || '_terminal', part);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    reason       text NOT NULL,
    detail       text NOT NULL,
    -- At most the first 1 KiB of what arrived.
    payload      bytea NOT NULL
);

-- Operator actions and automatic decisions about campaigns.
CREATE TABLE campaign_log (
    id           bigserial PRIMARY KEY,
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX campaign_log_campaign ON campaign_log (campaign_id, id);

-- The rollout bucket of protocol.bucket_of, in SQL: first 8 bytes of SHA-256, unsigned,
-- modulo 10000. tests/test_protocol.py checks both against the published test vectors.
CREATE FUNCTION fleet_bucket(terminal_id text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ((h::numeric + CASE WHEN h < 0 THEN 18446744073709551616 ELSE 0 END) % 10000)::integer
    FROM (
        SELECT ('x' || encode(substring(sha256(convert_to(terminal_id, 'UTF8')) FROM 1 FOR 8),
                              'hex'))::bit(64)::bigint AS h
    ) AS digest
$$;
