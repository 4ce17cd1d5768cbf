-- name: instance_insert_one
-- Insert one instance, resolving version, initial step and queue from the machines table when
-- the producer left them out (and the machine's relative deadline when it gives none). Returns id (NULL when the correlation key is occupied), whether
-- the machine could be resolved at all, and the queue. NOTIFY rides this transaction only
-- when asked (an insert inside a caller's transaction); otherwise the client notifies
-- after the commit, coalesced (see docs/performance.md).
WITH c AS (
    SELECT %(fsm)s::text AS fsm,
           COALESCE(%(version)s::int, m.version) AS version,
           COALESCE(%(step)s::text, m.initial_step) AS step,
           COALESCE(%(queue)s::text, m.queue) AS queue,
           m.deadline
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT version, initial_step, queue, deadline FROM {schema}.machines
        WHERE name = %(fsm)s::text AND (%(version)s::int IS NULL OR version = %(version)s::int)
        ORDER BY version DESC LIMIT 1) AS m ON true
), ins AS (
    INSERT INTO {schema}.instances
        (fsm, version, step, state, queue, priority, eligible_at, correlation_key,
         correlation_scope, concurrency_key, rate_limit, weight, expires_at, on_expiry, deadline,
         traceparent)
    SELECT c.fsm, c.version, c.step, %(state)s::jsonb, c.queue, %(priority)s,
           COALESCE(%(at)s::timestamptz, now() + make_interval(secs => %(delay)s)),
           %(correlation_key)s,
           -- a scope only with a key (migration 14): a keyless row stores none
           CASE WHEN %(correlation_key)s::text IS NOT NULL
                THEN COALESCE(%(correlation_scope)s::text[], '{runnable,executing,awaiting_signal,awaiting_children,held}') END,
           %(concurrency_key)s,
           %(rate_limit)s, %(weight)s,
           COALESCE(%(expires_at)s::timestamptz, now() + make_interval(secs => %(expires_in)s::float8)),
           %(on_expiry)s::text,
           COALESCE(%(deadline_at)s::timestamptz, now() + make_interval(secs => %(deadline_in)s::float8),
                    now() + c.deadline),
           %(traceparent)s::text
    FROM c WHERE c.queue IS NOT NULL
    ON CONFLICT (correlation_key) WHERE correlation_key IS NOT NULL AND status = ANY (correlation_scope)
    DO NOTHING
    RETURNING id, queue
)
SELECT (SELECT id FROM ins) AS id,
       (SELECT queue IS NOT NULL FROM c) AS known,
       (SELECT queue FROM ins) AS queue,
       (SELECT pg_notify({schema}.notify_channel(queue), '') FROM ins WHERE %(notify)s) AS notified;

-- name: instance_ids_allocate
-- Before a COPY of n rows (insert_many, see pgdurable/bulk.py): draw their ids from the
-- identity sequence and read now(), from which the client computes eligible_at of rows
-- with a delay.
WITH seq AS MATERIALIZED (
    SELECT pg_get_serial_sequence(format('%%I.instances', {schema_literal}), 'id')::regclass AS s
)
SELECT now(), ARRAY(SELECT nextval(seq.s) FROM seq, generate_series(1, %(n)s::int));

-- name: instance_copy
-- The rows of insert_many, as a text stream whose columns are pgdurable.bulk.COLUMNS.
-- COPY writes the given identity values (as INSERT ... OVERRIDING SYSTEM VALUE would).
COPY {schema}.instances (id, fsm, version, step, state, queue, priority, eligible_at,
                         correlation_key, correlation_scope, concurrency_key, rate_limit,
                         weight, inserted_at, expires_at, on_expiry, deadline, traceparent)
FROM STDIN;

-- name: instance_copy_plain
-- A batch whose rows all keep the default options: pgdurable.bulk.PLAIN_COLUMNS only.
COPY {schema}.instances (id, fsm, version, step, state, queue) FROM STDIN;

-- name: instance_claim
-- Claim up to %(limit)s runnable rows of one queue for one worker, in priority then
-- eligible_at order. A row whose concurrency key is unconfigured (K = 1) and executing
-- elsewhere is skipped before the LIMIT (an indexed probe per candidate, memoized per key),
-- and of several candidates sharing such a key only the first is taken — if
-- concurrency_key_try_claim (migration 0004) agrees: called once per such key in the batch,
-- it locks the key for this claim without waiting (a key another claim is taking is left
-- out) and probes the executing rows again with a fresh snapshot (a claim of the key that
-- committed since this statement's snapshot is seen), so racing claimers of one key never
-- meet on the unique index. Unkeyed rows never call it. Keys of a configured gate
-- (%(gates)s, with their limits) skip the probe, are taken at most `limit` per key, and get
-- a provisional shard (-1) that admission replaces by the slot's shard.
-- has_inbox / has_children tell the caller which rows need enrichment. A paused queue
-- (a row of the queues table, read once per claim by primary key) claims nothing. A row past
-- its expires_at or its deadline is skipped (a filter on the candidates the index yields).
WITH candidates AS (
    SELECT i.id, i.concurrency_key, i.priority, i.eligible_at,
           CASE WHEN split_part(i.concurrency_key, ':', 1) = ANY(%(gates)s::text[])
                THEN (SELECT g.lim FROM unnest(%(gates)s::text[], %(gate_limits)s::int[]) AS g(name, lim)
                      WHERE g.name = split_part(i.concurrency_key, ':', 1)) END AS gate_limit
    FROM {schema}.instances AS i
    LEFT JOIN LATERAL (
        SELECT 1 AS busy FROM {schema}.instances AS e
        WHERE e.concurrency_key = i.concurrency_key AND e.status = 'executing'
          AND e.concurrency_key IS NOT NULL AND e.concurrency_shard IS NULL
        LIMIT 1) AS b ON i.concurrency_key IS NOT NULL
                     AND NOT (split_part(i.concurrency_key, ':', 1) = ANY(%(gates)s::text[]))
    WHERE i.status = 'runnable' AND i.queue = %(queue)s
      AND i.eligible_at <= now() + %(horizon)s::interval
      AND b.busy IS NULL
      -- time limits (docs/deadlines.md): never start a row past its expiry, nor run a step
      -- past the deadline (but an on_cancel step's); the deadline sweep ends those rows
      AND (i.expires_at IS NULL OR i.expires_at > now())
      AND (i.deadline IS NULL OR i.deadline > now() OR i.cancel_reason IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM {schema}.queues AS p WHERE p.name = %(queue)s AND p.paused)
    ORDER BY i.priority, i.eligible_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE OF i SKIP LOCKED
), winners AS (
    SELECT id, gate_limit IS NOT NULL AS gated FROM (
        SELECT id, concurrency_key, gate_limit,
               row_number() OVER (PARTITION BY concurrency_key
                                  ORDER BY priority, eligible_at, id) AS rn
        FROM candidates) AS ranked
    WHERE CASE WHEN concurrency_key IS NULL THEN true
               WHEN gate_limit IS NOT NULL THEN rn <= gate_limit
               WHEN rn = 1 THEN {schema}.concurrency_key_try_claim(concurrency_key)
               ELSE false END
)
UPDATE {schema}.instances AS i
SET status = 'executing', locked_by = %(worker)s, lease_token = %(token)s,
    lease_expires_at = now() + %(lease)s::interval, updated_at = now(),
    concurrency_shard = CASE WHEN w.gated THEN -1 END
FROM winners AS w
WHERE i.id = w.id
RETURNING i.id, i.fsm, i.version, i.step, i.state::text AS state, i.attempt, i.crashes,
          i.queue, i.priority, i.eligible_at, i.awaits, i.correlation_key, i.concurrency_key,
          i.rate_limit, i.weight, i.parent_id,
          EXISTS (SELECT 1 FROM {schema}.signals AS s WHERE s.target_id = i.id) AS has_inbox,
          EXISTS (SELECT 1 FROM {schema}.instances AS c WHERE c.parent_id = i.id) AS has_children,
          w.gated, i.cancel_reason, i.saga::text AS saga, i.join_policy, i.traceparent;

-- name: instance_children_many
-- Every child of the given parents (any status), for ctx.children: oldest Spawn first
-- (the children of one Spawn share their insert's transaction time), each Spawn's children
-- in the order it gave them.
SELECT parent_id, id, fsm, status, state::text AS state, result::text AS result, last_error,
       spawn_index, inserted_at
FROM {schema}.instances
WHERE parent_id = ANY(%(ids)s::bigint[])
ORDER BY parent_id, inserted_at, spawn_index, id;

-- name: instance_commit_if_owned_many
-- Commit Next / Retry / Done / Stop outcomes (and inline continues, which stay executing)
-- of rows this worker still owns under the
-- claim's fencing token, with their riders in the same statement: the signals a progressing
-- outcome took are consumed (pairs target/signal), a terminal outcome clears the inbox, and
-- the queues of rows runnable now are notified. Only rows the guard let through are touched
-- by the riders. The outcomes arrive as one JSON object keyed by instance id (%(rows)s),
-- states and results embedded as they are; a NULL state keeps the stored one. A key at its
-- default is left out of an outcome (pgdurable/engine/commit.py, _CommitRow): absent reads
-- as NULL, hence the COALESCE of attempt; a NULL flag is false. delay and weight are always
-- there (a NaN arrives as null, and is refused). Each row
-- looks its outcome up by key: joining the rows to a record set instead let the planner,
-- which estimates the guarded rows at one, rescan and re-parse the whole document for each
-- row (a flush of 200 outcomes 14 ms, of 1,000 310 ms; now 2.4 and 12 ms:
-- tests/test_plans.py). The flushing worker's own queue (%(quiet_queue)s) is not
-- notified: that worker claims again as soon as it has room, and a NOTIFY would serialise
-- this commit with every other one.
-- A row a cancel marked (cancel_requested) is refused like a stale one: the flush settles
-- it instead (instance_cancel_settle_if_owned_many). A row running its on_cancel step
-- (cancel_reason set) ends `cancelled` where its outcome says done or failed.
WITH outcomes AS MATERIALIZED (  -- parsed once, whatever the plan; read as an InitPlan's value
    SELECT %(rows)s::jsonb AS doc
), written AS (
    UPDATE {schema}.instances AS i
    SET (status, version, step, state, eligible_at, attempt, crashes, awaits, await_deadline,
         expires_at, concurrency_key, concurrency_shard, rate_limit, weight, result, last_error,
         last_traceback, saga, locked_by, lease_token, lease_expires_at, updated_at) = (
        SELECT CASE WHEN i.cancel_reason IS NOT NULL AND u.status IN ('done', 'failed')
                    THEN 'cancelled' ELSE u.status END,
               u.version,
               u.step,
               COALESCE(u.state, i.state),
               now() + make_interval(secs => u.delay),
               COALESCE(u.attempt, 0),
               0,
               CASE WHEN u.keep_awaits THEN i.awaits END,
               NULL::timestamptz,
               NULL::timestamptz,  -- expires_at: it started, its first outcome is committed
               CASE WHEN u.set_concurrency THEN u.concurrency_key ELSE i.concurrency_key END,
               CASE WHEN u.status = 'executing' THEN i.concurrency_shard END,
               CASE WHEN u.keep_rate THEN i.rate_limit ELSE u.rate_limit END,
               CASE WHEN u.keep_rate THEN i.weight ELSE u.weight END,
               u.result,
               u.error,
               u.traceback,
               COALESCE(u.saga, i.saga),
               -- 'executing': an inline continue keeps the claim (and its gate slot) for the next step
               CASE WHEN u.status = 'executing' THEN i.locked_by END,
               CASE WHEN u.status = 'executing' THEN i.lease_token END,
               CASE WHEN u.status = 'executing' THEN now() + %(lease)s::interval END,
               now()
        FROM jsonb_to_record((SELECT doc FROM outcomes) -> i.id::text)
             AS u(token bigint, status text, version int, step text, state jsonb,
                  delay float8, attempt int, keep_awaits bool, set_concurrency bool,
                  concurrency_key text, keep_rate bool, rate_limit text, weight float8,
                  result jsonb, error text, traceback text, saga jsonb)
    )
    WHERE i.id = ANY(%(ids)s::bigint[])  -- the primary key (or, on a table of a few pages, a scan)
      AND i.locked_by = %(worker)s AND i.status = 'executing' AND i.cancel_requested IS NULL
      AND i.lease_token = ((SELECT doc FROM outcomes) -> i.id::text ->> 'token')::bigint
    RETURNING i.id, i.parent_id, i.status, i.queue, i.eligible_at <= now() AS due  -- its delay <= 0
), taken AS (
    DELETE FROM {schema}.signals AS s
    USING unnest(%(taken_targets)s::bigint[], %(taken_ids)s::bigint[]) AS t(target_id, id), written AS w
    WHERE s.id = t.id AND t.target_id = w.id
    RETURNING 1
), cleared AS (
    DELETE FROM {schema}.signals AS s
    USING written AS w
    WHERE s.target_id = w.id AND w.status IN ('done', 'failed', 'cancelled')
    RETURNING 1
), notified AS (
    SELECT count(pg_notify({schema}.notify_channel(q), '')) AS n
    FROM (SELECT DISTINCT queue FROM written
          WHERE status = 'runnable' AND due AND queue IS DISTINCT FROM %(quiet_queue)s) AS d(q)
)
SELECT w.id, w.parent_id, w.status, w.queue
FROM written AS w CROSS JOIN notified;

-- name: instance_park_await_if_owned_many
-- Park rows this worker still owns on a set of signal names (awaits as JSON arrays); not a
-- row a cancel marked (the flush settles it). An await that asks for input stores its
-- request (prompt, schema, choices; NULL for a plain await: docs/inputs.md).
UPDATE {schema}.instances AS i
SET status = 'awaiting_signal', version = u.version, step = u.step,
    state = COALESCE(u.state::jsonb, i.state), attempt = 0, crashes = 0,
    awaits = ARRAY(SELECT jsonb_array_elements_text(u.awaits::jsonb)),
    await_deadline = CASE WHEN u.timeout IS NULL THEN NULL
                          ELSE now() + make_interval(secs => u.timeout) END,
    input_request = u.input::jsonb, expires_at = NULL,
    eligible_at = now(), concurrency_shard = NULL, rate_limit = NULL, weight = 1,
    last_error = NULL, last_traceback = NULL, saga = COALESCE(u.saga::jsonb, i.saga),
    locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(versions)s::int[], %(steps)s::text[],
            %(states)s::text[], %(awaits)s::text[], %(timeouts)s::float8[], %(sagas)s::text[],
            %(inputs)s::text[])
     AS u(id, token, version, step, state, awaits, timeout, saga, input)
WHERE i.id = u.id AND i.id = ANY(%(ids)s::bigint[]) AND i.locked_by = %(worker)s
  AND i.lease_token = u.token
  AND i.status = 'executing' AND i.cancel_requested IS NULL
RETURNING i.id;

-- name: instance_await_recheck_many
-- Run in the parking transaction after the park, with a fresh snapshot: a matching signal
-- that the step was not handed (it arrived before or during the park) wakes the row at once.
UPDATE {schema}.instances AS i
SET status = 'runnable', eligible_at = now(), updated_at = now()
WHERE i.id = ANY(%(ids)s::bigint[]) AND i.status = 'awaiting_signal'
  AND EXISTS (SELECT 1 FROM {schema}.signals AS s
              WHERE s.target_id = i.id AND s.name = ANY(i.awaits)
                AND s.id <> ALL(%(presented)s::bigint[]))
RETURNING i.id, i.queue, pg_notify({schema}.notify_channel(i.queue), '')::text AS notified;

-- name: instance_lock_owned_many
-- Lock, in id order, the rows this worker still owns; held to the end of the transaction so
-- nothing (reaper included) can take them between the children insert and the park. A row
-- a cancel marked is not locked: it spawns nothing (the flush settles it).
SELECT i.id
FROM {schema}.instances AS i
JOIN unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS u(id, token)
  ON i.id = u.id AND i.lease_token = u.token
WHERE i.locked_by = %(worker)s AND i.status = 'executing' AND i.cancel_requested IS NULL
ORDER BY i.id
FOR NO KEY UPDATE OF i;

-- name: instance_spawn_children_many
-- Insert the children of locked parents and park each parent on them in one statement.
-- A child whose correlation key is occupied is not created and not waited for.
WITH ins AS (
    INSERT INTO {schema}.instances
        (parent_id, fsm, version, step, state, queue, priority, eligible_at, correlation_key,
         correlation_scope, concurrency_key, rate_limit, weight, expires_at, on_expiry, deadline,
         spawn_index, traceparent)
    SELECT c.parent_id, c.fsm, c.version, c.step, c.state::jsonb, c.queue, COALESCE(c.priority, 0),
           COALESCE(c.at, now() + make_interval(secs => COALESCE(c.delay, 0))), c.correlation_key,
           CASE WHEN c.correlation_key IS NOT NULL
                THEN COALESCE(c.scope, '{runnable,executing,awaiting_signal,awaiting_children,held}') END,
           c.concurrency_key, c.rate_limit, COALESCE(c.weight, 1),
           COALESCE(c.expires_at, now() + make_interval(secs => c.expires_in)), c.on_expiry,
           COALESCE(c.deadline_at, now() + make_interval(secs => c.deadline_in)),
           -- its position among its parent's children of this Spawn (ord: in the document)
           (rank() OVER (PARTITION BY c.parent_id ORDER BY COALESCE(c.ord, 0)) - 1)::int,
           c.traceparent
    FROM json_to_recordset(%(children)s::json)
         AS c(parent_id bigint, fsm text, version int, step text, state json, queue text,
              priority smallint, at timestamptz, delay float8, correlation_key text,
              scope text[], concurrency_key text, rate_limit text, weight float8, ord int,
              expires_at timestamptz, expires_in float8, on_expiry text,
              deadline_at timestamptz, deadline_in float8, traceparent text)
    WHERE c.parent_id = ANY(%(locked)s::bigint[])
    ORDER BY c.correlation_key COLLATE "C" NULLS LAST, c.parent_id, COALESCE(c.ord, 0)
    ON CONFLICT (correlation_key) WHERE correlation_key IS NOT NULL AND status = ANY (correlation_scope)
    DO NOTHING
    RETURNING parent_id, queue, eligible_at <= now() AS due
), landed AS (
    SELECT parent_id, count(*)::int AS n FROM ins GROUP BY parent_id
), notified AS (
    SELECT count(pg_notify({schema}.notify_channel(q), '')) AS n
    FROM (SELECT DISTINCT queue FROM ins WHERE due) AS d(q)
)
UPDATE {schema}.instances AS i
SET status = CASE WHEN COALESCE(l.n, 0) > 0 THEN 'awaiting_children' ELSE 'runnable' END,
    version = u.version, step = u.step, state = COALESCE(u.state::jsonb, i.state),
    children_pending = COALESCE(l.n, 0), attempt = 0, crashes = 0, awaits = NULL,
    await_deadline = NULL, expires_at = NULL, eligible_at = now(), concurrency_shard = NULL,
    rate_limit = NULL, weight = 1, last_error = NULL, last_traceback = NULL,
    saga = COALESCE(u.saga::jsonb, i.saga), join_policy = u.policy,
    locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(versions)s::int[], %(steps)s::text[], %(states)s::text[],
            %(sagas)s::text[], %(policies)s::text[])
     AS u(id, version, step, state, saga, policy)
LEFT JOIN landed AS l ON l.parent_id = u.id
CROSS JOIN notified
WHERE i.id = u.id AND i.id = ANY(%(locked)s::bigint[])
RETURNING i.id, i.status, i.queue,
          CASE WHEN i.status = 'runnable'
               THEN pg_notify({schema}.notify_channel(i.queue), '')::text END AS notified;

-- name: instance_join_parents_many
-- One aggregated decrement per parent for children that reached a terminal status in this
-- flush; parents locked in id order (two flushes sharing parents cannot deadlock). A parent
-- whose last child finished becomes runnable now; so does a parent waiting fail-fast
-- (join_policy) for one of whose children failed (%(failed)s: how many of the n failed).
WITH d AS (
    SELECT * FROM unnest(%(parents)s::bigint[], %(counts)s::int[], %(failed)s::int[]) AS d(id, n, failed)
), locked AS (
    SELECT p.id FROM {schema}.instances AS p JOIN d ON d.id = p.id
    ORDER BY p.id FOR NO KEY UPDATE OF p
)
UPDATE {schema}.instances AS p
SET children_pending = p.children_pending - d.n,
    status = CASE WHEN p.status = 'awaiting_children'
                       AND (p.children_pending - d.n <= 0
                            OR (p.join_policy = 'fail_fast' AND d.failed > 0))
                  THEN 'runnable' ELSE p.status END,
    eligible_at = CASE WHEN p.status = 'awaiting_children'
                            AND (p.children_pending - d.n <= 0
                                 OR (p.join_policy = 'fail_fast' AND d.failed > 0))
                       THEN now() ELSE p.eligible_at END,
    updated_at = now()
FROM d
WHERE p.id = d.id AND p.id IN (SELECT id FROM locked)
RETURNING p.id, p.status, p.queue,
          CASE WHEN p.status = 'runnable'
               THEN pg_notify({schema}.notify_channel(p.queue), '')::text END AS notified;

-- name: instance_hold_if_owned_many
-- Hold rows whose machine, version or step this worker does not know: kept, not retried,
-- with the reason in last_error, until a worker that knows the machine releases them. Not a
-- row a cancel marked (the flush settles it).
UPDATE {schema}.instances AS i
SET status = 'held', last_error = u.error, last_traceback = NULL,
    locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(errors)s::text[]) AS u(id, token, error)
WHERE i.id = u.id AND i.id = ANY(%(ids)s::bigint[]) AND i.locked_by = %(worker)s
  AND i.lease_token = u.token
  AND i.status = 'executing' AND i.cancel_requested IS NULL
RETURNING i.id;

-- name: instance_await_expire
-- Fire await deadlines that passed: the row wakes into its `then` step with what arrived.
UPDATE {schema}.instances AS i
SET status = 'runnable', await_deadline = NULL, eligible_at = now(), updated_at = now()
WHERE i.id IN (
    SELECT id FROM {schema}.instances
    WHERE status = 'awaiting_signal' AND await_deadline <= now() + %(horizon)s::interval
    ORDER BY await_deadline LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED)
RETURNING i.id, i.queue, pg_notify({schema}.notify_channel(i.queue), '')::text AS notified;

-- name: instance_get
-- One instance, for clients and tests.
SELECT id, fsm, version, step, status, queue, priority, attempt, crashes, state::text AS state,
       result::text AS result, last_error, awaits, await_deadline, parent_id, children_pending,
       correlation_key, concurrency_key, rate_limit, weight, eligible_at, inserted_at,
       updated_at, last_traceback, cancel_reason, cancel_requested IS NOT NULL AS cancel_requested,
       saga::text AS saga, expires_at, deadline
FROM {schema}.instances WHERE id = %(id)s;

-- name: instance_runnable_queues
-- Queues that have runnable rows within the horizon (drain in tests).
SELECT DISTINCT queue FROM {schema}.instances
WHERE status = 'runnable' AND eligible_at <= now() + %(horizon)s::interval;

-- name: gc_select_ids
-- A batch of terminal rows older than the retention, oldest first. A terminal child whose
-- parent is still live is spared: the parent will read it in ctx.children. The parent
-- check is an anti-join probing the primary key per candidate (most rows have no parent,
-- which the planner sees, so it walks instances_gc in order and stops at the limit).
SELECT i.id FROM {schema}.instances AS i
WHERE i.status IN ('done', 'failed', 'cancelled')
  AND i.updated_at < now() - %(retention)s::interval
  AND NOT EXISTS (
      SELECT 1 FROM {schema}.instances AS p
      WHERE p.id = i.parent_id AND p.status NOT IN ('done', 'failed', 'cancelled'))
ORDER BY i.updated_at
LIMIT %(limit)s
FOR UPDATE OF i SKIP LOCKED;

-- name: gc_delete_ids
-- Delete the selected rows by primary key; their signals go with them (cascade), and so do
-- the dedup keys they remembered and their step history (neither table has a foreign key:
-- collected here, one set-based delete each, by the prefix of its index).
WITH forgotten AS (
    DELETE FROM {schema}.signal_dedup WHERE target_id = ANY(%(ids)s::bigint[])
), erased AS (
    DELETE FROM {schema}.history WHERE instance_id = ANY(%(ids)s::bigint[])
)
DELETE FROM {schema}.instances WHERE id = ANY(%(ids)s::bigint[]);

-- name: instance_count_by_status
-- How many instances of one machine are in each status.
SELECT status, count(*) FROM {schema}.instances WHERE fsm = %(fsm)s GROUP BY status ORDER BY status;

-- name: queue_notify_many
-- Wake the listeners of the given queues (the client's coalesced, after-commit notify).
SELECT count(pg_notify({schema}.notify_channel(q), '')) FROM unnest(%(queues)s::text[]) AS q;

-- name: instance_cancel_live_children_many
-- The live children of parents that a child's failure woke (join_policy fail_fast) are
-- cancelled, each as cancel() does it (its own live descendants with it, its on_cancel step
-- and compensations run; an executing one is marked and settled when its step returns),
-- and joined to the parent. Returns each child and what the cancel did to it.
SELECT c.id, k.outcome
FROM {schema}.instances AS c
CROSS JOIN LATERAL {schema}.cancel(c.id, NULL, %(reason)s::text, true, true) AS k
WHERE c.parent_id = ANY(%(ids)s::bigint[]) AND c.status NOT IN ('done', 'failed', 'cancelled')
  AND k.instance_id = c.id;

-- name: instance_rejoin_if_owned_many
-- Rows a child's failure woke (fail_fast) whose cancelled children have not all ended yet:
-- they wait for them again, in the same step (the children's ends join them as usual), or
-- are runnable now when the last one ended meanwhile. Not a row a cancel marked.
UPDATE {schema}.instances AS i
SET status = CASE WHEN i.children_pending > 0 THEN 'awaiting_children' ELSE 'runnable' END,
    eligible_at = now(), concurrency_shard = NULL,
    locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS u(id, token)
WHERE i.id = u.id AND i.id = ANY(%(ids)s::bigint[]) AND i.locked_by = %(worker)s
  AND i.lease_token = u.token AND i.status = 'executing' AND i.cancel_requested IS NULL
RETURNING i.id, i.status, i.queue,
          CASE WHEN i.status = 'runnable'
               THEN pg_notify({schema}.notify_channel(i.queue), '')::text END AS notified;

-- name: demo_progress
-- The demo's progress line: instances of the given machines by status, and the step
-- attempts that finished in the last %(window)s seconds (a scan of history: the demo's
-- table is small, and it runs once a second).
SELECT (SELECT COALESCE(jsonb_object_agg(status, n), '{}')::text
        FROM (SELECT status, count(*) AS n FROM {schema}.instances
              WHERE fsm = ANY(%(fsms)s::text[]) GROUP BY status) AS s) AS statuses,
       (SELECT count(*) FROM {schema}.history
        WHERE finished_at > now() - make_interval(secs => %(window)s)) AS steps;

-- name: demo_unfinished
-- The demo's orders an earlier run left unfinished (the payment service pays them again).
SELECT id FROM {schema}.instances
WHERE fsm = 'order' AND status NOT IN ('done', 'failed', 'cancelled')
ORDER BY id;
