-- name: signal_deliver
-- Store a signal for a live instance (by id or by correlation key) and wake it if it is
-- parked on that name, in one statement. The wake runs first and matches the target by id,
-- so it takes the row lock (queuing behind a park or a flush in progress) and re-checks
-- that the row is still live on the newest version; the inbox insert reads the wake's
-- output, so a signal is stored only for a target that was live under the lock. The flip
-- condition lives in SET, never in WHERE: a row that is not parked yet is still locked, and
-- its park's recheck will see this signal. A duplicate dedup_key stores nothing.
WITH target AS (
    SELECT id FROM {schema}.instances
    WHERE status NOT IN ('done', 'failed', 'cancelled')
      AND ((%(target_id)s::bigint IS NOT NULL AND id = %(target_id)s::bigint)
        OR (%(target_key)s::text IS NOT NULL AND correlation_guard = %(target_key)s::text))
    LIMIT 1
), wake AS (
    UPDATE {schema}.instances AS i
    SET status = CASE WHEN i.status = 'awaiting_signal' AND %(name)s = ANY(i.awaits)
                      THEN 'runnable' ELSE i.status END,
        eligible_at = CASE WHEN i.status = 'awaiting_signal' AND %(name)s = ANY(i.awaits)
                           THEN now() ELSE i.eligible_at END,
        updated_at = CASE WHEN i.status = 'awaiting_signal' AND %(name)s = ANY(i.awaits)
                          THEN now() ELSE i.updated_at END
    FROM target AS t
    WHERE i.id = t.id AND i.status NOT IN ('done', 'failed', 'cancelled')
    RETURNING i.id, i.status, i.queue
), ins AS (
    INSERT INTO {schema}.signals (target_id, name, payload, dedup_key)
    SELECT id, %(name)s, %(payload)s::jsonb, %(dedup_key)s FROM wake
    ON CONFLICT (target_id, dedup_key) DO NOTHING
    RETURNING id
)
SELECT w.id AS target_id, (SELECT id FROM ins) AS signal_id, w.status, w.queue,
       CASE WHEN w.status = 'runnable' AND %(notify)s
            THEN pg_notify({schema}.notify_channel(w.queue), '')::text END AS notified
FROM wake AS w;

-- name: signal_inbox_many
-- The whole inbox of the given instances, oldest first (ctx.inbox / ctx.awaited).
SELECT target_id, id, name, payload::text AS payload, dedup_key, inserted_at
FROM {schema}.signals
WHERE target_id = ANY(%(ids)s::bigint[])
ORDER BY target_id, id;

-- name: signal_consume_many
-- Consume the signals spawning parents were handed (their commit is in this transaction;
-- plain outcomes consume inside instance_commit_if_owned_many).
DELETE FROM {schema}.signals WHERE id = ANY(%(ids)s::bigint[]);
