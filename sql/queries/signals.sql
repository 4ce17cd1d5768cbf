-- name: signal_deliver
-- Store a signal for a live instance (by id or by correlation key) and wake it if it is
-- parked on that name, in one statement. The target is locked first (queuing behind a park
-- or a flush in progress; under the lock its status is re-checked, so a signal is stored
-- only for a target that was live then). Its dedup key, if any, is then remembered in
-- signal_dedup, where it stays after the signal is consumed, for as long as the instance's
-- row exists: ON CONFLICT there is the duplicate test, exact against a concurrent delivery
-- of the same key. A duplicate stores nothing and wakes nothing. The wake reads the status
-- and awaits of the locked row (target), not of this statement's snapshot: a park that
-- committed while the delivery waited for the lock is seen. A row that is not parked yet
-- is not updated at all; the lock is enough, its park's recheck will see this signal.
WITH target AS (
    SELECT id, status, queue, awaits FROM {schema}.instances
    WHERE status NOT IN ('done', 'failed', 'cancelled')
      AND ((%(target_id)s::bigint IS NOT NULL AND id = %(target_id)s::bigint)
        OR (%(target_key)s::text IS NOT NULL AND correlation_key = %(target_key)s::text
             AND status = ANY (correlation_scope)))
    LIMIT 1
    FOR NO KEY UPDATE
), remembered AS (
    INSERT INTO {schema}.signal_dedup (target_id, dedup_key)
    SELECT id, %(dedup_key)s::text FROM target WHERE %(dedup_key)s::text IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING target_id
), ins AS (
    INSERT INTO {schema}.signals (target_id, name, payload, dedup_key, traceparent)
    SELECT id, %(name)s, %(payload)s::jsonb, %(dedup_key)s::text, %(traceparent)s::text FROM target
    WHERE %(dedup_key)s::text IS NULL OR EXISTS (SELECT 1 FROM remembered)
    ON CONFLICT (target_id, dedup_key) DO NOTHING
    RETURNING id, target_id
), wake AS (
    UPDATE {schema}.instances AS i
    SET status = 'runnable', eligible_at = now(), updated_at = now()
    FROM target AS t, ins
    WHERE i.id = t.id AND ins.target_id = t.id
      AND t.status = 'awaiting_signal' AND %(name)s = ANY(t.awaits)
    RETURNING i.id, i.status
)
SELECT t.id AS target_id, (SELECT id FROM ins) AS signal_id,
       COALESCE(w.status, t.status) AS status, t.queue,
       CASE WHEN COALESCE(w.status, t.status) = 'runnable' AND %(notify)s
            THEN pg_notify({schema}.notify_channel(t.queue), '')::text END AS notified
FROM target AS t LEFT JOIN wake AS w ON w.id = t.id;

-- name: signal_inbox_many
-- The whole inbox of the given instances, oldest first (ctx.inbox / ctx.awaited), and each
-- signal's trace context (the step an awaited one wakes is a span of its trace).
SELECT target_id, id, name, payload::text AS payload, dedup_key, inserted_at, traceparent
FROM {schema}.signals
WHERE target_id = ANY(%(ids)s::bigint[])
ORDER BY target_id, id;

-- name: signal_consume_many
-- Consume the signals spawning parents were handed (their commit is in this transaction;
-- plain outcomes consume inside instance_commit_if_owned_many).
DELETE FROM {schema}.signals WHERE id = ANY(%(ids)s::bigint[]);
