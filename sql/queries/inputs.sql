-- Human input (docs/inputs.md): awaits that ask for input are listed from the view
-- pending_inputs (migration 10), and answered by a signal delivered only while the very
-- request the answer was checked against is pending. None of these runs on a worker's path.

-- name: input_pending_list
-- The pending inputs, oldest instance first, after %(after)s (keyset by instance id),
-- optionally of one machine and one queue (NULL: any), at most %(limit)s.
SELECT instance_id, fsm, version, step, name, prompt, schema::text AS schema,
       choices::text AS choices, deadline, queue, correlation_key, asked_at
FROM {schema}.pending_inputs
WHERE instance_id > %(after)s::bigint
  AND (%(fsm)s::text IS NULL OR fsm = %(fsm)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
ORDER BY instance_id
LIMIT %(limit)s;

-- name: input_pending_get
-- What an answer to a live instance (by id or by the correlation key it holds) is checked
-- against: its status, the name an input would be answered on (its first awaited name) and
-- the request it parked with (NULL: none pending). No row: no live instance.
SELECT id, status, awaits[1] AS name,
       CASE WHEN status = 'awaiting_signal' THEN input_request::text END AS request
FROM {schema}.instances
WHERE status NOT IN ('done', 'failed', 'cancelled')
  AND ((%(target_id)s::bigint IS NOT NULL AND id = %(target_id)s::bigint)
    OR (%(target_key)s::text IS NOT NULL AND correlation_key = %(target_key)s::text
             AND status = ANY (correlation_scope)))
LIMIT 1;

-- name: input_respond
-- Deliver an answer as the signal %(name)s and wake the instance, in one statement, only if
-- it still awaits that input with the request the answer was validated against (the row
-- lock is taken first; a park, a wake or a timeout that committed meanwhile is re-checked
-- on the locked row, which then no longer qualifies). No row: it does not await it any
-- more, and nothing was stored. The signal path of signal_deliver, narrowed to this case.
WITH target AS (
    SELECT id, queue FROM {schema}.instances
    WHERE id = %(target_id)s::bigint AND status = 'awaiting_signal'
      AND awaits[1] = %(name)s::text AND input_request = %(request)s::jsonb
    FOR NO KEY UPDATE
), ins AS (
    INSERT INTO {schema}.signals (target_id, name, payload)
    SELECT id, %(name)s::text, %(payload)s::jsonb FROM target
    RETURNING id, target_id
), wake AS (
    UPDATE {schema}.instances AS i
    SET status = 'runnable', eligible_at = now(), updated_at = now()
    FROM ins
    WHERE i.id = ins.target_id
    RETURNING i.id, i.queue
)
SELECT w.id AS target_id, ins.id AS signal_id,
       pg_notify({schema}.notify_channel(w.queue), '')::text AS notified
FROM wake AS w JOIN ins ON ins.target_id = w.id;
