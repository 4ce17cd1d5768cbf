-- Time limits (docs/deadlines.md): the deadline sweep of the maintenance process
-- (pgdurable/runtime/sweeps/deadlines.py) and testing.drain run these; the functions are
-- those of migration 10.

-- name: deadline_expire
-- End up to %(limit)s runnable rows that were not started by their expires_at: failed, or
-- cancelled (on_expiry = 'cancel'). Returns the rows as they end.
SELECT instance_id, status, queue FROM {schema}.expire_unstarted(%(limit)s::int);

-- name: deadline_fail
-- Fail up to %(limit)s instances whose deadline passed, cancelling their live descendants;
-- an executing one is marked and fails when its step returns. Returns each instance with
-- its outcome ('failed' or 'marked').
SELECT instance_id, status, queue, outcome FROM {schema}.deadline_fail(%(limit)s::int);

-- name: deadline_next_due
-- Seconds until the next expiry or deadline falls due (negative: one is due already; NULL:
-- none), from the minimum of each partial index (instances_expiry, instances_deadline).
SELECT extract(epoch FROM least(
    (SELECT min(expires_at) FROM {schema}.instances
     WHERE status = 'runnable' AND expires_at IS NOT NULL),
    (SELECT min(deadline) FROM {schema}.instances
     WHERE deadline IS NOT NULL AND cancel_requested IS NULL AND cancel_reason IS NULL
       AND status NOT IN ('done', 'failed', 'cancelled'))) - clock_timestamp())::float8 AS due_in;
