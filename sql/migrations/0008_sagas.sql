-- pgdurable schema, version 8: compensation (sagas). docs/sagas.md describes the semantics.

-- saga: NULL until a step that declares a compensation completes. Then
--   {"stack": [compensation step, ...]}   the compensations of the completed steps, in the
--                                           order they completed (the last one runs first)
-- and once the instance failed or was cancelled with a non-empty stack:
--   "mode": "compensating" while the stack runs (its last element is the compensation due),
--           then "compensated" (each one returned) or "compensation_failed" (one or more
--           gave up; the chain went on);
--   "error": the failure that started it (last_error again at the end),
--   "step": the step the instance failed in, "failures": compensations that gave up.
-- Written by the worker's commit statements with the outcome that changes it (NULL there
-- keeps it), by cancel_finish when a cancel starts the compensations, and by the reaper
-- when a step's worker died max_crashes times.
ALTER TABLE {schema}.instances ADD COLUMN saga jsonb;
-- history.outcome gains 'compensate', 'compensated' and 'compensation_failed' (a text
-- column: nothing to alter).

-- Whether a saga has compensations to run and is not running (or has not run) them.
CREATE FUNCTION {schema}.saga_due(saga jsonb)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT COALESCE(jsonb_array_length(saga->'stack') > 0 AND saga->>'mode' IS NULL, false) $$;

-- The saga of an instance that starts compensating: the failed step and the failure kept.
CREATE FUNCTION {schema}.saga_begin(saga jsonb, failed_step text, error text)
    RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT saga || jsonb_build_object('mode', 'compensating', 'error', error,
                                             'step', failed_step, 'failures', 0) $$;

-- The saga after its due compensation gave up (its worker died max_crashes times): popped,
-- counted as a failure; the mode says compensation_failed once the stack is empty.
CREATE FUNCTION {schema}.saga_give_up(saga jsonb)
    RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT saga || jsonb_build_object(
              'stack', (saga->'stack') - (-1),
              'failures', COALESCE((saga->>'failures')::int, 0) + 1,
              'mode', CASE WHEN jsonb_array_length(saga->'stack') <= 1 THEN 'compensation_failed'
                           ELSE 'compensating' END) $$;

-- Cancel the given rows now; the caller has locked them (in an order that cannot deadlock
-- with a flush: children before parents) and knows none is executing, or settles rows
-- whose step returned. hooks[i]: whether row i may go to its machine's on_cancel step or,
-- since version 8, compensate its completed steps. A row that may and whose machine version
-- declares an on_cancel step becomes runnable at that step; one that may, declares none
-- and has completed steps to compensate (saga_due) becomes runnable at the last one's
-- compensation, compensating (saga_begin) — either way awaiting its live children first,
-- if it has any; any other row ends `cancelled`.
-- Either way: its inbox is cleared, a gate slot it held is given back, its lease and
-- awaits are dropped. With do_join, the parents of rows that ended are counted as for any
-- terminal child (their join, in id order, as instance_join_parents_many does); without,
-- the caller joins them with the rest of its transaction. Returns the rows as they end.
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
                   AS divert,
               -- no on_cancel step but completed steps to compensate: straight to them
               COALESCE(h.hook AND m.on_cancel IS NULL AND {schema}.saga_due(i.saga), false)
                   AS undo,
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
        SET status = CASE WHEN d.divert THEN 'runnable' ELSE 'cancelled' END,
            version = CASE WHEN d.divert THEN d.mversion ELSE i.version END,
            step = CASE WHEN d.divert THEN d.on_cancel ELSE i.step END,
            cancel_step = CASE WHEN d.divert THEN i.step ELSE i.cancel_step END,
            cancel_reason = COALESCE(i.cancel_reason, cancel_finish.reason, 'cancelled'),
            saga = CASE WHEN d.undo
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

-- Cancel an instance, by id (target_id) or by the correlation key it holds (target_key),
-- and with cascade its live descendants. The rows are locked children first (deepest
-- level first, then by id), the instance last, as a flush locks a child before joining
-- its parent; the descendants are read again until no new one appears. Then, per row:
-- finished: left alone ('terminal'); executing: marked, settled when its step returns
-- ('marked'); running its on_cancel step already, or compensating (version 8): left to
-- finish it ('cancelling', and a compensating one ends `cancelled`) unless compensate is
-- false; any other live row: cancelled now (cancel_finish) — 'cancelled',
-- or 'cancelling' when it went to its on_cancel step. Returns the instance first, then
-- its descendants; no row when there is no such instance (or no live holder of the key).
CREATE OR REPLACE FUNCTION {schema}.cancel(target_id bigint DEFAULT NULL, target_key text DEFAULT NULL,
                                reason text DEFAULT NULL, cascade boolean DEFAULT true,
                                compensate boolean DEFAULT true)
    RETURNS TABLE (instance_id bigint, parent_id bigint, status text, outcome text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    root bigint;
    locked bigint[] := '{}';
    fresh bigint[];
    all_ids bigint[];
    kinds text[];
    now_ids bigint[];
    now_hooks boolean[];
BEGIN
    IF cancel.target_id IS NOT NULL THEN
        SELECT i.id INTO root FROM {schema}.instances AS i WHERE i.id = cancel.target_id;
    ELSIF cancel.target_key IS NOT NULL THEN
        SELECT i.id INTO root FROM {schema}.instances AS i
        WHERE i.correlation_guard = cancel.target_key;
    END IF;
    IF root IS NULL THEN
        RETURN;
    END IF;

    LOOP
        WITH RECURSIVE tree (id, depth) AS (
            SELECT root, 0
            UNION ALL
            SELECT c.id, t.depth + 1
            FROM tree AS t JOIN {schema}.instances AS c ON c.parent_id = t.id
            WHERE cancel.cascade AND c.status NOT IN ('done', 'failed', 'cancelled')
        )
        SELECT COALESCE(array_agg(l.id), '{}') INTO fresh
        FROM (SELECT i.id FROM {schema}.instances AS i JOIN tree AS t ON t.id = i.id
              WHERE i.id <> ALL(locked)
              ORDER BY t.depth DESC, i.id
              FOR NO KEY UPDATE OF i) AS l;
        EXIT WHEN cardinality(fresh) = 0;
        locked := locked || fresh;
    END LOOP;

    -- Decided on the locked rows, as they are now (this statement's snapshot is newer than
    -- every lock taken above): a row that finished meanwhile is left alone.
    SELECT array_agg(i.id ORDER BY i.id),
           array_agg(CASE
               WHEN i.status IN ('done', 'failed', 'cancelled') THEN 'terminal'
               WHEN i.cancel_requested IS NULL AND cancel.compensate
                    AND (i.cancel_reason IS NOT NULL OR i.saga->>'mode' = 'compensating')
                   THEN 'cancelling'
               WHEN i.status = 'executing' THEN 'marked'
               ELSE 'now' END ORDER BY i.id)
    INTO all_ids, kinds
    FROM {schema}.instances AS i
    WHERE i.id = ANY(locked);

    SELECT array_agg(i.id ORDER BY i.id),
           array_agg(cancel.compensate AND i.cancel_reason IS NULL ORDER BY i.id)
    INTO now_ids, now_hooks
    FROM unnest(all_ids, kinds) AS k(id, kind)
    JOIN {schema}.instances AS i ON i.id = k.id
    WHERE k.kind = 'now';

    -- A compensating instance left to finish: it ends `cancelled` (not `failed`) after.
    UPDATE {schema}.instances AS i
    SET cancel_reason = COALESCE(cancel.reason, 'cancelled'), updated_at = now()
    FROM unnest(all_ids, kinds) AS k(id, kind)
    WHERE i.id = k.id AND k.kind = 'cancelling' AND i.cancel_reason IS NULL;

    UPDATE {schema}.instances AS i
    SET cancel_requested = CASE WHEN cancel.compensate THEN COALESCE(i.cancel_requested, 'hook')
                                ELSE 'final' END,
        cancel_reason = COALESCE(i.cancel_reason, cancel.reason, 'cancelled'),
        updated_at = now()
    FROM unnest(all_ids, kinds) AS k(id, kind)
    WHERE i.id = k.id AND k.kind = 'marked';

    IF now_ids IS NOT NULL THEN
        PERFORM 1 FROM {schema}.cancel_finish(now_ids, now_hooks, cancel.reason, true);
    END IF;

    RETURN QUERY
        SELECT i.id, i.parent_id, i.status,
               CASE WHEN k.kind <> 'now' THEN k.kind
                    WHEN i.status = 'cancelled' THEN 'cancelled' ELSE 'cancelling' END
        FROM unnest(all_ids, kinds) AS k(id, kind)
        JOIN {schema}.instances AS i ON i.id = k.id
        ORDER BY i.id <> root, i.id;
END
$$;

-- Put failed or cancelled instances back into the step they ended in (a cancelled one
-- that went to its on_cancel step: the step it was in when cancelled), runnable now, with
-- their stored state; attempt and crashes start again from zero, last_error stays until
-- the next outcome overwrites it. Per row, outcome: 'retried'; 'children' (it has live
-- children: retry once they ended); 'key' (its correlation key is held by another live
-- instance); 'compensated' (version 8: it compensated its completed steps, so the step it
-- failed in cannot simply run again — rewind it); else the status that refused it ('executing', 'runnable', 'done', …). Rows
-- that do not exist return nothing.
CREATE OR REPLACE FUNCTION {schema}.retry(ids bigint[])
    RETURNS TABLE (instance_id bigint, outcome text, status text, step text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    all_ids bigint[];
    kinds text[];
    ok bigint[];
BEGIN
    PERFORM 1 FROM {schema}.instances AS i WHERE i.id = ANY(retry.ids) ORDER BY i.id
    FOR NO KEY UPDATE;
    SELECT array_agg(i.id ORDER BY i.id),
           array_agg(CASE
               WHEN i.status NOT IN ('failed', 'cancelled') THEN i.status
               WHEN i.saga->>'mode' IS NOT NULL THEN 'compensated'
               WHEN EXISTS (SELECT 1 FROM {schema}.instances AS c
                            WHERE c.parent_id = i.id AND c.status NOT IN ('done', 'failed', 'cancelled'))
                   THEN 'children'
               WHEN i.correlation_key IS NOT NULL AND 'runnable' = ANY(i.correlation_scope)
                    AND EXISTS (SELECT 1 FROM {schema}.instances AS o
                                WHERE o.correlation_guard = i.correlation_key AND o.id <> i.id)
                   THEN 'key'
               ELSE 'retried' END ORDER BY i.id)
    INTO all_ids, kinds
    FROM {schema}.instances AS i WHERE i.id = ANY(retry.ids);
    SELECT array_agg(k.id) INTO ok FROM unnest(all_ids, kinds) AS k(id, kind) WHERE k.kind = 'retried';
    IF ok IS NOT NULL THEN
        PERFORM {schema}.reopen_joins(ok);
        UPDATE {schema}.instances AS i
        SET status = 'runnable', step = COALESCE(i.cancel_step, i.step), attempt = 0, crashes = 0,
            eligible_at = now(), result = NULL, awaits = NULL, await_deadline = NULL,
            children_pending = 0, concurrency_shard = NULL,
            cancel_reason = NULL, cancel_requested = NULL, cancel_step = NULL,
            locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE i.id = ANY(ok);
        PERFORM pg_notify({schema}.notify_channel(q), '')
        FROM (SELECT DISTINCT i.queue FROM {schema}.instances AS i WHERE i.id = ANY(ok)) AS w(q);
    END IF;
    RETURN QUERY
        SELECT i.id, k.kind, i.status, i.step
        FROM unnest(all_ids, kinds) AS k(id, kind) JOIN {schema}.instances AS i ON i.id = k.id
        ORDER BY i.id;
END
$$;

-- rewind: as in version 7; the instance starts afresh, so its compensation stack is
-- dropped.
CREATE OR REPLACE FUNCTION {schema}.rewind(target_id bigint, to_step text, new_state jsonb DEFAULT NULL)
    RETURNS TABLE (outcome text, status text, version integer, steps text[], state_from text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    r record;
    m record;
    finished boolean;
    chosen jsonb;
    source text;
BEGIN
    SELECT i.id, i.fsm, i.version, i.status, i.queue, i.correlation_key, i.correlation_scope
    INTO r FROM {schema}.instances AS i WHERE i.id = rewind.target_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.status = 'executing' THEN
        RETURN QUERY SELECT 'executing', r.status, r.version, NULL::text[], NULL::text;
        RETURN;
    END IF;
    SELECT mm.version, mm.steps INTO m FROM {schema}.machines AS mm
    WHERE mm.name = r.fsm AND (r.version IS NULL OR mm.version = r.version)
    ORDER BY mm.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_machine', r.status, r.version, NULL::text[], NULL::text;
        RETURN;
    END IF;
    IF NOT (rewind.to_step = ANY(m.steps)) THEN
        RETURN QUERY SELECT 'unknown_step', r.status, m.version, m.steps, NULL::text;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.instances AS c
               WHERE c.parent_id = r.id AND c.status NOT IN ('done', 'failed', 'cancelled')) THEN
        RETURN QUERY SELECT 'children', r.status, r.version, NULL::text[], NULL::text;
        RETURN;
    END IF;
    finished := r.status IN ('done', 'failed', 'cancelled');
    IF finished AND r.correlation_key IS NOT NULL AND 'runnable' = ANY(r.correlation_scope)
       AND EXISTS (SELECT 1 FROM {schema}.instances AS o
                   WHERE o.correlation_guard = r.correlation_key AND o.id <> r.id) THEN
        RETURN QUERY SELECT 'key', r.status, r.version, NULL::text[], NULL::text;
        RETURN;
    END IF;
    IF rewind.new_state IS NOT NULL THEN
        chosen := rewind.new_state;
        source := 'given';
    ELSE
        -- history_instance (instance_id, started_at) serves this: the instance's rows,
        -- newest first, filtered on the step.
        SELECT h.state INTO chosen FROM {schema}.history AS h
        WHERE h.instance_id = r.id AND h.step = rewind.to_step AND h.state IS NOT NULL
        ORDER BY h.started_at DESC LIMIT 1;
        source := CASE WHEN chosen IS NULL THEN 'stored' ELSE 'history' END;
    END IF;
    IF finished THEN
        PERFORM {schema}.reopen_joins(ARRAY[r.id]);
    END IF;
    UPDATE {schema}.instances AS i
    SET status = 'runnable', version = m.version, step = rewind.to_step,
        state = COALESCE(chosen, i.state), attempt = 0, crashes = 0,
        eligible_at = now(), result = NULL, awaits = NULL, await_deadline = NULL,
        children_pending = 0, concurrency_shard = NULL, rate_limit = NULL, weight = 1,
        cancel_reason = NULL, cancel_requested = NULL, cancel_step = NULL, saga = NULL,
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE i.id = r.id;
    PERFORM pg_notify({schema}.notify_channel(r.queue), '');
    RETURN QUERY SELECT 'rewound', 'runnable'::text, m.version, m.steps, source;
END
$$;
