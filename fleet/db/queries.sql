-- Named queries. Each block starts with "-- name: <name>" and is run by the repository
-- function of the same name. Parameters are asyncpg's $n; never string formatting.

-- name: ensure_heartbeat_partitions
-- Serialised, so replicas starting together do not race to create the same partition.
WITH serialised AS MATERIALIZED (SELECT pg_advisory_xact_lock(7207003))
SELECT fleet_ensure_heartbeat_partitions($1) FROM serialised;

-- name: upsert_terminals
INSERT INTO terminals (id, model, merchant_id, timezone, versions, attributes)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
-- Provisioning again updates what the operator owns; what the terminal reported itself
-- (versions, and a model it announced) is kept unless the operator states it.
ON CONFLICT (id) DO UPDATE
SET model = CASE WHEN excluded.model = 'unknown' THEN terminals.model ELSE excluded.model END,
    merchant_id = excluded.merchant_id, timezone = excluded.timezone,
    versions = CASE WHEN excluded.versions = '{}' THEN terminals.versions
                    ELSE excluded.versions END,
    attributes = excluded.attributes;

-- name: create_group
INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING;

-- name: assign_group
INSERT INTO group_members (group_name, terminal_id)
SELECT $1, unnest($2::text[])
ON CONFLICT DO NOTHING;

-- name: terminals_groups
SELECT terminal_id, array_agg(group_name ORDER BY group_name) AS groups
FROM group_members
WHERE terminal_id = ANY($1::text[])
GROUP BY terminal_id;

-- name: add_package
INSERT INTO packages (name, kind, version, size, sha256, compatible_models, from_versions,
                      requires)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id;

-- name: package_by_name
SELECT id, name, kind, version, size, sha256, compatible_models, from_versions, requires
FROM packages WHERE name = $1 AND version = $2;

-- name: plan_each_run
-- Ingest's statements take arrays of 1 to thousands of rows. After five runs PostgreSQL
-- may switch a prepared statement to a generic plan built for no size in particular:
-- record_events went from 40 ms to 0.5-1.3 s per 400-row round that way. For this
-- transaction only, so the setting needs nothing from the server or a pooler.
SET LOCAL plan_cache_mode = force_custom_plan;

-- name: record_events
-- record_event for many events in one statement: the same rules, row by row. The inputs
-- are arrays aligned by position and must name distinct terminals (the caller splits a
-- batch into rounds: a terminal's first event, then its second, ...), so that no row is
-- updated twice and each event sees the effect of the one before it. $11 is the
-- controller's clock. One result row per input, in input order.
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[],
                $6::smallint[], $7::text[], $8::text[], $9::text[], $10::float8[],
                $12::integer[], $13::text[])
         WITH ORDINALITY AS i (msg_id, terminal_id, campaign_id, seq, state, progress, stage,
                               error_code, detail, device_ts, attempt, package, ord)
), known AS (
    SELECT i.ord, e.attempt - e.postpones AS tries, e.admitted_at, c.policy,
           c.control IN ('running', 'paused') AS live,
           coalesce((c.policy -> 'health_gate' ->> 'enabled')::boolean, false) AS gated
    FROM input i
    JOIN executions e ON e.campaign_id = i.campaign_id AND e.terminal_id = i.terminal_id
    JOIN campaigns c ON c.id = e.campaign_id
), fresh AS (
    SELECT k.ord
    FROM known k JOIN input i ON i.ord = k.ord
    WHERE NOT EXISTS (SELECT 1 FROM update_events u WHERE u.msg_id = i.msg_id)
), decided AS (
    SELECT k.ord,
           CASE
               WHEN i.state IN ('failed', 'rolled_back') AND k.live
                    AND i.stage IN ('download', 'verify', 'install', 'self_test')
                    AND k.tries <= coalesce((k.policy -> 'retries' ->> i.stage)::int, 0)
                   THEN 'retry_wait'
               WHEN k.gated
                    AND (i.state = 'succeeded' OR i.state = 'already_installed' AND k.tries > 1)
                   THEN 'health_check'
               WHEN i.state = 'deferred' AND i.stage = 'postponed' AND NOT k.live
                   THEN 'canceled'
               ELSE i.state
           END AS state,
           (i.state = 'deferred' AND i.stage = 'postponed' AND k.admitted_at IS NOT NULL
            AND k.live) AS postponed,
           NOT k.live AS stopped,
           k.policy, k.tries
    FROM known k JOIN input i ON i.ord = k.ord
), moved AS (
    UPDATE executions e
    SET state = d.state, progress = i.progress, stage = i.stage, error_code = i.error_code,
        detail = i.detail, package = i.package, last_seq = i.seq,
        updated_at = $11::timestamptz, resends = 0,
        finished_at = CASE WHEN ns.final THEN $11::timestamptz END,
        phase_since = CASE
            WHEN ns.phase IS DISTINCT FROM (SELECT phase FROM execution_states WHERE state = e.state)
                THEN $11::timestamptz
            ELSE e.phase_since END,
        admitted_at = CASE WHEN d.state = 'retry_wait' OR d.postponed THEN NULL
                           ELSE coalesce(e.admitted_at, $11::timestamptz) END,
        next_attempt_at = CASE
            WHEN d.state = 'retry_wait' THEN $11::timestamptz + fleet_backoff(d.policy, d.tries)
            WHEN d.postponed
                THEN $11::timestamptz + make_interval(secs => (d.policy ->> 'postpone_delay_s')::float8)
            ELSE e.next_attempt_at END,
        postpones = e.postpones + d.postponed::int,
        cancel_sent_at = CASE WHEN d.stopped THEN NULL ELSE e.cancel_sent_at END
    FROM decided d
    JOIN input i ON i.ord = d.ord
    JOIN execution_states ns ON ns.state = d.state
    -- Everything read from the execution's own row is a subquery or a column of `e`, not
    -- a joined row: when the runner updates the row meanwhile, PostgreSQL re-checks this
    -- WHERE against the new version, and a joined copy of the old state would fail that
    -- check and drop the report as "not applied".
    WHERE e.campaign_id = i.campaign_id AND e.terminal_id = i.terminal_id
      AND d.ord IN (SELECT ord FROM fresh)
      AND i.seq > e.last_seq
      AND (i.attempt IS NULL OR i.attempt >= e.attempt)
      AND NOT (e.state = d.state AND e.progress IS NOT DISTINCT FROM i.progress)
      AND EXISTS (
          SELECT 1 FROM state_transitions t WHERE t.from_state = e.state AND t.to_state = d.state)
    RETURNING d.ord, e.state
), seqs AS (
    UPDATE terminals t
    SET seq_gaps = t.seq_gaps + (t.last_event_seq > 0 AND i.seq > t.last_event_seq + 1)::int,
        last_event_seq = greatest(t.last_event_seq, i.seq)
    FROM input i
    WHERE t.id = i.terminal_id AND i.ord IN (SELECT ord FROM fresh)
    RETURNING 1
), ins AS (
    INSERT INTO update_events (msg_id, terminal_id, campaign_id, seq, state, progress, stage,
                               error_code, detail, device_ts, applied, attempt, package,
                               received_at)
    SELECT i.msg_id, i.terminal_id, i.campaign_id, i.seq, i.state, i.progress, i.stage,
           i.error_code, i.detail, to_timestamp(i.device_ts),
           i.ord IN (SELECT ord FROM moved), i.attempt, i.package, $11::timestamptz
    FROM input i
    WHERE i.ord IN (SELECT ord FROM fresh)
    ON CONFLICT (msg_id) DO NOTHING
    RETURNING msg_id
)
SELECT i.ord,
       i.ord IN (SELECT ord FROM known) AS known,
       i.msg_id IN (SELECT msg_id FROM ins) AS inserted,
       m.ord IS NOT NULL AS moved,
       m.state AS new_state,
       (SELECT count(*) FROM seqs)::int AS seq_rows
FROM input i LEFT JOIN moved m ON m.ord = i.ord
ORDER BY i.ord;

-- name: touch_terminals
-- Coalesced last-seen: one row per terminal per batch, newest heartbeat wins. heartbeat_at
-- ($5) is on the controller's clock, for the health gate.
UPDATE terminals t
SET last_seen = greatest(t.last_seen, hb.seen), versions = hb.versions, health = hb.health,
    heartbeat_at = $5, online = true
FROM unnest($1::text[], $2::timestamptz[], $3::jsonb[], $4::jsonb[])
     AS hb (id, seen, versions, health)
WHERE t.id = hb.id
RETURNING t.id;

-- name: set_presence
UPDATE terminals t
SET online = p.online,
    last_seen = CASE WHEN p.fresh THEN greatest(t.last_seen, now()) ELSE t.last_seen END
FROM unnest($1::text[], $2::boolean[], $3::boolean[]) AS p (id, online, fresh)
WHERE t.id = p.id
RETURNING t.id;

-- name: record_hello
UPDATE terminals
SET model = $2, versions = $3, merchant_id = $4, timezone = $5,
    -- The terminal's own attributes update what provisioning set (e.g. region) key by key.
    attributes = attributes || $6,
    boot_id = $7, online = true, last_seen = now()
WHERE id = $1
RETURNING ARRAY(
    SELECT group_name FROM group_members WHERE terminal_id = $1 ORDER BY group_name
) AS groups;

-- name: add_dead_letters
INSERT INTO dead_letters (topic, reason, detail, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]);

-- name: trim_dead_letters
DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - $1;

-- name: dead_letter_counts
SELECT reason, count(*)::bigint AS n FROM dead_letters GROUP BY reason ORDER BY reason;


-- name: create_campaign
INSERT INTO campaigns (name, success_threshold, failure_threshold, policy, target, rollback_of)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id;

-- name: add_campaign_groups
INSERT INTO campaign_groups (campaign_id, group_name) SELECT $1, unnest($2::text[]);

-- name: add_campaign_packages
INSERT INTO campaign_packages (campaign_id, position, package_id)
SELECT $1, p.position, p.package_id
FROM unnest($2::bigint[]) WITH ORDINALITY AS p (package_id, position);

-- name: add_campaign_waves
-- Bucket bounds of waves by count are set at start, from the terminals then targeted.
INSERT INTO campaign_waves (campaign_id, wave, bucket_hi, soak_s)
SELECT $1, w.wave, w.bucket_hi, w.soak_s
FROM unnest($2::integer[], $3::real[]) WITH ORDINALITY AS w (bucket_hi, soak_s, wave);

-- name: set_wave_bounds
UPDATE campaign_waves w SET bucket_hi = b.bucket_hi
FROM unnest($2::integer[]) WITH ORDINALITY AS b (bucket_hi, wave)
WHERE w.campaign_id = $1 AND w.wave = b.wave;

-- name: campaign_by_name
SELECT id FROM campaigns WHERE name = $1;

-- name: campaign_packages
SELECT p.id, p.name, p.kind, p.version, p.size, p.sha256, p.compatible_models AS models,
       p.from_versions, p.requires
FROM campaign_packages cp JOIN packages p ON p.id = cp.package_id
WHERE cp.campaign_id = $1
ORDER BY cp.position;

-- name: campaign_waves
SELECT wave, bucket_hi, soak_s, opened_at FROM campaign_waves WHERE campaign_id = $1 ORDER BY wave;

-- name: mark_started
UPDATE campaigns
SET control = 'running', current_wave = 1, started_at = $2::timestamptz, updated_at = $2::timestamptz,
    desired_revision = desired_revision + 1
WHERE id = $1 AND control = 'draft'
RETURNING id;

-- name: candidates
-- Members of the campaign's groups that have neither an execution nor an exclusion yet,
-- with what targeting needs; $2 is the source campaign of a rollback (or NULL). A terminal
-- whose model nobody has told us yet (no hello, not provisioned with one) is not known.
SELECT t.id, t.model, t.merchant_id, t.timezone, t.versions, t.attributes,
       fleet_bucket(t.id) AS bucket,
       (t.boot_id IS NOT NULL OR t.model <> 'unknown') AS known,
       ($2::bigint IS NULL OR EXISTS (
           SELECT 1 FROM executions src WHERE src.campaign_id = $2 AND src.terminal_id = t.id
       )) AS in_source
FROM terminals t
WHERE t.id IN (
    SELECT gm.terminal_id
    FROM campaign_groups cg JOIN group_members gm ON gm.group_name = cg.group_name
    WHERE cg.campaign_id = $1)
  AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.campaign_id = $1 AND e.terminal_id = t.id)
  AND NOT EXISTS (
      SELECT 1 FROM campaign_exclusions x WHERE x.campaign_id = $1 AND x.terminal_id = t.id)
ORDER BY t.id;

-- name: add_executions
INSERT INTO executions (campaign_id, terminal_id, wave, bucket, updated_at)
SELECT $1, x.terminal_id, x.wave, x.bucket, $5::timestamptz
FROM unnest($2::text[], $3::integer[], $4::integer[]) AS x (terminal_id, wave, bucket)
ON CONFLICT DO NOTHING;

-- name: add_exclusions
INSERT INTO campaign_exclusions (campaign_id, terminal_id, reason, detail, at)
SELECT $1, x.terminal_id, x.reason, x.detail, $5::timestamptz
FROM unnest($2::text[], $3::text[], $4::text[]) AS x (terminal_id, reason, detail)
ON CONFLICT DO NOTHING;

-- name: exclude_unstarted_of_model
-- An operator takes a model out: executions never attempted leave the campaign as
-- exclusions; those the controller holds after an attempt (a retry, a postponement) end
-- canceled; one whose start was sent but not answered goes through canceling (the runner
-- tells the terminal).
WITH held AS (
    UPDATE executions e
    SET state = 'canceling', updated_at = $3::timestamptz
    FROM terminals t
    WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND t.model = $2
      AND e.admitted_at IS NOT NULL AND e.state = 'pending'
), tried AS (
    -- Attempted before (waiting for a retry or after a postponement): it keeps its history.
    UPDATE executions e
    SET state = 'canceled', updated_at = $3::timestamptz, finished_at = $3::timestamptz
    FROM terminals t
    WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND t.model = $2
      AND e.admitted_at IS NULL AND e.attempt > 0
      AND e.state IN ('retry_wait', 'deferred', 'unreachable')
), gone AS (
    DELETE FROM executions e
    USING terminals t
    WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND t.model = $2
      AND e.admitted_at IS NULL AND e.attempt = 0 AND e.state IN ('pending', 'unreachable')
    RETURNING e.terminal_id
)
INSERT INTO campaign_exclusions (campaign_id, terminal_id, reason, detail, at)
SELECT $1, terminal_id, 'operator', 'model ' || $2 || ' excluded by an operator', $3::timestamptz FROM gone
ON CONFLICT DO NOTHING
RETURNING terminal_id;

-- name: set_target
UPDATE campaigns SET target = $2 WHERE id = $1;

-- name: exclusion_counts
SELECT reason, count(*)::int AS n FROM campaign_exclusions WHERE campaign_id = $1
GROUP BY reason ORDER BY reason;

-- name: exclusions
SELECT terminal_id, reason, detail FROM campaign_exclusions WHERE campaign_id = $1
ORDER BY reason, terminal_id LIMIT $2;

-- name: set_control
-- Operator intent; `from_controls` lists the controls it may change from.
UPDATE campaigns
SET control = $2, paused_reason = $3, updated_at = $5::timestamptz,
    desired_revision = desired_revision + 1
WHERE id = $1 AND control = ANY($4::text[])
RETURNING desired_revision;

-- name: cancel_unstarted
-- Cancel or abort: what the controller still holds ends canceled now; an admitted
-- execution that has not reported may have its start in flight, so it goes through
-- canceling. Terminals already under way get a cancel command from the runner.
UPDATE executions
SET state = CASE WHEN admitted_at IS NULL THEN 'canceled' ELSE 'canceling' END,
    updated_at = $2::timestamptz,
    finished_at = CASE WHEN admitted_at IS NULL THEN $2::timestamptz END
WHERE campaign_id = $1
  AND (state IN ('retry_wait', 'deferred', 'unreachable') AND admitted_at IS NULL
       OR state = 'pending');

-- name: cancels_to_send
-- Terminals to tell to stop, once each: a canceling execution's (its start may be in
-- flight); with $3, every one of a canceled or aborted campaign still before its install.
UPDATE executions
SET cancel_sent_at = $2::timestamptz
WHERE campaign_id = $1 AND cancel_sent_at IS NULL AND admitted_at IS NOT NULL
  AND (state = 'canceling'
       OR ($3 AND state IN ('queued', 'deferred', 'downloading', 'downloaded', 'verifying',
                            'verified', 'unreachable')))
RETURNING terminal_id;

-- name: finish_canceling
-- A terminal that had not reported within the grace period never saw its start.
UPDATE executions
SET state = 'canceled', updated_at = $3::timestamptz, finished_at = $3::timestamptz
WHERE campaign_id = $1 AND state = 'canceling' AND updated_at < $3::timestamptz - make_interval(secs => $2)
RETURNING terminal_id;

-- name: expire_deadlines
-- Executions the terminal holds whose phase has outlasted its deadline end timed_out, or
-- wait for a retry when the campaign gives timeouts retries; unreachable ones time out
-- after deadlines.unreachable_s. Through the transition table like every other change.
WITH c AS (
    SELECT policy, control IN ('running', 'paused') AS live, control FROM campaigns WHERE id = $1
), due AS (
    SELECT e.terminal_id, e.state, coalesce(s.phase, e.state) AS phase,
           CASE WHEN e.attempt - e.postpones <= (c.policy -> 'retries' ->> 'timeout')::int
                     AND e.state <> 'unreachable' AND c.live
                THEN 'retry_wait' ELSE 'timed_out' END AS outcome
    FROM executions e JOIN execution_states s ON s.state = e.state, c
    WHERE e.campaign_id = $1 AND e.admitted_at IS NOT NULL
      AND (s.phase IS NOT NULL OR e.state = 'unreachable')
      -- A paused campaign holds its terminals before they start: not their fault.
      AND (s.phase IS DISTINCT FROM 'start' OR c.control <> 'paused')
      AND e.phase_since < $2::timestamptz - make_interval(
          secs => (c.policy -> 'deadlines' ->> (coalesce(s.phase, e.state) || '_s'))::float8)
)
UPDATE executions e
SET state = d.outcome, stage = d.phase, error_code = 'DEADLINE_EXCEEDED',
    detail = format('%s phase over its deadline (in %s)', d.phase, d.state),
    updated_at = $2::timestamptz, phase_since = $2::timestamptz, admitted_at = NULL,
    finished_at = CASE WHEN d.outcome = 'timed_out' THEN $2::timestamptz END,
    next_attempt_at = CASE WHEN d.outcome = 'retry_wait'
                           THEN $2::timestamptz + fleet_backoff(c.policy, e.attempt - e.postpones)
                      END
FROM due d, c
WHERE e.campaign_id = $1 AND e.terminal_id = d.terminal_id
  -- Re-checked on the row as it is now: a report committed meanwhile wins.
  AND e.state = d.state
  AND EXISTS (
      SELECT 1 FROM state_transitions t WHERE t.from_state = e.state AND t.to_state = d.outcome)
RETURNING e.terminal_id, e.state, d.phase;

-- name: mark_unreachable
-- A terminal that went offline while it held an update (before it rebooted) is
-- unreachable, not failed; it resumes from wherever it reports when it is back. One that
-- is offline when its wave is open ($3: the current wave) is unreachable too, so the
-- operator sees it and its deadline runs; it is admitted when it returns.
UPDATE executions e
SET state = 'unreachable', stage = e.state, updated_at = $2::timestamptz,
    phase_since = $2::timestamptz, resends = 0
FROM terminals t, execution_states s
WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND NOT t.online AND s.state = e.state
  AND (e.admitted_at IS NOT NULL AND s.phase IN ('start', 'download', 'install')
       OR e.admitted_at IS NULL AND e.state IN ('pending', 'retry_wait') AND e.wave <= $3)
  AND EXISTS (SELECT 1 FROM state_transitions st
              WHERE st.from_state = e.state AND st.to_state = 'unreachable')
RETURNING e.terminal_id;

-- name: back_online
-- A never-admitted terminal that was unreachable is back: it waits for admission again.
UPDATE executions e
SET state = 'pending', updated_at = $2::timestamptz, phase_since = NULL
FROM terminals t
WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND t.online
  AND e.state = 'unreachable' AND e.admitted_at IS NULL
RETURNING e.terminal_id;

-- name: judge_health
-- The health gate: an execution in health_check passes once its terminal heartbeats on
-- every target version (so after its reboot), no earlier than the success report, with
-- an error rate no worse than its baseline plus the tolerance; a worse rate fails it (or
-- retries, if health retries are given). With no baseline or no rate reported, the
-- versions alone decide. Without such a heartbeat it waits; the health deadline ends it.
WITH c AS (
    SELECT policy, control IN ('running', 'paused') AS live FROM campaigns WHERE id = $1
), target AS (
    SELECT jsonb_object_agg(p.name, p.version) AS versions
    FROM campaign_packages cp JOIN packages p ON p.id = cp.package_id
    WHERE cp.campaign_id = $1
), judged AS (
    SELECT e.terminal_id,
           fleet_health_number(t.health, 'txn_error_rate') AS rate,
           coalesce(fleet_health_number(t.health, 'txn_error_rate')
                        <= e.baseline_error_rate
                           + (c.policy -> 'health_gate' ->> 'tolerance')::float8 + 1e-9,
                    true) AS healthy,
           e.attempt - e.postpones <= (c.policy -> 'retries' ->> 'health')::int AND c.live
               AS retry
    FROM executions e JOIN terminals t ON t.id = e.terminal_id, c, target
    WHERE e.campaign_id = $1 AND e.state = 'health_check'
      AND t.heartbeat_at >= e.phase_since AND t.versions @> target.versions
)
UPDATE executions e
SET state = CASE WHEN j.healthy THEN 'succeeded' WHEN j.retry THEN 'retry_wait' ELSE 'failed' END,
    stage = CASE WHEN j.healthy THEN e.stage ELSE 'health' END,
    error_code = CASE WHEN j.healthy THEN NULL ELSE 'HEALTH_DEGRADED' END,
    detail = format('txn error rate %s, baseline %s', coalesce(j.rate::text, 'none'),
                    coalesce(e.baseline_error_rate::text, 'none')),
    updated_at = $2::timestamptz, phase_since = $2::timestamptz,
    finished_at = CASE WHEN j.healthy OR NOT j.retry THEN $2::timestamptz END,
    admitted_at = CASE WHEN j.healthy OR NOT j.retry THEN e.admitted_at END,
    next_attempt_at = CASE WHEN NOT j.healthy AND j.retry
                           THEN $2::timestamptz + fleet_backoff(c.policy, e.attempt - e.postpones)
                      END
FROM judged j, c
WHERE e.campaign_id = $1 AND e.terminal_id = j.terminal_id AND e.state = 'health_check'
RETURNING e.terminal_id, e.state, j.rate;

-- name: resends_due
-- The reconciler: a start sent to an online terminal that has not answered, or to an
-- unreachable terminal that is back online without reporting, is sent again (same
-- attempt: the terminal re-reports a finished attempt and ignores a running one).
UPDATE executions e
SET resends = e.resends + 1, updated_at = $2::timestamptz
FROM terminals t
WHERE e.campaign_id = $1 AND t.id = e.terminal_id AND t.online
  AND e.admitted_at IS NOT NULL
  AND e.state IN ('pending', 'unreachable')
  AND EXISTS (SELECT 1 FROM campaigns c WHERE c.id = $1 AND c.control IN ('running', 'paused'))
  AND e.updated_at < $2::timestamptz - make_interval(secs => $3) AND e.resends < $4
RETURNING e.terminal_id, e.attempt, e.postpones;

-- name: admission_load
-- Starts in the last minute (rate limit) and executions downloading or about to (cap).
SELECT count(*) FILTER (WHERE admitted_at > $2::timestamptz - interval '60 seconds')::int AS recent,
       count(*) FILTER (WHERE admitted_at IS NOT NULL AND state IN (
           'pending', 'queued', 'deferred', 'downloading', 'downloaded', 'verifying'))::int
           AS downloading
FROM executions WHERE campaign_id = $1;

-- name: admissible_timezones
-- Time zones of the terminals that could start now; the runner decides which are inside
-- the maintenance window (fleet/policy.py), in Python, like the plan does.
SELECT DISTINCT t.timezone
FROM executions e JOIN terminals t ON t.id = e.terminal_id
WHERE e.campaign_id = $1 AND e.wave <= $3 AND e.admitted_at IS NULL AND t.online
  AND (e.state IN ('pending', 'unreachable')
       OR (e.state IN ('retry_wait', 'deferred') AND e.next_attempt_at <= $2::timestamptz));

-- name: admit
-- Admit up to $5 terminals, oldest wave and lowest bucket first, online and in a time
-- zone whose window is open ($4, or every zone when $4 is NULL).
WITH picked AS (
    SELECT e.terminal_id
    FROM executions e JOIN terminals t ON t.id = e.terminal_id
    WHERE e.campaign_id = $1 AND e.wave <= $3 AND e.admitted_at IS NULL AND t.online
      AND (e.state IN ('pending', 'unreachable')
           OR (e.state IN ('retry_wait', 'deferred') AND e.next_attempt_at <= $2::timestamptz))
      AND ($4::text[] IS NULL OR t.timezone = ANY($4::text[]))
      -- A pause or cancel committed during this tick stops admission here.
      AND EXISTS (SELECT 1 FROM campaigns c WHERE c.id = $1 AND c.control = 'running')
    ORDER BY e.wave, e.bucket, e.terminal_id
    LIMIT $5
    FOR UPDATE OF e SKIP LOCKED
)
UPDATE executions e
SET state = 'pending', admitted_at = $2::timestamptz, attempt = e.attempt + 1, phase_since = $2::timestamptz,
    updated_at = $2::timestamptz, resends = 0, cancel_sent_at = NULL, progress = NULL,
    next_attempt_at = NULL,
    versions_before = coalesce(e.versions_before, t.versions),
    baseline_error_rate = coalesce(e.baseline_error_rate,
                                   fleet_health_number(t.health, 'txn_error_rate'))
FROM picked p, terminals t
WHERE e.campaign_id = $1 AND e.terminal_id = p.terminal_id AND t.id = e.terminal_id
  AND (e.state = 'pending' OR EXISTS (
      SELECT 1 FROM state_transitions st WHERE st.from_state = e.state AND st.to_state = 'pending'))
RETURNING e.terminal_id, e.attempt, e.postpones;

-- name: overlapping_campaigns
-- Other campaigns, still under way, that target one of this campaign's groups.
SELECT DISTINCT c.id, c.name
FROM campaign_groups mine
JOIN campaign_groups theirs ON theirs.group_name = mine.group_name
JOIN campaigns c ON c.id = theirs.campaign_id
WHERE mine.campaign_id = $1 AND c.id <> $1 AND c.control IN ('running', 'paused')
  AND EXISTS (
      SELECT 1 FROM executions e JOIN execution_states s ON s.state = e.state
      WHERE e.campaign_id = c.id AND NOT s.final);

-- name: restart_start_phase
-- On resume, terminals held at the start by the pause get their start deadline afresh.
UPDATE executions e
SET phase_since = $2::timestamptz
FROM execution_states s
WHERE e.campaign_id = $1 AND s.state = e.state AND s.phase = 'start'
  AND e.admitted_at IS NOT NULL;

-- name: acknowledge_failures
UPDATE campaigns SET acknowledged_failures = $2 WHERE id = $1;

-- name: mark_wave_ready
UPDATE campaigns SET wave_ready_at = $2::timestamptz WHERE id = $1 AND wave_ready_at IS NULL;

-- name: open_wave
WITH opened AS (
    UPDATE campaigns
    SET current_wave = $2, updated_at = $3::timestamptz, desired_revision = desired_revision + 1,
        wave_ready_at = NULL
    WHERE id = $1 AND current_wave = $2 - 1 AND control = 'running'
    RETURNING desired_revision
), marked AS (
    UPDATE campaign_waves SET opened_at = $3::timestamptz
    WHERE campaign_id = $1 AND wave = $2 AND EXISTS (SELECT 1 FROM opened)
)
SELECT desired_revision FROM opened;

-- name: live_campaigns
-- Every started campaign; `settled` ones (every wave open, every execution final, no
-- member still awaiting its first hello) have nothing left to decide, and no longer
-- enroll joiners.
SELECT id, name, control, current_wave, desired_revision, acknowledged_failures, policy,
       target, wave_ready_at, wave_count,
       current_wave >= wave_count AND NOT EXISTS (
           SELECT 1 FROM executions e JOIN execution_states s ON s.state = e.state
           WHERE e.campaign_id = c.id AND NOT s.final)
       AND NOT EXISTS (
           SELECT 1 FROM campaign_groups cg
           JOIN group_members gm ON gm.group_name = cg.group_name
           JOIN terminals t ON t.id = gm.terminal_id
           WHERE cg.campaign_id = c.id AND t.boot_id IS NULL AND t.model = 'unknown'
             AND NOT EXISTS (SELECT 1 FROM executions e
                             WHERE e.campaign_id = c.id AND e.terminal_id = t.id)
             AND NOT EXISTS (SELECT 1 FROM campaign_exclusions x
                             WHERE x.campaign_id = c.id AND x.terminal_id = t.id))
       AS settled
FROM (SELECT c.*,
             (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)::int
                 AS wave_count
      FROM campaigns c WHERE c.control <> 'draft') c
ORDER BY id;

-- name: campaign
SELECT id, name, control, current_wave, desired_revision, paused_reason, created_at,
       started_at, policy, target, rollback_of, wave_ready_at,
       (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)::int AS wave_count
FROM campaigns c
WHERE id = $1;

-- name: campaign_groups
SELECT group_name FROM campaign_groups WHERE campaign_id = $1 ORDER BY group_name;

-- name: campaign_desired
-- Everything a desired-state message needs: ordered packages and the groups it speaks
-- for: those whose newest started campaign is this one (a group has one retained desired
-- state, so an older campaign must not overwrite a newer one's).
SELECT c.id, c.control, c.desired_revision,
       ARRAY(SELECT g.group_name FROM campaign_groups g
             WHERE g.campaign_id = c.id
               AND NOT EXISTS (
                   SELECT 1 FROM campaign_groups newer JOIN campaigns n ON n.id = newer.campaign_id
                   WHERE newer.group_name = g.group_name AND n.id > c.id AND n.control <> 'draft')
             ORDER BY g.group_name) AS groups,
       (SELECT jsonb_agg(jsonb_build_object(
                   'name', p.name, 'kind', p.kind, 'version', p.version, 'size', p.size,
                   'sha256', p.sha256, 'models', p.compatible_models)
               ORDER BY cp.position)
        FROM campaign_packages cp JOIN packages p ON p.id = cp.package_id
        WHERE cp.campaign_id = c.id) AS packages
FROM campaigns c
WHERE c.id = $1;

-- name: wave_counts
-- Executions counted by (wave, state) first and joined to the waves after: a third of
-- the time of grouping the joined rows by the waves' columns (26 vs 86 ms at 100,000).
SELECT w.wave, w.bucket_hi, w.opened_at, c.state, coalesce(c.n, 0)::int AS n
FROM campaign_waves w
LEFT JOIN (SELECT wave, state, count(*) AS n FROM executions WHERE campaign_id = $1
           GROUP BY wave, state) c ON c.wave = w.wave
WHERE w.campaign_id = $1
ORDER BY w.wave, c.state;

-- name: audit_lock
-- Serialises appends; the lock lasts until the transaction ends. The tip must be read by
-- a later statement: a statement's snapshot predates the wait for the lock.
SELECT pg_advisory_xact_lock(7207001);

-- name: audit_head
SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1;

-- name: audit_insert
INSERT INTO audit_log (id, at, actor, action, campaign_id, detail, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: audit_page
SELECT id, at, actor, action, campaign_id, detail, prev_hash, hash
FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2;

-- name: campaign_audit
SELECT id, at, actor, action, detail FROM audit_log WHERE campaign_id = $1 ORDER BY id;

-- name: execution_states
SELECT terminal_id, state, stage, error_code FROM executions WHERE campaign_id = $1;

-- name: executions
SELECT terminal_id, wave, state, attempt, stage, error_code, detail, package, postpones,
       admitted_at, phase_since, next_attempt_at, finished_at
FROM executions WHERE campaign_id = $1 ORDER BY terminal_id;

-- name: plan_terminals
-- Per wave and time zone, executions not yet final: what the plan's ETA still has to
-- schedule (those under way are planned as if starting now: a little pessimistic).
SELECT e.wave, t.timezone, count(*)::int AS n
FROM executions e JOIN terminals t ON t.id = e.terminal_id
JOIN execution_states s ON s.state = e.state
WHERE e.campaign_id = $1 AND NOT s.final
GROUP BY e.wave, t.timezone;

-- name: previous_versions
-- What the terminals of a campaign ran before it, per bundle package: the versions a
-- rollback campaign goes back to.
SELECT p.name, e.versions_before ->> p.name AS version, count(*)::int AS n
FROM executions e
JOIN campaign_packages cp ON cp.campaign_id = e.campaign_id
JOIN packages p ON p.id = cp.package_id
WHERE e.campaign_id = $1 AND e.versions_before ? p.name
GROUP BY p.name, e.versions_before ->> p.name
ORDER BY p.name, n DESC;

-- ---------------------------------------------------------------------------------------
-- The REST API's reads and its tokens.

-- name: api_terminals
-- One page of terminals in id order after a cursor, filtered; a NULL filter matches all.
-- `version` filters on one package: $5 is its name, $6 its version.
SELECT t.id, t.model, t.merchant_id, t.timezone, t.versions, t.online, t.last_seen,
       t.created_at,
       coalesce((SELECT array_agg(gm.group_name ORDER BY gm.group_name)
                 FROM group_members gm WHERE gm.terminal_id = t.id), '{}') AS groups
FROM terminals t
WHERE t.id > $1
  AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM group_members gm
                                   WHERE gm.terminal_id = t.id AND gm.group_name = $2))
  AND ($3::text IS NULL OR t.model = $3)
  AND ($4::boolean IS NULL OR t.online = $4)
  AND ($5::text IS NULL OR t.versions ->> $5 = $6::text)
  AND ($7::text IS NULL OR t.merchant_id = $7)
ORDER BY t.id
LIMIT $8;

-- name: api_terminal
SELECT t.id, t.model, t.merchant_id, t.timezone, t.versions, t.attributes, t.online,
       t.last_seen, t.boot_id, t.last_event_seq, t.seq_gaps, t.created_at,
       coalesce((SELECT array_agg(gm.group_name ORDER BY gm.group_name)
                 FROM group_members gm WHERE gm.terminal_id = t.id), '{}') AS groups
FROM terminals t WHERE t.id = $1;

-- name: api_terminal_executions
-- A terminal's update history: one row per campaign it took part in, newest first.
SELECT e.campaign_id, c.name AS campaign_name, e.wave, e.state, e.progress, e.stage,
       e.error_code, e.detail, e.updated_at, e.finished_at
FROM executions e JOIN campaigns c ON c.id = e.campaign_id
WHERE e.terminal_id = $1
ORDER BY e.updated_at DESC, e.campaign_id DESC
LIMIT $2;

-- name: api_terminal_events
-- The newest state events a terminal reported, applied or not.
SELECT campaign_id, seq, state, progress, stage, error_code, detail, device_ts,
       received_at, applied
FROM update_events WHERE terminal_id = $1
ORDER BY seq DESC, id DESC
LIMIT $2;

-- name: api_groups
SELECT g.name, g.created_at,
       (SELECT count(*) FROM group_members gm WHERE gm.group_name = g.name)::int AS members
FROM groups g ORDER BY g.name;

-- name: api_group
SELECT g.name, g.created_at,
       (SELECT count(*) FROM group_members gm WHERE gm.group_name = g.name)::int AS members
FROM groups g WHERE g.name = $1;

-- name: api_known_terminals
SELECT id FROM terminals WHERE id = any($1::text[]);

-- name: api_packages
SELECT p.id, p.name, p.kind, p.version, p.size, p.sha256, p.compatible_models,
       p.created_at
FROM packages p
WHERE ($1::text IS NULL OR p.name = $1)
ORDER BY p.name, p.id;

-- name: api_package
SELECT p.id, p.name, p.kind, p.version, p.size, p.sha256, p.compatible_models,
       p.created_at
FROM packages p WHERE p.id = $1;

-- name: api_campaigns
-- Campaigns newest first, with their executions counted by whether they are final.
SELECT c.id, c.name, c.control, c.current_wave, c.paused_reason, c.created_at,
       c.started_at, c.rollback_of,
       (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)::int AS wave_count,
       x.executions, x.final
FROM (SELECT * FROM campaigns
      WHERE id < $1 AND ($2::text IS NULL OR control = $2)
      ORDER BY id DESC LIMIT $3) c
-- Counted per campaign of the page only, by state from the (campaign_id, state) index.
CROSS JOIN LATERAL (
    SELECT coalesce(sum(n), 0)::int AS executions,
           coalesce(sum(n) FILTER (WHERE s.final), 0)::int AS final
    FROM (SELECT state, count(*) AS n FROM executions e
          WHERE e.campaign_id = c.id GROUP BY state) by_state
    JOIN execution_states s USING (state)) x
ORDER BY c.id DESC;

-- name: api_audit
-- Audit entries after a cursor, optionally of one campaign.
SELECT id, at, actor, action, campaign_id, detail, hash
FROM audit_log
WHERE id > $1 AND ($2::bigint IS NULL OR campaign_id = $2)
ORDER BY id LIMIT $3;

-- name: token_add
INSERT INTO api_tokens (name, role, token_hash, created_by, created_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, name, role, created_at, created_by, revoked_at;

-- name: token_by_hash
SELECT id, name, role FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL;

-- name: tokens
SELECT id, name, role, created_at, created_by, revoked_at FROM api_tokens ORDER BY id;

-- name: token_revoke
UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL
RETURNING id, name, role;

-- name: api_dead_letters
-- Refused terminal messages, oldest first after a cursor; the payload as stored (≤ 1 KiB).
SELECT id, received_at, topic, reason, detail, payload
FROM dead_letters WHERE id > $1 AND ($2::text IS NULL OR reason = $2)
ORDER BY id LIMIT $3;
-- name: mark_completed
-- A running campaign with nothing left to do is recorded completed once, even with several
-- runners: the caller audits `campaign_completed` only when this returns a row.
UPDATE campaigns SET completed_at = $2
WHERE id = $1 AND control = 'running' AND completed_at IS NULL
RETURNING id;

-- name: add_webhook_endpoint
-- Delivery starts after audit entry $6, or after the current head when $6 is NULL.
INSERT INTO webhook_endpoints (url, secret, events, actions, created_at, created_by,
                               delivered_through)
VALUES ($1, $2, $3, $4, $5, $7, coalesce($6, (SELECT max(id) FROM audit_log), 0))
RETURNING id;

-- name: webhook_endpoints
-- Never the secret. `pending`: subscribed entries not yet delivered.
SELECT e.id, e.url, e.events, e.created_at, e.created_by, e.delivered_through, e.attempts,
       e.last_error, e.failing_since, e.next_attempt_at, e.last_delivered_at, e.removed_at,
       (SELECT count(*) FROM audit_log a
        WHERE a.id > e.delivered_through AND a.action = ANY(e.actions))::int AS pending
FROM webhook_endpoints e
WHERE (e.removed_at IS NULL OR $1) AND ($2::bigint IS NULL OR e.id = $2)
ORDER BY e.id;

-- name: remove_webhook_endpoint
-- The secret is blanked: nothing is signed with it again.
UPDATE webhook_endpoints
SET removed_at = $2, secret = '', lease = NULL, leased_until = NULL
WHERE id = $1 AND removed_at IS NULL
RETURNING url;

-- name: skip_idle_webhooks
-- Endpoints with nothing to send move their cursor to the audit head, so the outbox
-- queries never rescan entries they do not subscribe to. Leased and failing ones keep
-- theirs; a head read here is committed with everything before it (appends are serial).
UPDATE webhook_endpoints e SET delivered_through = h.head
FROM (SELECT max(id) AS head FROM audit_log) h
WHERE e.removed_at IS NULL AND e.attempts = 0 AND e.delivered_through < h.head
  AND (e.leased_until IS NULL OR e.leased_until < now())
  AND NOT EXISTS (SELECT 1 FROM audit_log a
                  WHERE a.id > e.delivered_through AND a.id <= h.head
                    AND a.action = ANY(e.actions));

-- name: claim_webhook_endpoints
-- Lease up to $1 endpoints that are due and have an event to send, for $2 seconds, under
-- token $3. SKIP LOCKED plus the lease: each endpoint has one delivery loop at a time,
-- whichever controller runs it.
UPDATE webhook_endpoints e
SET leased_until = now() + make_interval(secs => $2), lease = $3
WHERE e.id IN (
    SELECT d.id FROM webhook_endpoints d
    WHERE d.removed_at IS NULL
      AND (d.leased_until IS NULL OR d.leased_until < now())
      AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())
      AND EXISTS (SELECT 1 FROM audit_log a
                  WHERE a.id > d.delivered_through AND a.action = ANY(d.actions))
    ORDER BY d.next_attempt_at NULLS FIRST, d.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
RETURNING e.id, e.url, e.secret, e.actions, e.delivered_through, e.attempts;

-- name: webhook_events
-- The next audit entries an endpoint subscribes to, after its cursor, in audit order.
SELECT a.id, a.at, a.actor, a.action, a.campaign_id, a.detail, c.name AS campaign_name
FROM audit_log a LEFT JOIN campaigns c ON c.id = a.campaign_id
WHERE a.id > $1 AND a.action = ANY($2::text[])
ORDER BY a.id
LIMIT $3;

-- name: hold_webhook_lease
-- Before each POST: renew the lease; no row means it was lost or the endpoint removed.
UPDATE webhook_endpoints SET leased_until = now() + make_interval(secs => $3)
WHERE id = $1 AND lease = $2 AND removed_at IS NULL
RETURNING id;

-- name: webhook_delivered
-- Move the cursor past a delivered entry; no row: the lease was lost, so this loop stops.
UPDATE webhook_endpoints
SET delivered_through = $3, attempts = 0, last_error = NULL, failing_since = NULL,
    next_attempt_at = NULL, last_delivered_at = now()
WHERE id = $1 AND lease = $2 AND delivered_through < $3
RETURNING id;

-- name: webhook_failed
-- Count a failed attempt, schedule the next one $4 seconds from now, release the lease.
UPDATE webhook_endpoints
SET attempts = attempts + 1, last_error = $3, failing_since = coalesce(failing_since, now()),
    next_attempt_at = now() + make_interval(secs => $4), lease = NULL, leased_until = NULL
WHERE id = $1 AND lease = $2
RETURNING attempts;

-- name: release_webhook_endpoint
UPDATE webhook_endpoints SET lease = NULL, leased_until = NULL WHERE id = $1 AND lease = $2;

-- name: log_webhook_attempt
-- Keep one attempt, then only the newest $8 of the endpoint (the INSERT is not yet
-- visible to the DELETE, so it keeps $8 - 1 older ones).
WITH added AS (
    INSERT INTO webhook_deliveries (endpoint_id, audit_id, event, attempt, at, status, error,
                                    duration_ms)
    VALUES ($1, $2, $3, $4, now(), $5, $6, $7)
    RETURNING id
)
DELETE FROM webhook_deliveries
WHERE endpoint_id = $1
  AND id <= (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1
             ORDER BY id DESC OFFSET $8 - 1 LIMIT 1);

-- name: webhook_deliveries
SELECT id, endpoint_id, audit_id, event, attempt, at, status, error, duration_ms
FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2;
-- name: terminal_counts
-- Terminals by model, firmware version and online flag, for the metrics gauges. The
-- firmware version is what a terminal reports for a registered firmware package (the
-- first by name when it reports several); NULL when it reports none.
WITH firmware AS (
    SELECT array_agg(DISTINCT name ORDER BY name) AS names FROM packages WHERE kind = 'firmware'
)
SELECT t.model,
       (SELECT t.versions ->> n FROM unnest(f.names) AS n WHERE t.versions ? n LIMIT 1)
           AS version,
       t.online, count(*)::int AS n
FROM terminals t, firmware f
GROUP BY 1, 2, 3;

-- name: heartbeat_ages
-- Online terminals by seconds since their last heartbeat ($1: the controller's clock),
-- counted at or under each bound of $2 (ascending); terminals online without a heartbeat
-- yet have no age and are left out.
WITH ages AS (
    SELECT greatest(0, extract(epoch FROM $1::timestamptz - heartbeat_at))::float8 AS age
    FROM terminals
    WHERE online AND heartbeat_at IS NOT NULL
)
SELECT ARRAY(SELECT (SELECT count(*) FROM ages WHERE age <= b.le)::int
             FROM unnest($2::float8[]) WITH ORDINALITY AS b (le, i) ORDER BY b.i) AS under,
       (SELECT count(*) FROM ages)::int AS n,
       (SELECT coalesce(sum(age), 0) FROM ages)::float8 AS total_s,
       (SELECT max(age) FROM ages)::float8 AS oldest_s;

-- name: campaign_execution_counts
-- Executions by wave and state of every campaign that is running (not completed) or
-- paused, or that changed or completed since $1 (a finished one stays on the dashboards
-- for a while), with what the failure thresholds need. Read from the campaigns alone, so
-- old campaigns' executions are never scanned.
WITH shown AS (
    SELECT c.id, c.name, c.current_wave, c.acknowledged_failures, c.policy
    FROM campaigns c
    WHERE c.control = 'paused'
       OR c.control = 'running' AND (c.completed_at IS NULL OR c.completed_at >= $1::timestamptz)
       OR c.control <> 'draft' AND c.updated_at >= $1::timestamptz
)
SELECT s.id, s.name, s.current_wave, s.acknowledged_failures, s.policy, x.wave, x.state, x.n
FROM shown s
LEFT JOIN (SELECT campaign_id, wave, state, count(*)::int AS n
           FROM executions WHERE campaign_id IN (SELECT id FROM shown)
           GROUP BY campaign_id, wave, state) x ON x.campaign_id = s.id
ORDER BY s.id, x.wave, x.state;

-- name: existing_groups
SELECT name FROM groups WHERE name = any($1::text[]);

-- name: packages_of_content
SELECT count(*)::int FROM packages WHERE sha256 = $1;

-- name: lock_content
-- Serialises registering a package file and dropping an unused one, per content.
SELECT pg_advisory_xact_lock(7207004, hashtext($1));

-- name: lock_broker_admin
-- One dynamic-security session at a time across processes: they share one client id.
SELECT pg_advisory_xact_lock(7207003);

-- name: try_leader_lock
-- Leadership among controller replicas (fleet/leader.py): a session-level lock, held on
-- its own connection until that session ends. The key is distinct from audit_lock's.
SELECT pg_try_advisory_lock(7207002);

-- name: holds_leader_lock
-- A bigint key shows as classid (high 32 bits), objid (low 32 bits) and objsubid 1.
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
      AND classid = 0 AND objid = 7207002 AND objsubid = 1
);
