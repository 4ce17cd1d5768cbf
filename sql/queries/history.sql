-- name: history_insert_many
-- The history rider of a flush: one row per finished step attempt, with the state the step
-- ran with, from one JSON document (%(rows)s; absent keys are NULL). Runs in the flush's
-- transaction after its guarded writes, and writes only the rows this transaction wrote:
-- an instance row whose xmin is this transaction's id was let through by an ownership
-- guard here; a stale outcome's row was not, and gets no history. The flush runs on an autocommit connection, outside any
-- savepoint, so the rows it writes carry the top-level transaction id. The xmin is read by
-- a scalar subquery, one primary-key probe per row: as a join, a table without fresh
-- statistics was planned as a scan of every instance, filtered on xmin.
INSERT INTO {schema}.history
    (instance_id, fsm, version, step, attempt, outcome, next_step, started_at, finished_at,
     duration, worker, error, traceback, state, logs)
SELECT h.id, h.fsm, h.version, h.step, h.attempt, h.outcome, h.next_step,
       to_timestamp(h.started), to_timestamp(h.started + h.duration), h.duration, %(worker)s,
       h.error, h.traceback, h.state, h.logs
FROM json_to_recordset(%(rows)s::json)
     AS h(id bigint, fsm text, version int, step text, attempt int, outcome text,
          next_step text, started float8, duration float8, error text, traceback text,
          state jsonb, logs jsonb)
WHERE (SELECT i.xmin FROM {schema}.instances AS i WHERE i.id = h.id) = pg_current_xact_id()::xid;

-- name: history_of_instance
-- The step attempts of one instance, oldest first; with %(limit)s, only the last ones.
SELECT instance_id, fsm, version, step, attempt, outcome, next_step, started_at, finished_at,
       duration, worker, error, traceback, state::text, logs::text
FROM (SELECT * FROM {schema}.history WHERE instance_id = %(id)s
      ORDER BY started_at DESC LIMIT %(limit)s) AS h
ORDER BY started_at;

-- name: history_transitions
-- The transitions the instances of one machine version took, from the step history: per
-- step, outcome and next step, how many attempts and when the last one finished (held
-- rows, whose step is not known, left out). history has no index by machine, so this
-- reads the whole table: an operator's query (pgdurable graph --observed), on demand.
SELECT step, outcome, next_step, count(*)::bigint AS seen, max(finished_at) AS last_seen
FROM {schema}.history
WHERE fsm = %(fsm)s AND version = %(version)s AND step IS NOT NULL AND outcome <> 'hold'
GROUP BY step, outcome, next_step
ORDER BY step, outcome, next_step;
