-- pgdurable schema, version 10: human input (awaits that carry a prompt, a schema and choices) and
-- time limits (expiry before start, instance deadlines). docs/inputs.md and
-- docs/deadlines.md describe the semantics.

-- input_request: what an Await that asks for input carries, as one document
-- {"prompt": text | null, "schema": JSON Schema | null, "choices": [values] | null}; the
-- input is answered on the await's first name (awaits[1]). Written by every park (NULL for
-- a plain await). A pending input is a row awaiting_signal with a request: nothing else
-- reads the column, so an instance that woke, finished, was cancelled or timed out has no
-- pending input, whatever the column still holds.
ALTER TABLE {schema}.instances ADD COLUMN input_request jsonb;

-- The pending inputs, listed by machine or queue (pending_inputs below, input_respond).
-- Only parked rows that asked for input are in it.
CREATE INDEX instances_inputs ON {schema}.instances (id)
    WHERE status = 'awaiting_signal' AND input_request IS NOT NULL;

-- Every pending input, for SQL users and for the clients (input_pending_list): the
-- instance, its machine, the step the answer wakes, the signal name to answer on, the
-- prompt, the JSON Schema of the answer, the allowed values, and the await's deadline.
CREATE VIEW {schema}.pending_inputs AS
SELECT i.id AS instance_id, i.fsm, i.version, i.step, i.awaits[1] AS name,
       i.input_request->>'prompt' AS prompt,
       NULLIF(i.input_request->'schema', 'null'::jsonb) AS schema,
       NULLIF(i.input_request->'choices', 'null'::jsonb) AS choices,
       i.await_deadline AS deadline, i.queue, i.correlation_key, i.updated_at AS asked_at
FROM {schema}.instances AS i
WHERE i.status = 'awaiting_signal' AND i.input_request IS NOT NULL;

-- Time limits (docs/deadlines.md).
-- expires_at: the instance must have started by then — its first step's outcome committed
-- (every outcome statement clears it). A runnable row past it is never claimed
-- (instance_claim) and is ended by expire_unstarted: failed, or cancelled when on_expiry
-- is 'cancel'. deadline: the instance must have finished by then, else deadline_fail fails
-- it and cancels its live descendants; an executing one is marked and failed when its
-- step returns. Both are spent (NULL) once they fired, so a retry runs without them.
ALTER TABLE {schema}.instances
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN on_expiry text,
    ADD COLUMN deadline timestamptz;
ALTER TABLE {schema}.instances ADD CONSTRAINT instances_on_expiry_check
    CHECK (on_expiry IN ('fail', 'cancel')) NOT VALID;

-- A machine's relative deadline (FSM deadline=), applied to its inserts by name.
ALTER TABLE {schema}.machines ADD COLUMN deadline interval;

-- cancel_requested 'fail': the deadline of an executing row passed; settled like a cancel
-- when its step returns (every statement that takes a row out of executing already refuses
-- a marked row), but the row ends `failed` with last_error saying why.
ALTER TABLE {schema}.instances DROP CONSTRAINT instances_cancel_requested_check;
ALTER TABLE {schema}.instances ADD CONSTRAINT instances_cancel_requested_check
    CHECK (cancel_requested IN ('hook', 'final', 'fail')) NOT VALID;

-- The due rows of each sweep, and their next due time (deadline_next_due), live rows only.
CREATE INDEX instances_expiry ON {schema}.instances (expires_at)
    WHERE status = 'runnable' AND expires_at IS NOT NULL;
CREATE INDEX instances_deadline ON {schema}.instances (deadline)
    WHERE deadline IS NOT NULL AND cancel_requested IS NULL AND cancel_reason IS NULL
      AND status NOT IN ('done', 'failed', 'cancelled');

-- cancel_finish of migration 8, and a row marked 'fail' ends `failed` (its last_error set
-- by whoever marked it, its cancel_reason untouched) — or, with completed steps to
-- compensate, compensates them first with that error (docs/sagas.md); everything else as
-- before.
CREATE OR REPLACE FUNCTION {schema}.cancel_finish(ids bigint[], hooks boolean[], reason text, do_join boolean)
    RETURNS TABLE (instance_id bigint, parent_id bigint, status text, queue text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    ended_parents bigint[];
    diverted bigint[];
BEGIN
    WITH d AS (
        SELECT i.id, i.status AS was, i.concurrency_key AS ckey, i.concurrency_shard AS shard,
               COALESCE(h.hook AND (m.on_cancel IS NOT NULL OR {schema}.saga_due(i.saga)), false)
               OR (i.cancel_requested IS NOT DISTINCT FROM 'fail' AND {schema}.saga_due(i.saga))
                   AS divert,
               -- no on_cancel step (or a deadline) but completed steps to compensate:
               -- straight to them
               COALESCE((h.hook AND m.on_cancel IS NULL OR i.cancel_requested IS NOT DISTINCT FROM 'fail')
                        AND {schema}.saga_due(i.saga), false) AS undo,
               i.cancel_requested IS NOT DISTINCT FROM 'fail' AS fail,
               COALESCE(m.version, i.version) AS mversion,
               COALESCE(m.on_cancel, i.saga->'stack'->>-1) AS on_cancel
        FROM unnest(cancel_finish.ids, cancel_finish.hooks) AS h(id, hook)
        JOIN {schema}.instances AS i ON i.id = h.id
        LEFT JOIN LATERAL (
            SELECT mm.version, mm.on_cancel FROM {schema}.machines AS mm
            WHERE mm.name = i.fsm AND (i.version IS NULL OR mm.version = i.version)
            ORDER BY mm.version DESC LIMIT 1) AS m ON h.hook
    ), moved AS (
        UPDATE {schema}.instances AS i
        SET status = CASE WHEN d.divert THEN 'runnable' WHEN d.fail THEN 'failed' ELSE 'cancelled' END,
            version = CASE WHEN d.divert THEN d.mversion ELSE i.version END,
            step = CASE WHEN d.divert THEN d.on_cancel ELSE i.step END,
            cancel_step = CASE WHEN d.divert THEN i.step ELSE i.cancel_step END,
            cancel_reason = CASE WHEN d.fail THEN i.cancel_reason
                                 ELSE COALESCE(i.cancel_reason, cancel_finish.reason, 'cancelled') END,
            saga = CASE WHEN d.undo AND d.fail
                        THEN {schema}.saga_begin(i.saga, i.step, i.last_error)
                        WHEN d.undo
                        THEN {schema}.saga_begin(i.saga, i.step, 'cancelled: '
                             || COALESCE(i.cancel_reason, cancel_finish.reason, 'cancelled'))
                        ELSE i.saga END,
            cancel_requested = NULL,
            attempt = CASE WHEN d.divert THEN 0 ELSE i.attempt END,
            crashes = 0,
            children_pending = CASE WHEN d.divert THEN 0 ELSE i.children_pending END,
            awaits = NULL, await_deadline = NULL, eligible_at = now(),
            concurrency_shard = NULL,
            rate_limit = CASE WHEN d.divert THEN NULL ELSE i.rate_limit END,
            weight = CASE WHEN d.divert THEN 1 ELSE i.weight END,
            locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
        FROM d
        WHERE i.id = d.id
        RETURNING i.id, i.parent_id, d.divert, d.was, d.ckey, d.shard
    ), credited AS (
        UPDATE {schema}.gate_slots AS g
        SET available = LEAST(g.capacity, g.available + c.n)
        FROM (SELECT ckey, shard, count(*)::int AS n FROM moved
              WHERE was = 'executing' AND shard >= 0
              GROUP BY ckey, shard ORDER BY ckey, shard) AS c
        WHERE g.key = c.ckey AND g.shard = c.shard
        RETURNING 1
    ), cleared AS (
        DELETE FROM {schema}.signals AS s USING moved AS mv WHERE s.target_id = mv.id
        RETURNING 1
    )
    SELECT array_agg(mv.parent_id) FILTER (WHERE NOT mv.divert AND mv.parent_id IS NOT NULL),
           array_agg(mv.id) FILTER (WHERE mv.divert)
    INTO ended_parents, diverted
    FROM moved AS mv;  -- credited and cleared run to completion whether read or not

    IF do_join AND ended_parents IS NOT NULL THEN
        WITH dd AS (
            SELECT p AS id, count(*)::int AS n FROM unnest(ended_parents) AS p GROUP BY p
        ), locked AS (
            SELECT p.id FROM {schema}.instances AS p JOIN dd ON dd.id = p.id
            ORDER BY p.id FOR NO KEY UPDATE OF p
        )
        UPDATE {schema}.instances AS p
        SET children_pending = p.children_pending - dd.n,
            status = CASE WHEN p.status = 'awaiting_children' AND p.children_pending - dd.n <= 0
                          THEN 'runnable' ELSE p.status END,
            eligible_at = CASE WHEN p.status = 'awaiting_children' AND p.children_pending - dd.n <= 0
                               THEN now() ELSE p.eligible_at END,
            updated_at = now()
        FROM dd
        WHERE p.id = dd.id AND p.id IN (SELECT id FROM locked);
        PERFORM pg_notify({schema}.notify_channel(q), '')
        FROM (SELECT DISTINCT p.queue FROM {schema}.instances AS p
              WHERE p.id = ANY(ended_parents) AND p.status = 'runnable') AS w(q);
    END IF;

    IF diverted IS NOT NULL THEN
        -- A row sent to its on_cancel step runs it once its live children (not cancelled
        -- here, or executing and only marked) have ended: it waits for them as after a
        -- Spawn, and their ends are counted by the usual join.
        UPDATE {schema}.instances AS p
        SET status = 'awaiting_children', children_pending = l.n
        FROM (SELECT c.parent_id AS id, count(*)::int AS n FROM {schema}.instances AS c
              WHERE c.parent_id = ANY(diverted) AND c.status NOT IN ('done', 'failed', 'cancelled')
              GROUP BY c.parent_id) AS l
        WHERE p.id = l.id;
        PERFORM pg_notify({schema}.notify_channel(q), '')
        FROM (SELECT DISTINCT p.queue FROM {schema}.instances AS p
              WHERE p.id = ANY(diverted) AND p.status = 'runnable') AS w(q);
    END IF;

    RETURN QUERY
        SELECT i.id, i.parent_id, i.status, i.queue FROM {schema}.instances AS i
        WHERE i.id = ANY(cancel_finish.ids) ORDER BY i.id;
END
$$;

-- End up to lim runnable rows whose expires_at passed (they never started): failed with
-- "expired: not started by <time>", or cancelled with that reason when on_expiry is
-- 'cancel' (no on_cancel step: nothing ran to undo). The expiry is spent (NULL). Rows are taken in expiry order with
-- SKIP LOCKED (a claim holding one wins; it does not start it either, see instance_claim);
-- their parents are joined as for any finished child. Returns the rows as they end.
CREATE FUNCTION {schema}.expire_unstarted(lim integer)
    RETURNS TABLE (instance_id bigint, status text, queue text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    due bigint[];
BEGIN
    WITH picked AS (
        SELECT i.id,
               -- a row a cancel sent to its on_cancel step before it ever started ends
               -- cancelled, with the cancel's reason
               i.on_expiry = 'cancel' OR i.cancel_reason IS NOT NULL AS cancel,
               'expired: not started by '
               || to_char(i.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US "UTC"') AS why
        FROM {schema}.instances AS i
        WHERE i.status = 'runnable' AND i.expires_at IS NOT NULL AND i.expires_at <= now()
        ORDER BY i.expires_at
        LIMIT expire_unstarted.lim
        FOR NO KEY UPDATE SKIP LOCKED
    ), marked AS (
        UPDATE {schema}.instances AS i
        SET cancel_requested = CASE WHEN p.cancel THEN 'final' ELSE 'fail' END,
            last_error = CASE WHEN p.cancel THEN i.last_error ELSE p.why END,
            last_traceback = CASE WHEN p.cancel THEN i.last_traceback END,
            cancel_reason = CASE WHEN p.cancel THEN COALESCE(i.cancel_reason, p.why) END,
            expires_at = NULL
        FROM picked AS p
        WHERE i.id = p.id
        RETURNING i.id
    )
    SELECT array_agg(id ORDER BY id) INTO due FROM marked;
    IF due IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT f.instance_id, f.status, f.queue
        FROM {schema}.cancel_finish(due, array_fill(false, ARRAY[cardinality(due)]), NULL, true) AS f;
END
$$;

-- Fail up to lim instances whose deadline passed (live, no cancel pending, not running an
-- on_cancel step), in deadline order. Their live children are cancelled first, each with
-- its descendants, by cancel() — which locks them deepest first, as a flush locks a child
-- before its parent — then the instances are locked and decided on as they are now: a row
-- that is not executing ends `failed` with "deadline passed: not finished by <time>" (its
-- inbox cleared, its parent joined, by cancel_finish); an executing one is marked 'fail'
-- and fails when its step returns, its outcome discarded. The deadline is spent (NULL).
-- Returns each instance with its outcome: 'failed' or 'marked'.
CREATE FUNCTION {schema}.deadline_fail(lim integer)
    RETURNS TABLE (instance_id bigint, status text, queue text, outcome text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    due bigint[];
    fails bigint[];
    marks bigint[];
    r record;
BEGIN
    SELECT array_agg(d.id ORDER BY d.id) INTO due FROM (
        SELECT i.id FROM {schema}.instances AS i
        WHERE i.deadline IS NOT NULL AND i.cancel_requested IS NULL AND i.cancel_reason IS NULL
          AND i.status NOT IN ('done', 'failed', 'cancelled') AND i.deadline <= now()
        ORDER BY i.deadline
        LIMIT deadline_fail.lim) AS d;
    IF due IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT c.id, c.parent_id FROM {schema}.instances AS c
             WHERE c.parent_id = ANY(due) AND c.status NOT IN ('done', 'failed', 'cancelled')
             ORDER BY c.id
    LOOP
        PERFORM 1 FROM {schema}.cancel(
            target_id => r.id, reason => 'the deadline of instance ' || r.parent_id || ' passed');
    END LOOP;
    PERFORM 1 FROM {schema}.instances AS i WHERE i.id = ANY(due) ORDER BY i.id FOR NO KEY UPDATE;
    WITH marked AS (
        UPDATE {schema}.instances AS i
        SET cancel_requested = 'fail',
            last_error = 'deadline passed: not finished by '
                         || to_char(i.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US "UTC"'),
            last_traceback = NULL, deadline = NULL, updated_at = now()
        WHERE i.id = ANY(due) AND i.deadline IS NOT NULL AND i.deadline <= now()
          AND i.cancel_requested IS NULL AND i.cancel_reason IS NULL
          AND i.status NOT IN ('done', 'failed', 'cancelled')
        RETURNING i.id, i.status
    )
    SELECT array_agg(m.id ORDER BY m.id) FILTER (WHERE m.status <> 'executing'),
           array_agg(m.id ORDER BY m.id) FILTER (WHERE m.status = 'executing')
    INTO fails, marks FROM marked AS m;
    IF fails IS NOT NULL THEN
        PERFORM 1 FROM {schema}.cancel_finish(fails, array_fill(false, ARRAY[cardinality(fails)]), NULL, true);
    END IF;
    RETURN QUERY
        SELECT i.id, i.status, i.queue, CASE WHEN i.id = ANY(COALESCE(marks, '{}')) THEN 'marked' ELSE 'failed' END
        FROM {schema}.instances AS i
        WHERE i.id = ANY(COALESCE(fails, '{}') || COALESCE(marks, '{}'))
        ORDER BY i.id;
END
$$;
