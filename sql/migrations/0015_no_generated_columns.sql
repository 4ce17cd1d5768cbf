-- pgdurable schema, version 15: no stored generated columns on the instance table.

-- A stored generated column is computed by re-forming the whole row on every insert and on
-- every update, whatever the statement changed: measured with perf on PostgreSQL 15, 12 %
-- of a bulk insert's server time (the COPY of insert_many) and 2.5 % of the drain's. The
-- two the table had:
--
-- correlation_guard (the key while the status is in the scope) served one unique index;
-- that index is now partial on the same condition, and its readers name the condition
-- (`correlation_key = $k AND status = ANY(correlation_scope)`, which the planner proves
-- against the predicate, so the lookups still use it).
--
-- concurrency_name (the key's name, before its first ':') was read by the claim only,
-- which now computes it for the rows it considers.
--
-- Dropping a column rewrites nothing; the new unique index is built before the old one is
-- gone (one transaction: no moment without the guarantee).
CREATE UNIQUE INDEX instances_correlation_live ON {schema}.instances (correlation_key)
    WHERE correlation_key IS NOT NULL AND status = ANY (correlation_scope);
ALTER TABLE {schema}.instances DROP COLUMN correlation_guard, DROP COLUMN concurrency_name;
ALTER INDEX {schema}.instances_correlation_live RENAME TO instances_correlation;

-- The functions that found a row by its live key, with the condition spelled out (their
-- bodies are otherwise those of version 8).

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
        WHERE i.correlation_key = cancel.target_key AND i.status = ANY(i.correlation_scope);
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
                                WHERE o.correlation_key = i.correlation_key
                                  AND o.status = ANY(o.correlation_scope) AND o.id <> i.id)
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
                   WHERE o.correlation_key = r.correlation_key
                     AND o.status = ANY(o.correlation_scope) AND o.id <> r.id) THEN
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
