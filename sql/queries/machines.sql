-- name: machine_register_many
-- Upsert the machines a worker knows, so producers can insert by name alone (and a cancel
-- finds a machine's on_cancel step, a rewind its steps, an insert its relative deadline).
INSERT INTO {schema}.machines (name, version, initial_step, queue, steps, on_cancel, deadline)
SELECT m.name, m.version, m.initial_step, m.queue,
       ARRAY(SELECT jsonb_array_elements_text(m.steps::jsonb)), m.on_cancel,
       make_interval(secs => m.deadline)
FROM unnest(%(names)s::text[], %(versions)s::int[], %(initials)s::text[], %(queues)s::text[],
            %(steps)s::text[], %(on_cancels)s::text[], %(deadlines)s::float8[])
     AS m(name, version, initial_step, queue, steps, on_cancel, deadline)
ORDER BY m.name, m.version
ON CONFLICT (name, version) DO UPDATE
    SET initial_step = excluded.initial_step, queue = excluded.queue, steps = excluded.steps,
        on_cancel = excluded.on_cancel, deadline = excluded.deadline, updated_at = now();

-- name: instance_release_held
-- Return to runnable the held rows whose machine and version this worker knows (after a
-- deploy added them); rows without a pinned version need only the name.
UPDATE {schema}.instances AS i
SET status = 'runnable', eligible_at = now(), last_error = NULL, last_traceback = NULL,
    updated_at = now()
FROM unnest(%(fsms)s::text[], %(versions)s::int[]) AS k(fsm, version)
WHERE i.status = 'held' AND i.fsm = k.fsm AND (i.version IS NULL OR i.version = k.version)
RETURNING i.id, i.queue;

-- name: machines_lookup
-- Every version of the named machines (insert_many by name completes rows from these).
SELECT name, version, initial_step, queue, extract(epoch FROM deadline)::float8 AS deadline
FROM {schema}.machines WHERE name = ANY(%(names)s::text[]);
