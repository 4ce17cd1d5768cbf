-- pgdurable schema, version 7: a step attempt's history row keeps the state the step ran
-- with, so a rewind to a step can restore the state the instance had there.

-- The state the attempt received (NULL in rows written before version 7, and for a held
-- row whose state could not be read). Written by history_insert_many with the rest of
-- the row; TOASTed like instances.state when large.
ALTER TABLE {schema}.history ADD COLUMN state jsonb;

-- rewind(target_id, to_step, new_state): as in version 6, and when new_state is NULL the
-- state comes from the latest history row of the instance at to_step that kept one, else
-- (no history there: the step never ran, or its machine keeps none) the stored state.
-- state_from says which: 'given', 'history' or 'stored'.
DROP FUNCTION {schema}.rewind(bigint, text, jsonb);
CREATE FUNCTION {schema}.rewind(target_id bigint, to_step text, new_state jsonb DEFAULT NULL)
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
        cancel_reason = NULL, cancel_requested = NULL, cancel_step = NULL,
        locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE i.id = r.id;
    PERFORM pg_notify({schema}.notify_channel(r.queue), '');
    RETURN QUERY SELECT 'rewound', 'runnable'::text, m.version, m.steps, source;
END
$$;
