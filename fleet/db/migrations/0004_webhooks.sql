-- Webhooks for campaign events, delivered from the audit log (fleet/webhooks.py),
-- and the runner's record of a campaign's completion.

-- When the runner recorded that a running campaign had nothing left to do (the audit
-- entry `campaign_completed` is written in the same transaction, once).
ALTER TABLE campaigns ADD COLUMN completed_at timestamptz;
-- Campaigns already done before this migration count as completed now, so the first
-- runner tick after the upgrade does not announce years of old rollouts.
UPDATE campaigns c SET completed_at = now()
WHERE c.control = 'running'
  AND c.current_wave >= (SELECT count(*) FROM campaign_waves w WHERE w.campaign_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM executions e JOIN execution_states s ON s.state = e.state
                  WHERE e.campaign_id = c.id AND NOT s.final);

-- Receivers of campaign events. The audit log is the outbox: `delivered_through` is the
-- last audit id this endpoint has had (or did not subscribe to); delivery moves it only
-- after a 2xx, so events go out one at a time, in audit order.
CREATE TABLE webhook_endpoints (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url                text NOT NULL,
    -- Kept as given: it is the HMAC key, so a hash of it would be useless. Blanked on
    -- removal.
    secret             text NOT NULL,
    events             text[] NOT NULL CHECK (cardinality(events) > 0),
    -- The audit actions those events are (fleet/webhooks.py EVENTS), for the outbox query.
    actions            text[] NOT NULL,
    created_at         timestamptz NOT NULL,
    created_by         text NOT NULL,
    removed_at         timestamptz,
    delivered_through  bigint NOT NULL,
    -- Failed attempts at the event after `delivered_through`; 0 when none is failing.
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    failing_since      timestamptz,
    next_attempt_at    timestamptz,
    last_delivered_at  timestamptz,
    -- A delivery loop holds the endpoint until then (several controllers may run).
    leased_until       timestamptz,
    lease              uuid
);
CREATE INDEX webhook_endpoints_live ON webhook_endpoints (id) WHERE removed_at IS NULL;

-- The newest attempts per endpoint, for operators (trimmed by the delivery loop).
CREATE TABLE webhook_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id  bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    audit_id     bigint NOT NULL,
    event        text NOT NULL,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL,
    -- The HTTP status, or NULL when no response came (refused, timed out, reset).
    status       integer,
    error        text,
    duration_ms  real NOT NULL
);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
