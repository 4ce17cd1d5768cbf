-- name: gate_slots_ensure_many
-- Create the shards of gate keys seen for the first time (full), and apply a changed limit
-- to existing shards without ever making `available` negative.
INSERT INTO {schema}.gate_slots AS g (key, shard, capacity, available)
SELECT u.key, u.shard, u.capacity, u.capacity
FROM unnest(%(keys)s::text[], %(shards)s::smallint[], %(capacities)s::int[]) AS u(key, shard, capacity)
ORDER BY u.key, u.shard
ON CONFLICT (key, shard) DO UPDATE
    SET capacity = excluded.capacity,
        available = GREATEST(0, LEAST(excluded.capacity, g.available + excluded.capacity - g.capacity))
    WHERE g.capacity <> excluded.capacity;

-- name: gate_slots_lock_many
-- Lock the shards with free slots of the given keys, in a fixed order; a shard another
-- picker holds right now is skipped, never waited for.
SELECT key, shard, available
FROM {schema}.gate_slots
WHERE key = ANY(%(keys)s::text[]) AND available > 0
ORDER BY key, shard
FOR UPDATE SKIP LOCKED;

-- name: gate_slots_take_many
-- Take slots from locked shards.
UPDATE {schema}.gate_slots AS g
SET available = g.available - u.n
FROM unnest(%(keys)s::text[], %(shards)s::smallint[], %(ns)s::int[]) AS u(key, shard, n)
WHERE g.key = u.key AND g.shard = u.shard;

-- name: gate_slots_credit_many
-- Give slots back (an outcome, a release or a reclaim took the row out of executing).
-- LEAST keeps a credit racing a reconciliation inside the CHECK.
UPDATE {schema}.gate_slots AS g
SET available = LEAST(g.capacity, g.available + u.n)
FROM (SELECT key, shard, sum(n)::int AS n
      FROM unnest(%(keys)s::text[], %(shards)s::smallint[], %(ns)s::int[]) AS x(key, shard, n)
      GROUP BY key, shard ORDER BY key, shard) AS u
WHERE g.key = u.key AND g.shard = u.shard;

-- name: rate_buckets_ensure_many
-- Create the shards of rate keys seen for the first time (full); apply a changed policy.
INSERT INTO {schema}.rate_buckets AS b (key, shard, capacity, rate, available)
SELECT u.key, u.shard, u.capacity, u.rate, u.capacity
FROM unnest(%(keys)s::text[], %(shards)s::smallint[], %(capacities)s::float8[], %(rates)s::float8[])
     AS u(key, shard, capacity, rate)
ORDER BY u.key, u.shard
ON CONFLICT (key, shard) DO UPDATE
    SET capacity = excluded.capacity, rate = excluded.rate,
        available = LEAST(excluded.capacity, b.available)
    WHERE b.capacity <> excluded.capacity OR b.rate <> excluded.rate;

-- name: rate_buckets_lock_many
-- Lock the shards of the given rate keys (fixed order, SKIP LOCKED) with their refilled
-- token count as of now.
SELECT key, shard,
       LEAST(capacity, available + rate * EXTRACT(EPOCH FROM clock_timestamp() - last_refill))::float8
           AS tokens
FROM {schema}.rate_buckets
WHERE key = ANY(%(keys)s::text[])
ORDER BY key, shard
FOR UPDATE SKIP LOCKED;

-- name: rate_buckets_set_many
-- Store the tokens left in locked shards after a grant, refilled as of now.
UPDATE {schema}.rate_buckets AS b
SET available = LEAST(b.capacity, GREATEST(0, u.tokens)), last_refill = clock_timestamp()
FROM unnest(%(keys)s::text[], %(shards)s::smallint[], %(tokens)s::float8[]) AS u(key, shard, tokens)
WHERE b.key = u.key AND b.shard = u.shard;

-- name: instance_admit_many
-- Apply the admission verdicts to freshly claimed rows this worker still owns: admitted
-- gate rows get their slot's shard; denied rows go back to runnable, deferred; rows whose
-- limit is misconfigured are held with the reason. A row a cancel marked is admitted (its
-- slot is given back when its cancel is settled) but neither denied nor held: admission
-- settles its cancel instead.
UPDATE {schema}.instances AS i
SET concurrency_shard = CASE WHEN u.verdict = 'admit' THEN u.shard END,
    status = CASE u.verdict WHEN 'admit' THEN i.status WHEN 'hold' THEN 'held' ELSE 'runnable' END,
    eligible_at = CASE WHEN u.verdict = 'deny' THEN now() + make_interval(secs => u.defer)
                       ELSE i.eligible_at END,
    last_error = CASE WHEN u.verdict = 'hold' THEN u.error ELSE i.last_error END,
    last_traceback = CASE WHEN u.verdict = 'hold' THEN NULL ELSE i.last_traceback END,
    locked_by = CASE WHEN u.verdict = 'admit' THEN i.locked_by END,
    lease_token = CASE WHEN u.verdict = 'admit' THEN i.lease_token END,
    lease_expires_at = CASE WHEN u.verdict = 'admit' THEN i.lease_expires_at END,
    updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(verdicts)s::text[], %(shards)s::smallint[],
            %(defers)s::float8[], %(errors)s::text[]) AS u(id, token, verdict, shard, defer, error)
WHERE i.id = u.id AND i.id = ANY(%(ids)s::bigint[]) AND i.locked_by = %(worker)s
  AND i.lease_token = u.token AND i.status = 'executing'
  AND (u.verdict = 'admit' OR i.cancel_requested IS NULL)
RETURNING i.id, i.status;

-- name: gate_slots_lock_all
-- GC, first of two statements in one transaction: lock every gate shard no picker holds.
SELECT key, shard FROM {schema}.gate_slots ORDER BY key, shard FOR UPDATE SKIP LOCKED;

-- name: gate_slots_reconcile_many
-- GC, second statement: with a snapshot taken after the locks, set the locked shards'
-- counters from the executing truth (available = capacity - holders). Any admission or
-- credit of these shards either committed before (and is counted) or waits for us.
WITH holders AS (
    SELECT concurrency_key AS key, concurrency_shard AS shard, count(*)::int AS n
    FROM {schema}.instances
    WHERE status = 'executing' AND concurrency_shard >= 0
      AND concurrency_key = ANY(%(keys)s::text[])
    GROUP BY 1, 2
)
UPDATE {schema}.gate_slots AS g
SET available = GREATEST(0, g.capacity - COALESCE(h.n, 0))
FROM unnest(%(keys)s::text[], %(shards)s::smallint[]) AS l(key, shard)
LEFT JOIN holders AS h ON h.key = l.key AND h.shard = l.shard
WHERE g.key = l.key AND g.shard = l.shard
  AND g.available <> GREATEST(0, g.capacity - COALESCE(h.n, 0))
RETURNING g.key, g.shard, g.available;

-- name: gate_slots_prune
-- Drop gate shards that are full and have no holder; re-created full on next use.
DELETE FROM {schema}.gate_slots AS g
USING (SELECT key, shard FROM {schema}.gate_slots WHERE available = capacity
       ORDER BY key, shard FOR UPDATE SKIP LOCKED) AS f
WHERE g.key = f.key AND g.shard = f.shard
  AND NOT EXISTS (SELECT 1 FROM {schema}.instances AS i
                  WHERE i.status = 'executing' AND i.concurrency_key = g.key
                    AND i.concurrency_shard = g.shard);

-- name: rate_buckets_prune
-- Drop buckets that have refilled completely: re-created full on next use, they are the same.
DELETE FROM {schema}.rate_buckets AS b
USING (SELECT key, shard FROM {schema}.rate_buckets
       WHERE available + rate * EXTRACT(EPOCH FROM clock_timestamp() - last_refill) >= capacity
       ORDER BY key, shard FOR UPDATE SKIP LOCKED) AS f
WHERE b.key = f.key AND b.shard = f.shard;
