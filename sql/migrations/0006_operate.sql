-- pgdurable schema, version 6: operating instances (cancel, retry, rewind) and pausing
-- queues. docs/operating.md describes the semantics; every function here is also what a
-- user may call from SQL.

-- cancel_reason: why the instance was cancelled, kept once it ended `cancelled`. While
-- the instance is live with a reason and no pending request, it runs its machine's
-- on_cancel step (it is "cancelling"): a terminal outcome then ends it `cancelled`.
-- cancel_requested: a cancel that found the row executing, settled when its step returns
-- ('hook': the on_cancel step may run; 'final': it may not). Every statement that takes a
-- row out of executing refuses a row that carries it; the owner then settles it
-- (cancel_settle). cancel_step: the step the instance was in when a cancel sent it to its
-- on_cancel step; retry resumes there.
ALTER TABLE {schema}.instances
    ADD COLUMN cancel_reason text,
    ADD COLUMN cancel_requested text,
    ADD COLUMN cancel_step text;
-- NOT VALID: every existing row holds NULL, so there is nothing to scan for.
ALTER TABLE {schema}.instances ADD CONSTRAINT instances_cancel_requested_check
    CHECK (cancel_requested IN ('hook', 'final')) NOT VALID;

-- The step a cancel sends an instance of this machine version to (FSM.on_cancel), NULL:
-- none. Registered by the supervisors with the rest of the machine.
ALTER TABLE {schema}.machines ADD COLUMN on_cancel text;

-- Queues an operator paused: their workers claim nothing (instance_claim checks this
-- table by primary key once per claim) until resumed. A queue without a row runs.
CREATE TABLE {schema}.queues (
    name       text        PRIMARY KEY,
    paused     boolean     NOT NULL DEFAULT false,
    paused_at  timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Cancel the given rows now; the caller has locked them (in an order that cannot deadlock
-- with a flush: children before parents) and knows none is executing, or settles rows
-- whose step returned. hooks[i]: whether row i may go to its machine's on_cancel step. A
-- row that may and whose machine version declares one becomes runnable at that step
-- (awaiting its live children first, if it has any); any other row ends `cancelled`.
-- Either way: its inbox is cleared, a gate slot it held is given back, its lease and
-- awaits are dropped. With do_join, the parents of rows that ended are counted as for any
-- terminal child (their join, in id order, as instance_join_parents_many does); without,
-- the caller joins them with the rest of its transaction. Returns the rows as they end.
CREATE FUNCTION {schema}.cancel_finish(ids bigint[], hooks boolean[], reason text, do_join boolean)
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
               COALESCE(h.hook AND m.on_cancel IS NOT NULL, false) AS divert,
               m.version AS mversion, m.on_cancel
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
-- ('marked'); running its on_cancel step already: left to finish it ('cancelling') unless
-- compensate is false; any other live row: cancelled now (cancel_finish) — 'cancelled',
-- or 'cancelling' when it went to its on_cancel step. Returns the instance first, then
-- its descendants; no row when there is no such instance (or no live holder of the key).
CREATE FUNCTION {schema}.cancel(target_id bigint DEFAULT NULL, target_key text DEFAULT NULL,
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
               WHEN i.cancel_requested IS NULL AND i.cancel_reason IS NOT NULL AND cancel.compensate
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

-- Settle the cancel of executing rows whose step returned (or will not run): rows of
-- `ids` still executing under `worker` with the matching token of `tokens` that carry a
-- cancel request are cancelled, or sent to their on_cancel step when the request allows
-- it (cancel_finish). A NULL worker skips the ownership check: for a caller that holds the
-- rows already (the reclaim of a dead worker's rows). Returns the settled rows.
CREATE FUNCTION {schema}.cancel_settle(worker text, ids bigint[], tokens bigint[], do_join boolean)
    RETURNS TABLE (instance_id bigint, parent_id bigint, status text, queue text)
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    s_ids bigint[];
    s_hooks boolean[];
BEGIN
    SELECT array_agg(l.id ORDER BY l.id), array_agg(l.hook ORDER BY l.id) INTO s_ids, s_hooks
    FROM (SELECT i.id, i.cancel_requested = 'hook' AS hook
          FROM {schema}.instances AS i
          JOIN unnest(cancel_settle.ids, cancel_settle.tokens) AS u(id, token) ON u.id = i.id
          WHERE i.status = 'executing' AND i.cancel_requested IS NOT NULL
            AND (cancel_settle.worker IS NULL
                 OR (i.locked_by = cancel_settle.worker AND i.lease_token = u.token))
          ORDER BY i.id
          FOR NO KEY UPDATE OF i) AS l;
    IF s_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM {schema}.cancel_finish(s_ids, s_hooks, NULL, do_join);
END
$$;

-- Rows going from finished back to live (retry, rewind) with a parent: a parent awaiting
-- its children waits for them again (children_pending + n); a live parent that has moved
-- on no longer counts them (they are detached: parent_id cleared, so their end cannot
-- wake it while it waits on later children); a finished parent keeps them (its own retry
-- or rewind is refused while they live). Parents are locked in id order.
CREATE FUNCTION {schema}.reopen_joins(ids bigint[])
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
BEGIN
    WITH p AS (
        SELECT i.parent_id AS id, count(*)::int AS n FROM {schema}.instances AS i
        WHERE i.id = ANY(reopen_joins.ids) AND i.parent_id IS NOT NULL
        GROUP BY i.parent_id
    ), locked AS (
        SELECT pp.id FROM {schema}.instances AS pp JOIN p ON p.id = pp.id
        ORDER BY pp.id FOR NO KEY UPDATE OF pp
    )
    UPDATE {schema}.instances AS pp
    SET children_pending = pp.children_pending + p.n, updated_at = now()
    FROM p
    WHERE pp.id = p.id AND pp.id IN (SELECT id FROM locked) AND pp.status = 'awaiting_children';

    UPDATE {schema}.instances AS c
    SET parent_id = NULL
    WHERE c.id = ANY(reopen_joins.ids) AND c.parent_id IS NOT NULL
      AND EXISTS (SELECT 1 FROM {schema}.instances AS pp
                  WHERE pp.id = c.parent_id
                    AND pp.status IN ('runnable', 'executing', 'awaiting_signal', 'held'));
END
$$;

-- Put failed or cancelled instances back into the step they ended in (a cancelled one
-- that went to its on_cancel step: the step it was in when cancelled), runnable now, with
-- their stored state; attempt and crashes start again from zero, last_error stays until
-- the next outcome overwrites it. Per row, outcome: 'retried'; 'children' (it has live
-- children: retry once they ended); 'key' (its correlation key is held by another live
-- instance); else the status that refused it ('executing', 'runnable', 'done', …). Rows
-- that do not exist return nothing.
CREATE FUNCTION {schema}.retry(ids bigint[])
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

-- Move an instance that no worker holds back to a step of its machine version (a step the
-- machines table registered for it), runnable now, with new_state (NULL: the stored
-- state). Live or finished; not executing. Outcome: 'rewound'; 'executing'; 'children'
-- (it has live children); 'key' (finished, and its correlation key is held by another
-- live instance); 'unknown_machine' (no version of it is registered); 'unknown_step'
-- (steps: the registered ones). No row: no such instance.
CREATE FUNCTION {schema}.rewind(target_id bigint, to_step text, new_state jsonb DEFAULT NULL)
    RETURNS TABLE (outcome text, status text, version integer, steps text[])
    LANGUAGE plpgsql VOLATILE
    AS $$
#variable_conflict use_column
DECLARE
    r record;
    m record;
    finished boolean;
BEGIN
    SELECT i.id, i.fsm, i.version, i.status, i.queue, i.correlation_key, i.correlation_scope
    INTO r FROM {schema}.instances AS i WHERE i.id = rewind.target_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.status = 'executing' THEN
        RETURN QUERY SELECT 'executing', r.status, r.version, NULL::text[];
        RETURN;
    END IF;
    SELECT mm.version, mm.steps INTO m FROM {schema}.machines AS mm
    WHERE mm.name = r.fsm AND (r.version IS NULL OR mm.version = r.version)
    ORDER BY mm.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_machine', r.status, r.version, NULL::text[];
        RETURN;
    END IF;
    IF NOT (rewind.to_step = ANY(m.steps)) THEN
        RETURN QUERY SELECT 'unknown_step', r.status, m.version, m.steps;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.instances AS c
               WHERE c.parent_id = r.id AND c.status NOT IN ('done', 'failed', 'cancelled')) THEN
        RETURN QUERY SELECT 'children', r.status, r.version, NULL::text[];
        RETURN;
    END IF;
    finished := r.status IN ('done', 'failed', 'cancelled');
    IF finished AND r.correlation_key IS NOT NULL AND 'runnable' = ANY(r.correlation_scope)
       AND EXISTS (SELECT 1 FROM {schema}.instances AS o
                   WHERE o.correlation_guard = r.correlation_key AND o.id <> r.id) THEN
        RETURN QUERY SELECT 'key', r.status, r.version, NULL::text[];
        RETURN;
    END IF;
    IF finished THEN
        PERFORM {schema}.reopen_joins(ARRAY[r.id]);
    END IF;
    UPDATE {schema}.instances AS i
    SET status = 'runnable', version = m.version, step = rewind.to_step,
        state = COALESCE(rewind.new_state, i.state), attempt = 0, crashes = 0,
        eligible_at = now(), result = NULL, awaits = NULL, await_deadline = NULL,
        children_pending = 0, concurrency_shard = NULL, rate_limit = NULL, weight = 1,
        cancel_reason = NULL, cancel_requested = NULL, cancel_step = NULL,
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE i.id = r.id;
    PERFORM pg_notify({schema}.notify_channel(r.queue), '');
    RETURN QUERY SELECT 'rewound', 'runnable'::text, m.version, m.steps;
END
$$;
