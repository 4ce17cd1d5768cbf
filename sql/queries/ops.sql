-- The statements of the `pgdurable` command (pgdurable/ops/cli/). None of them runs on a
-- worker's hot path; each says what it reads on a big table. Filters arrive as parameters
-- (NULL: no filter) and the command runs them unprepared, so every run gets a plan for
-- the values it was given: a filter left NULL folds away and the rest can use an index.

-- name: ops_status_queues
-- Per queue, what the partial indexes hold, without a sequential scan: runnable rows, the
-- due ones and the oldest due row's wait (instances_pick, an index-only scan: cost grows
-- with the runnable rows), executing rows and the ones whose lease expired
-- (instances_lease: the executing rows, bounded by the workers' concurrency), held rows
-- (instances_held), and the rows that finished within %(window)s (instances_gc, a range
-- scan: the rows finished in the window). Plus every queue a registered machine names
-- (the machines table, a handful of rows). Rows awaiting a signal or children are in no
-- index that names their queue: ops_status_awaiting counts them, with a scan. Whether the
-- queue is paused: one primary-key probe of the queues table per queue.
WITH runnable AS (
    SELECT queue, count(*) AS runnable,
           count(*) FILTER (WHERE eligible_at <= now()) AS due,
           min(eligible_at) FILTER (WHERE eligible_at <= now()) AS oldest_due,
           min(eligible_at) FILTER (WHERE eligible_at > now()) AS next_due
    FROM {schema}.instances
    WHERE status = 'runnable'
    GROUP BY queue
), executing AS (
    SELECT queue, count(*) AS executing,
           count(*) FILTER (WHERE lease_expires_at < now()) AS expired
    FROM {schema}.instances
    WHERE status = 'executing' AND lease_expires_at IS NOT NULL
    GROUP BY queue
), held AS (
    SELECT queue, count(*) AS held
    FROM {schema}.instances
    WHERE status = 'held'
    GROUP BY queue
), finished AS (
    SELECT queue,
           count(*) FILTER (WHERE status = 'done') AS done,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           max(updated_at) AS last_finished
    FROM {schema}.instances
    WHERE status IN ('done', 'failed', 'cancelled') AND updated_at >= now() - %(window)s::interval
    GROUP BY queue
), queues AS (
    SELECT queue FROM runnable UNION SELECT queue FROM executing UNION SELECT queue FROM held
    UNION SELECT queue FROM finished UNION SELECT queue FROM {schema}.machines
    UNION SELECT name FROM {schema}.queues WHERE paused
)
SELECT q.queue,
       ARRAY(SELECT DISTINCT m.name FROM {schema}.machines AS m WHERE m.queue = q.queue
             ORDER BY m.name) AS machines,
       COALESCE(r.runnable, 0) AS runnable, COALESCE(r.due, 0) AS due,
       EXTRACT(EPOCH FROM now() - r.oldest_due)::float8 AS oldest_due_age,
       EXTRACT(EPOCH FROM r.next_due - now())::float8 AS next_due_in,
       COALESCE(e.executing, 0) AS executing, COALESCE(e.expired, 0) AS expired,
       COALESCE(h.held, 0) AS held,
       COALESCE(f.done, 0) AS done, COALESCE(f.failed, 0) AS failed,
       COALESCE(f.cancelled, 0) AS cancelled,
       EXTRACT(EPOCH FROM now() - f.last_finished)::float8 AS last_finished_age,
       COALESCE((SELECT p.paused FROM {schema}.queues AS p WHERE p.name = q.queue), false) AS paused
FROM queues AS q
LEFT JOIN runnable AS r ON r.queue = q.queue
LEFT JOIN executing AS e ON e.queue = q.queue
LEFT JOIN held AS h ON h.queue = q.queue
LEFT JOIN finished AS f ON f.queue = q.queue
ORDER BY q.queue;

-- name: ops_status_awaiting
-- Per queue, the rows awaiting a signal or their children. No index names their queue (the
-- await-deadline index holds only awaits with a timeout), so this is one sequential scan
-- of the table: `pgdurable status --awaiting` asks for it.
SELECT queue,
       count(*) FILTER (WHERE status = 'awaiting_signal') AS awaiting_signal,
       count(*) FILTER (WHERE status = 'awaiting_children') AS awaiting_children
FROM {schema}.instances
WHERE status IN ('awaiting_signal', 'awaiting_children')
GROUP BY queue
ORDER BY queue;

-- name: ops_status_owners
-- Who holds executing rows, per queue and owner (HOST:KEY:PID:RANDOM/queue/index/pid for a
-- supervisor's worker): rows held, and whether the lease is still running. The executing
-- rows only (instances_lease), bounded by the workers' concurrency.
SELECT queue, locked_by AS owner, count(*) AS rows,
       bool_or(lease_expires_at >= now()) AS live,
       EXTRACT(EPOCH FROM now() - max(updated_at))::float8 AS last_claim_age
FROM {schema}.instances
WHERE status = 'executing' AND lease_expires_at IS NOT NULL
GROUP BY queue, locked_by
ORDER BY queue, locked_by;

-- name: ops_status_listeners
-- Worker processes connected to this database, per queue: each holds one feeder connection
-- (application_name 'pgdurable feeder QUEUE', which LISTENs and claims), seen in
-- pg_stat_activity (server memory, no table read; the name is visible to every role). The
-- name carries no schema: two schemas of one database with a queue of the same name share
-- their count.
SELECT substr(application_name, 18) AS queue, count(*) AS feeders
FROM pg_stat_activity
WHERE datname = current_database() AND left(application_name, 17) = 'pgdurable feeder '
GROUP BY 1
ORDER BY 1;

-- name: ops_machines_registered
-- Every machine and version the supervisors registered (a small table, read whole).
SELECT name, version, queue, initial_step, steps,
       EXTRACT(EPOCH FROM now() - updated_at)::float8 AS registered_age,
       version = max(version) OVER (PARTITION BY name) AS newest
FROM {schema}.machines
ORDER BY name, version;

-- name: ops_instance_list
-- A page of instances, newest id first, below the cursor %(cursor)s (keyset paging: the
-- next page starts below the last id shown). Every filter is a parameter, NULL for none:
-- machine, queue, statuses, correlation key, and a time window on updated_at (or
-- inserted_at when %(on_inserted)s), each bound given as an absolute time (_at) or as an
-- interval before now() (_ago). Cost: the planner's choice for the values given; without a
-- selective index it walks the primary key backwards from the cursor and stops once it has
-- %(limit)s rows, so a filter that matches few rows walks further (a terminal status with
-- --since can use instances_gc, a live one the partial index of its status).
SELECT id, fsm, version, step, status, queue, priority, attempt, crashes, correlation_key,
       EXTRACT(EPOCH FROM now() - updated_at)::float8 AS updated_age,
       EXTRACT(EPOCH FROM now() - inserted_at)::float8 AS inserted_age,
       updated_at, inserted_at, left(last_error, 2000) AS last_error
FROM {schema}.instances
WHERE (%(cursor)s::bigint IS NULL OR id < %(cursor)s::bigint)
  AND (%(machine)s::text IS NULL OR fsm = %(machine)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(key)s::text IS NULL OR correlation_key = %(key)s::text)
  AND (%(since_at)s::timestamptz IS NULL
       OR CASE WHEN %(on_inserted)s THEN inserted_at ELSE updated_at END >= %(since_at)s::timestamptz)
  AND (%(since_ago)s::interval IS NULL
       OR CASE WHEN %(on_inserted)s THEN inserted_at ELSE updated_at END
          >= now() - %(since_ago)s::interval)
  AND (%(until_at)s::timestamptz IS NULL
       OR CASE WHEN %(on_inserted)s THEN inserted_at ELSE updated_at END < %(until_at)s::timestamptz)
  AND (%(until_ago)s::interval IS NULL
       OR CASE WHEN %(on_inserted)s THEN inserted_at ELSE updated_at END
          < now() - %(until_ago)s::interval)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: ops_instance_id_by_key
-- The instance a correlation key names: the live holder of the key (instances_correlation,
-- one probe); else the newest row that ever carried it, finished or outside its scope (a
-- backward walk of the primary key until one is found: the whole table for a key that no
-- row carries). The second lookup runs only when the first finds nothing.
SELECT COALESCE(
    (SELECT id FROM {schema}.instances
     WHERE correlation_key = %(key)s::text AND status = ANY (correlation_scope)),
    (SELECT id FROM {schema}.instances WHERE correlation_key = %(key)s::text
     ORDER BY id DESC LIMIT 1)) AS id;

-- name: ops_instance_show
-- One instance, every column an operator reads, by primary key; with its parent's id,
-- machine, step and status (a second primary-key probe).
SELECT i.id, i.fsm, i.version, i.step, i.status, i.queue, i.priority, i.attempt, i.crashes,
       i.state::text AS state, i.result::text AS result, i.last_error,
       i.awaits, i.await_deadline, i.parent_id, i.children_pending,
       i.correlation_key, i.correlation_scope, i.concurrency_key, i.concurrency_shard,
       i.rate_limit, i.weight, i.locked_by, i.lease_expires_at,
       i.eligible_at, i.inserted_at, i.updated_at, now() AS now, i.saga::text AS saga,
       p.fsm AS parent_fsm, p.step AS parent_step, p.status AS parent_status
FROM {schema}.instances AS i
LEFT JOIN {schema}.instances AS p ON p.id = i.parent_id
WHERE i.id = %(id)s;

-- name: ops_instance_inbox
-- The first %(limit)s signals of an instance's inbox, oldest first, and how many there are
-- (signals_target: the instance's signals only).
SELECT s.id, s.name, s.payload::text AS payload, s.dedup_key, s.inserted_at,
       count(*) OVER () AS total
FROM {schema}.signals AS s
WHERE s.target_id = %(id)s
ORDER BY s.id
LIMIT %(limit)s;

-- name: ops_instance_children
-- The first %(limit)s children of an instance by id, and their count per status
-- (instances_parent: that parent's children only).
WITH kids AS (
    SELECT id, fsm, version, step, status, updated_at
    FROM {schema}.instances
    WHERE parent_id = %(id)s
)
SELECT k.id, k.fsm, k.version, k.step, k.status, k.updated_at,
       (SELECT json_object_agg(status, n)::text
        FROM (SELECT status, count(*) AS n FROM kids GROUP BY status) AS c) AS counts
FROM kids AS k
ORDER BY k.id
LIMIT %(limit)s;

-- name: ops_cleanup_count
-- How many finished rows (of %(statuses)s, all terminal) are older than %(older)s, per
-- status, sparing finished children of a live parent like GC does: what `pgdurable
-- cleanup --dry-run` reports. A range scan of instances_gc up to the cutoff (the rows a
-- real run would delete) and a primary-key probe per row that has a parent (a parent
-- already collected counts as finished). The parent test is a scalar subquery so that it
-- stays a probe: written as NOT EXISTS, the planner may turn it into an anti-join or a
-- hashed subplan over every live row, a scan of the whole table.
SELECT i.status, count(*) AS n
FROM {schema}.instances AS i
WHERE i.status IN ('done', 'failed', 'cancelled')
  AND i.status = ANY(%(statuses)s::text[])
  AND i.updated_at < now() - %(older)s::interval
  AND (i.parent_id IS NULL
       OR COALESCE((SELECT p.status IN ('done', 'failed', 'cancelled')
                    FROM {schema}.instances AS p WHERE p.id = i.parent_id), true))
GROUP BY i.status
ORDER BY i.status;

-- name: ops_cleanup_select_ids
-- A batch of finished rows (of %(statuses)s, all terminal) older than %(older)s, oldest
-- first, locked for deletion (SKIP LOCKED: GC running meanwhile takes other rows), sparing
-- finished children of a live parent. gc_select_ids with a status filter; deleted by
-- gc_delete_ids. Walks instances_gc in order and stops at the limit.
SELECT i.id, i.status
FROM {schema}.instances AS i
WHERE i.status IN ('done', 'failed', 'cancelled')
  AND i.status = ANY(%(statuses)s::text[])
  AND i.updated_at < now() - %(older)s::interval
  AND (i.parent_id IS NULL
       OR COALESCE((SELECT p.status IN ('done', 'failed', 'cancelled')
                    FROM {schema}.instances AS p WHERE p.id = i.parent_id), true))
ORDER BY i.updated_at
LIMIT %(limit)s
FOR UPDATE OF i SKIP LOCKED;

-- name: ops_check_live_shapes
-- What the live and held rows need of the code: each (machine, version, step, status,
-- queue) with its count. One sequential scan of the table (rows awaiting a signal or
-- children are in no index): `pgdurable check` runs it once per deploy.
SELECT fsm, version, step, status, queue, count(*) AS n
FROM {schema}.instances
WHERE status IN ('runnable', 'executing', 'awaiting_signal', 'awaiting_children', 'held')
GROUP BY fsm, version, step, status, queue
ORDER BY fsm, version, step, status, queue;
