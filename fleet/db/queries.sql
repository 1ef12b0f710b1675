-- Named queries. Each block starts with "-- name: <name>" and is run by the repository
-- function of the same name. Parameters are asyncpg's $n; never string formatting.

-- name: ensure_heartbeat_partitions
SELECT fleet_ensure_heartbeat_partitions($1);

-- name: upsert_terminals
INSERT INTO terminals (id, model, merchant_id, timezone, versions, attributes)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
ON CONFLICT (id) DO UPDATE
SET model = excluded.model, merchant_id = excluded.merchant_id, timezone = excluded.timezone,
    versions = excluded.versions, attributes = excluded.attributes;

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
INSERT INTO packages (name, kind, version, size, sha256, compatible_models)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id;

-- name: package_by_name
SELECT id, name, kind, version, size, sha256, compatible_models
FROM packages WHERE name = $1 AND version = $2;

-- name: record_event
-- One state event, idempotent on msg_id. The execution moves only if the event is new,
-- newer than anything applied before (seq), and the transition is in state_transitions:
-- a replayed, reordered or illegal event is stored as not applied and changes nothing.
WITH known AS (
    SELECT 1 FROM executions WHERE campaign_id = $3 AND terminal_id = $2
), fresh AS (
    SELECT NOT EXISTS (SELECT 1 FROM update_events WHERE msg_id = $1)
           AND EXISTS (SELECT 1 FROM known) AS is_new
), moved AS (
    UPDATE executions e
    SET state = $5, progress = $6, stage = $7, error_code = $8, detail = $9,
        last_seq = $4, updated_at = now(),
        finished_at = CASE WHEN s.final THEN now() END
    FROM execution_states s
    WHERE e.campaign_id = $3 AND e.terminal_id = $2 AND s.state = $5
      AND (SELECT is_new FROM fresh)
      AND $4 > e.last_seq
      AND NOT (e.state = $5 AND e.progress IS NOT DISTINCT FROM $6)
      AND EXISTS (
          SELECT 1 FROM state_transitions t WHERE t.from_state = e.state AND t.to_state = $5)
    RETURNING e.state
), seqs AS (
    UPDATE terminals
    SET seq_gaps = seq_gaps + (last_event_seq > 0 AND $4 > last_event_seq + 1)::int,
        last_event_seq = greatest(last_event_seq, $4)
    WHERE id = $2 AND (SELECT is_new FROM fresh)
    RETURNING 1
), ins AS (
    INSERT INTO update_events (msg_id, terminal_id, campaign_id, seq, state, progress, stage,
                               error_code, detail, device_ts, applied)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10), EXISTS (SELECT 1 FROM moved)
    WHERE (SELECT is_new FROM fresh)
    ON CONFLICT (msg_id) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM known) AS known,
       EXISTS (SELECT 1 FROM ins) AS inserted,
       EXISTS (SELECT 1 FROM moved) AS moved,
       (SELECT count(*) FROM seqs)::int AS seq_rows;

-- name: touch_terminals
-- Coalesced last-seen: one row per terminal per batch, newest heartbeat wins.
UPDATE terminals t
SET last_seen = greatest(t.last_seen, hb.seen), versions = hb.versions, online = true
FROM unnest($1::text[], $2::timestamptz[], $3::jsonb[]) AS hb (id, seen, versions)
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
SET model = $2, versions = $3, merchant_id = $4, timezone = $5, attributes = $6,
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
INSERT INTO campaigns (name, success_threshold, failure_threshold)
VALUES ($1, $2, $3)
RETURNING id;

-- name: add_campaign_groups
INSERT INTO campaign_groups (campaign_id, group_name) SELECT $1, unnest($2::text[]);

-- name: add_campaign_packages
INSERT INTO campaign_packages (campaign_id, position, package_id)
SELECT $1, p.position, p.package_id
FROM unnest($2::bigint[]) WITH ORDINALITY AS p (package_id, position);

-- name: add_campaign_waves
INSERT INTO campaign_waves (campaign_id, wave, bucket_hi)
SELECT $1, w.wave, w.bucket_hi
FROM unnest($2::integer[]) WITH ORDINALITY AS w (bucket_hi, wave);

-- name: campaign_by_name
SELECT id FROM campaigns WHERE name = $1;

-- name: start_campaign
-- Creates one execution per distinct terminal of the target groups, in the wave its
-- bucket falls into, and opens wave 1.
WITH started AS (
    UPDATE campaigns
    SET control = 'running', current_wave = 1, started_at = now(), updated_at = now(),
        desired_revision = desired_revision + 1
    WHERE id = $1 AND control = 'draft'
    RETURNING id
), opened AS (
    UPDATE campaign_waves SET opened_at = now()
    WHERE campaign_id = $1 AND wave = 1 AND EXISTS (SELECT 1 FROM started)
), targets AS (
    SELECT DISTINCT gm.terminal_id, fleet_bucket(gm.terminal_id) AS bucket
    FROM campaign_groups cg
    JOIN group_members gm ON gm.group_name = cg.group_name
    WHERE cg.campaign_id = $1 AND EXISTS (SELECT 1 FROM started)
), created AS (
    INSERT INTO executions (campaign_id, terminal_id, wave, bucket)
    SELECT $1, t.terminal_id,
           (SELECT min(w.wave) FROM campaign_waves w
            WHERE w.campaign_id = $1 AND w.bucket_hi > t.bucket),
           t.bucket
    FROM targets t
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM started) AS started, (SELECT count(*) FROM created)::int AS n;

-- name: set_control
-- Operator intent; `from_controls` lists the controls it may change from.
UPDATE campaigns
SET control = $2, paused_reason = $3, updated_at = now(),
    desired_revision = desired_revision + 1
WHERE id = $1 AND control = ANY($4::text[])
RETURNING desired_revision;

-- name: cancel_pending_executions
UPDATE executions
SET state = 'canceling', updated_at = now()
WHERE campaign_id = $1 AND state = 'pending';

-- name: finish_canceling
-- A terminal that had not reported within the grace period never saw the campaign active.
UPDATE executions
SET state = 'canceled', updated_at = now(), finished_at = now()
WHERE campaign_id = $1 AND state = 'canceling' AND updated_at < now() - make_interval(secs => $2)
RETURNING terminal_id;

-- name: time_out_stale_executions
-- Executions under way that have not moved for too long end as timed_out, through the same
-- transition table as every other change.
UPDATE executions e
SET state = 'timed_out', stage = coalesce(e.stage, e.state), error_code = 'DEADLINE_EXCEEDED',
    updated_at = now(), finished_at = now()
WHERE e.campaign_id = $1
  AND e.state NOT IN ('pending', 'canceling')
  AND e.updated_at < now() - make_interval(secs => $2)
  AND EXISTS (
      SELECT 1 FROM state_transitions t WHERE t.from_state = e.state AND t.to_state = 'timed_out')
RETURNING e.terminal_id;

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

-- name: acknowledge_failures
UPDATE campaigns SET acknowledged_failures = $2 WHERE id = $1;

-- name: open_wave
UPDATE campaigns
SET current_wave = $2, updated_at = now(), desired_revision = desired_revision + 1
WHERE id = $1 AND current_wave = $2 - 1 AND control = 'running'
RETURNING desired_revision;

-- name: mark_wave_opened
UPDATE campaign_waves SET opened_at = now() WHERE campaign_id = $1 AND wave = $2;

-- name: live_campaigns
SELECT id, name, control, current_wave, success_threshold, failure_threshold,
       desired_revision, acknowledged_failures,
       (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)::int AS wave_count
FROM campaigns c
WHERE control <> 'draft'
ORDER BY id;

-- name: campaign
SELECT id, name, control, current_wave, success_threshold, failure_threshold,
       desired_revision, paused_reason, created_at, started_at,
       (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)::int AS wave_count
FROM campaigns c
WHERE id = $1;

-- name: campaign_desired
-- Everything a desired-state message needs: ordered packages, open bucket range, and the
-- groups it speaks for: those whose newest started campaign is this one (a group has one
-- retained desired state, so an older campaign must not overwrite a newer one's).
SELECT c.id, c.control, c.desired_revision,
       coalesce((SELECT w.bucket_hi FROM campaign_waves w
                 WHERE w.campaign_id = c.id AND w.wave = c.current_wave), 0) AS bucket_hi,
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
SELECT w.wave, w.bucket_hi, w.opened_at, e.state, count(e.terminal_id)::int AS n
FROM campaign_waves w
LEFT JOIN executions e ON e.campaign_id = w.campaign_id AND e.wave = w.wave
WHERE w.campaign_id = $1
GROUP BY w.wave, w.bucket_hi, w.opened_at, e.state
ORDER BY w.wave, e.state;

-- name: log_campaign
INSERT INTO campaign_log (campaign_id, actor, action, detail) VALUES ($1, $2, $3, $4);

-- name: campaign_log
SELECT at, actor, action, detail FROM campaign_log WHERE campaign_id = $1 ORDER BY id;

-- name: execution_states
SELECT terminal_id, state, stage, error_code FROM executions WHERE campaign_id = $1;
