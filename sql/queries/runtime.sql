-- name: instance_lease_extend_many
-- Heartbeat: extend the lease of every row this worker holds, in one statement. Rows being
-- written right now are skipped this round rather than waited for.
UPDATE {schema}.instances AS i
SET lease_expires_at = now() + %(lease)s::interval
WHERE i.id IN (
    SELECT id FROM {schema}.instances
    WHERE id = ANY(%(ids)s::bigint[]) AND locked_by = %(worker)s AND status = 'executing'
    ORDER BY id
    FOR NO KEY UPDATE SKIP LOCKED)
RETURNING i.id;

-- name: instance_release_many
-- Give claimed rows back to runnable (graceful stop, a prefetch buffer, steps cancelled at
-- the drain deadline): attempt, crashes and eligible_at untouched; gate slots credited. A
-- row a cancel marked is not given back: the caller settles its cancel instead.
WITH released AS (
    UPDATE {schema}.instances AS i
    SET status = 'runnable', locked_by = NULL, lease_token = NULL, lease_expires_at = NULL,
        concurrency_shard = NULL, updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS u(id, token),
         {schema}.instances AS prev
    WHERE i.id = u.id AND prev.id = u.id AND i.id = ANY(%(ids)s::bigint[])
      AND i.locked_by = %(worker)s AND i.lease_token = u.token AND i.status = 'executing'
      AND i.cancel_requested IS NULL
    RETURNING i.id, i.queue, prev.concurrency_key AS key, prev.concurrency_shard AS shard
), credited AS (
    UPDATE {schema}.gate_slots AS g
    SET available = LEAST(g.capacity, g.available + c.n)
    FROM (SELECT key, shard, count(*)::int AS n FROM released WHERE shard >= 0
          GROUP BY key, shard ORDER BY key, shard) AS c
    WHERE g.key = c.key AND g.shard = c.shard
    RETURNING 1
)
SELECT r.id, pg_notify({schema}.notify_channel(r.queue), '')::text AS notified,
       (SELECT count(*) FROM credited) AS credited
FROM released AS r;

-- name: instance_next_eligible
-- Seconds until the earliest runnable row of a queue becomes due (``wait``, NULL: none; zero
-- or less: due now), and until the earliest row that is not due yet becomes due
-- (``wait_future``), so a worker sleeps exactly that long even while due rows are held by
-- someone else. The pick index is ordered by priority first, so this skips from one
-- priority to the next and reads the earliest rows of each: a few index probes, however
-- many rows are scheduled. A paused queue has nothing due (NULL, NULL): its idle workers
-- sleep until resumed (the resume notifies them) or the poll ceiling.
WITH RECURSIVE prio AS (
    (SELECT priority FROM {schema}.instances
     WHERE status = 'runnable' AND queue = %(queue)s
       AND NOT EXISTS (SELECT 1 FROM {schema}.queues AS p WHERE p.name = %(queue)s AND p.paused)
     ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT (SELECT i.priority FROM {schema}.instances AS i
            WHERE i.status = 'runnable' AND i.queue = %(queue)s AND i.priority > prio.priority
            ORDER BY i.priority LIMIT 1)
    FROM prio WHERE prio.priority IS NOT NULL
)
SELECT EXTRACT(EPOCH FROM (min(
           (SELECT i.eligible_at FROM {schema}.instances AS i
            WHERE i.status = 'runnable' AND i.queue = %(queue)s AND i.priority = prio.priority
            ORDER BY i.eligible_at LIMIT 1)) - now()))::float8 AS wait,
       EXTRACT(EPOCH FROM (min(
           (SELECT i.eligible_at FROM {schema}.instances AS i
            WHERE i.status = 'runnable' AND i.queue = %(queue)s AND i.priority = prio.priority
              AND i.eligible_at > now()
            ORDER BY i.eligible_at LIMIT 1)) - now()))::float8 AS wait_future
FROM prio WHERE prio.priority IS NOT NULL;

-- name: instance_reclaim
-- Return executing rows to runnable because their worker died: rows of the given workers,
-- rows of dead supervisor incarnations (owner prefix), and, when asked, rows whose lease
-- expired. A reclaim counts as a crash of the step only for rows whose step had started
-- (``crashed`` ids, or every row when ``count_all``: nobody knows better); rows that were
-- merely prefetched go back untouched. Past its machine's max_crashes the instance fails.
-- A row taken only because its lease expired is not charged a crash when its lease was last
-- renewed before the server started (``lease`` is the lease length): its owner could not
-- renew it while the database was down, which says nothing about its step.
-- Ordered SKIP LOCKED: safe with several supervisors at once. A row a cancel marked is not
-- reclaimed but returned with status 'marked', still locked: the caller settles its cancel
-- in the same transaction (instance_cancel_settle_many). A row running its on_cancel step
-- that reaches max_crashes ends `cancelled`, as any end of that step does. An instance
-- with completed steps to compensate compensates them instead of failing, and one whose
-- compensation reaches max_crashes goes on to the next (docs/sagas.md).
WITH victims AS (
    SELECT id, fsm, version, concurrency_key, concurrency_shard, crashes, step, saga,
           cancel_requested IS NOT NULL AS marked,
           (%(count_all)s OR id = ANY(%(crashed)s::bigint[]))
           AND NOT (locked_by <> ALL(%(workers)s::text[])
                    AND split_part(locked_by, '/', 1) <> ALL(%(nodes)s::text[])
                    AND lease_expires_at - %(lease)s::interval < pg_postmaster_start_time())
           AS crashed
    FROM {schema}.instances
    WHERE status = 'executing' AND lease_expires_at IS NOT NULL  -- the lease index
      AND (locked_by = ANY(%(workers)s::text[])
        OR split_part(locked_by, '/', 1) = ANY(%(nodes)s::text[])
        OR (%(expired)s AND lease_expires_at < now()))
    ORDER BY id
    FOR NO KEY UPDATE SKIP LOCKED
), limits AS (
    SELECT * FROM unnest(%(fsms)s::text[], %(versions)s::int[], %(max_crashes)s::int[])
        AS l(fsm, version, max_crashes)
), decided AS (
    SELECT v.*, v.crashed AND v.crashes + 1 >= COALESCE(l.max_crashes, %(default_max)s) AS dies
    FROM victims AS v
    LEFT JOIN limits AS l ON l.fsm = v.fsm AND l.version = v.version
), fates AS (
    -- Past max_crashes, an instance with completed steps to compensate starts compensating
    -- (docs/sagas.md); a compensation that reaches it gives up and the next one is due.
    SELECT d.*,
           CASE WHEN NOT d.dies THEN d.saga
                WHEN {schema}.saga_due(d.saga)
                    THEN {schema}.saga_begin(d.saga, d.step, format('worker died %%s times in step %%s',
                                                                    d.crashes + 1, d.step))
                WHEN d.saga->>'mode' = 'compensating' THEN {schema}.saga_give_up(d.saga)
                ELSE d.saga END AS new_saga
    FROM decided AS d
), reclaimed AS (
UPDATE {schema}.instances AS i
SET crashes = CASE WHEN f.dies AND f.new_saga->>'mode' = 'compensating' THEN 0
                   ELSE i.crashes + f.crashed::int END,
    status = CASE WHEN f.dies AND f.new_saga->>'mode' IS DISTINCT FROM 'compensating'
                  THEN CASE WHEN i.cancel_reason IS NOT NULL THEN 'cancelled' ELSE 'failed' END
                  ELSE 'runnable' END,
    step = CASE WHEN f.dies AND f.new_saga->>'mode' = 'compensating'
                THEN f.new_saga->'stack'->>-1 ELSE i.step END,
    attempt = CASE WHEN f.dies AND f.new_saga->>'mode' = 'compensating' THEN 0 ELSE i.attempt END,
    saga = f.new_saga,
    last_error = CASE
        WHEN NOT f.crashed THEN i.last_error
        WHEN f.dies AND f.saga->>'mode' = 'compensating' THEN f.saga->>'error'
        WHEN f.dies THEN format('worker died %%s times in step %%s', i.crashes + 1, i.step)
        ELSE format('reclaimed from %%s (worker died or lease expired) in step %%s',
                    i.locked_by, i.step) END,
    last_traceback = CASE WHEN f.crashed THEN NULL ELSE i.last_traceback END,
    eligible_at = now(), locked_by = NULL, lease_token = NULL, lease_expires_at = NULL,
    concurrency_shard = NULL, updated_at = now()
FROM fates AS f
WHERE i.id = f.id AND NOT f.marked
RETURNING i.id, i.status, i.parent_id, i.queue, f.concurrency_key AS key, f.concurrency_shard AS shard
), credited AS (
    UPDATE {schema}.gate_slots AS g
    SET available = LEAST(g.capacity, g.available + c.n)
    FROM (SELECT key, shard, count(*)::int AS n FROM reclaimed WHERE shard >= 0
          GROUP BY key, shard ORDER BY key, shard) AS c
    WHERE g.key = c.key AND g.shard = c.shard
    RETURNING 1
)
SELECT r.id, r.status, r.parent_id,
       CASE WHEN r.status = 'runnable'
            THEN pg_notify({schema}.notify_channel(r.queue), '')::text END AS notified,
       (SELECT count(*) FROM credited) AS credited
FROM reclaimed AS r
UNION ALL
SELECT v.id, 'marked', NULL, NULL, 0 FROM victims AS v WHERE v.marked;

-- name: instance_node_owners
-- The supervisor incarnations of one node (owners starting with its HOST:KEY: prefix, see
-- pgdurable/runtime/identity.py) that hold executing rows.
SELECT DISTINCT split_part(locked_by, '/', 1) AS node
FROM {schema}.instances
WHERE status = 'executing' AND lease_expires_at IS NOT NULL  -- the lease index
  AND left(locked_by, length(%(prefix)s)) = %(prefix)s;

-- name: queue_channel
-- The NOTIFY channel a queue's workers LISTEN on.
SELECT {schema}.notify_channel(%(queue)s) AS channel;

-- name: session_synchronous_commit
-- Switch the session's commit durability ('on' or 'off'): an idle worker's feeder waits with
-- 'off', so the claim that follows a wake-up does not wait for a disk flush.
SELECT set_config('synchronous_commit', %(value)s, false);

-- name: session_plan_custom
-- Plan every statement of a worker's pooled connection for its own parameters: a generic plan
-- made while the instance table was small (a fresh install, a quiet queue) seq-scans it for
-- a flush's ids, and is kept after a burst grows the table until an ANALYZE invalidates it:
-- measured 73 ms a flush of 74 rows on 40,000 rows, against 0.6 ms probing the primary key.
-- Planning costs ~0.35 ms a flush (docs/performance.md).
SELECT set_config('plan_cache_mode', 'force_custom_plan', false);

-- name: queue_unserved
-- The queues of registered machines (their newest versions) that no worker process of
-- this database serves: no feeder connection named 'pgdurable feeder QUEUE' in
-- pg_stat_activity (see ops_status_listeners: the name carries no schema). Per queue: its
-- machines and its runnable rows, counted up to 10,001 (an index range of instances_pick,
-- bounded so that a large backlog costs the same).
WITH newest AS (
    SELECT DISTINCT ON (name) name, queue FROM {schema}.machines ORDER BY name, version DESC
), served AS (
    SELECT substr(application_name, 18) AS queue
    FROM pg_stat_activity
    WHERE datname = current_database() AND left(application_name, 17) = 'pgdurable feeder '
)
SELECT n.queue, array_agg(n.name ORDER BY n.name) AS machines,
       (SELECT count(*) FROM (SELECT 1 FROM {schema}.instances AS i
                              WHERE i.queue = n.queue AND i.status = 'runnable'
                              LIMIT 10001) AS r)::int AS runnable
FROM newest AS n
WHERE n.queue NOT IN (SELECT queue FROM served)
GROUP BY n.queue
ORDER BY n.queue;

-- name: snapshot_oldest
-- The oldest snapshot that holds back vacuum on this server, when it is older than
-- %(older)s seconds: a transaction of a session of this database (vacuum of this
-- database's tables waits only for those), a prepared transaction of it, or an inactive
-- replication slot (a physical one holds back every database). While it is held, the dead
-- versions of every row a worker updates stay in the tables and their indexes, and claims
-- and commits slow down as they pile up. One row or none.
SELECT kind, who, age_s, detail FROM (
    SELECT 'transaction' AS kind,
           format('pid %%s, database %%s, user %%s, application %%L', a.pid, a.datname, a.usename,
                  a.application_name) AS who,
           EXTRACT(EPOCH FROM now() - a.xact_start)::float8 AS age_s,
           left(a.query, 200) AS detail
    FROM pg_stat_activity AS a
    WHERE a.datname = current_database() AND a.backend_xmin IS NOT NULL
      AND a.xact_start IS NOT NULL AND a.pid <> pg_backend_pid()
    UNION ALL
    SELECT 'prepared transaction', format('gid %%L, database %%s, owner %%s', p.gid, p.database, p.owner),
           EXTRACT(EPOCH FROM now() - p.prepared)::float8, NULL
    FROM pg_prepared_xacts AS p
    WHERE p.database = current_database()
    UNION ALL
    SELECT 'replication slot', format('slot %%L (%%s)', s.slot_name, s.slot_type), NULL::float8,
           format('xmin age %%s transactions', greatest(age(s.xmin), age(s.catalog_xmin)))
    FROM pg_replication_slots AS s
    WHERE NOT s.active AND (s.xmin IS NOT NULL OR s.catalog_xmin IS NOT NULL)
      AND (s.database IS NULL OR s.database = current_database())
) AS h
WHERE h.age_s IS NULL OR h.age_s > %(older)s
ORDER BY h.age_s DESC NULLS LAST
LIMIT 1;
