-- Operating instances and queues: cancel, retry, rewind, pause (docs/operating.md). The
-- instance operations call the functions of migration 0006, which lock what they change
-- and decide on the locked rows; none of these statements runs on a worker's hot path but
-- the settles, which run only for rows a cancel marked.

-- name: instance_cancel
-- Cancel an instance (by id or by the correlation key it holds) and, with cascade, its live
-- descendants: the instance's row first, then theirs, each with its outcome (cancelled,
-- cancelling, marked, terminal). No row: no such instance, or no live holder of the key.
SELECT instance_id, parent_id, status, outcome
FROM {schema}.cancel(%(target_id)s::bigint, %(target_key)s::text, %(reason)s::text,
                     %(cascade)s::boolean, %(compensate)s::boolean);

-- name: instance_cancel_settle_if_owned_many
-- Settle the cancels of rows this worker owns whose outcome the flush (or admission, or a
-- release) refused because a cancel marked them: cancelled, or sent to their on_cancel
-- step. With %(join)s the parents of rows that ended are joined here; without, the flush
-- joins them with the rest of its batch. Returns the settled rows.
SELECT instance_id, parent_id, status, queue
FROM {schema}.cancel_settle(%(worker)s::text, %(ids)s::bigint[], %(tokens)s::bigint[],
                            %(join)s::boolean);

-- name: instance_cancel_settle_many
-- The same for marked rows of a dead worker, which the reclaim's transaction holds locked
-- (no owner to check); their parents are joined by the reclaim.
SELECT instance_id, parent_id, status, queue
FROM {schema}.cancel_settle(NULL, %(ids)s::bigint[], NULL, false);

-- name: instance_retry_many
-- Retry failed or cancelled instances by id: each row with its outcome (retried, children,
-- key, or the status that refused it) and the step it runs next.
SELECT instance_id, outcome, status, step FROM {schema}.retry(%(ids)s::bigint[]);

-- name: instance_retry_select
-- The next batch of failed instances matching an operator's filter (NULL: no filter), in
-- id order after %(after)s (keyset: rows a batch could not retry are not seen again). The
-- filters are parameters, NULL folding away; the client runs it unprepared, so each run is
-- planned for the values it was given (a time bound can use instances_gc, whose predicate
-- status = 'failed' implies; without one, the primary key is walked from %(after)s).
SELECT i.id FROM {schema}.instances AS i
WHERE i.status = 'failed' AND i.id > %(after)s::bigint
  AND (%(fsm)s::text IS NULL OR i.fsm = %(fsm)s::text)
  AND (%(queue)s::text IS NULL OR i.queue = %(queue)s::text)
  AND (%(error_like)s::text IS NULL OR i.last_error ILIKE %(error_like)s::text)
  AND (%(since_at)s::timestamptz IS NULL OR i.updated_at >= %(since_at)s::timestamptz)
  AND (%(since_ago)s::interval IS NULL OR i.updated_at >= now() - %(since_ago)s::interval)
ORDER BY i.id
LIMIT %(limit)s;

-- name: instance_retry_count
-- How many failed instances match the filter of instance_retry_select (a dry run).
SELECT count(*) FROM {schema}.instances AS i
WHERE i.status = 'failed'
  AND (%(fsm)s::text IS NULL OR i.fsm = %(fsm)s::text)
  AND (%(queue)s::text IS NULL OR i.queue = %(queue)s::text)
  AND (%(error_like)s::text IS NULL OR i.last_error ILIKE %(error_like)s::text)
  AND (%(since_at)s::timestamptz IS NULL OR i.updated_at >= %(since_at)s::timestamptz)
  AND (%(since_ago)s::interval IS NULL OR i.updated_at >= now() - %(since_ago)s::interval);

-- name: instance_rewind
-- Move an instance no worker holds back to a registered step of its machine version, with
-- a new state, else the state it had at that step (history), else the stored one: its
-- outcome (rewound, executing, children, key, unknown_machine, unknown_step), status,
-- version, the registered steps and where the state came from (given, history, stored).
SELECT outcome, status, version, steps, state_from
FROM {schema}.rewind(%(id)s::bigint, %(step)s::text, %(state)s::jsonb);

-- name: queue_pause
-- Pause a queue: from their next claim on, its workers claim nothing. Returns whether it
-- was paused already.
WITH prev AS (
    SELECT paused FROM {schema}.queues WHERE name = %(queue)s::text
)
INSERT INTO {schema}.queues AS q (name, paused, paused_at, updated_at)
VALUES (%(queue)s::text, true, now(), now())
ON CONFLICT (name) DO UPDATE
    SET paused = true, paused_at = COALESCE(q.paused_at, now()), updated_at = now()
RETURNING COALESCE((SELECT paused FROM prev), false) AS was_paused;

-- name: queue_resume
-- Resume a paused queue and wake its idle workers (NOTIFY), so they claim at once.
-- Returns whether it was paused.
WITH resumed AS (
    UPDATE {schema}.queues
    SET paused = false, paused_at = NULL, updated_at = now()
    WHERE name = %(queue)s::text AND paused
    RETURNING name
)
SELECT count(*) > 0 AS was_paused,
       count(pg_notify({schema}.notify_channel(name), '')) AS notified
FROM resumed;

-- name: queue_paused
-- The paused queues, with when each was paused.
SELECT name, paused_at FROM {schema}.queues WHERE paused ORDER BY name;
