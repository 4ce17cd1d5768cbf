-- Cron schedules (docs/schedules.md): what the clients and the command line manage, what
-- the supervisors register from code, and the cron pass of the maintenance process. A
-- statement that changes a schedule wakes the cron passes (schedule_channel()).

-- name: schedule_get
-- One schedule, by name.
SELECT name, fsm, cron, timezone, state::text, queue, priority, missed, catch_up_limit, overlap,
       enabled, next_fire_at, last_fire_at, last_instance_id, fires, skipped, last_error,
       last_error_at, source, created_at, updated_at
FROM {schema}.schedules WHERE name = %(name)s;

-- name: schedule_get_for_update
-- One schedule, locked for the rest of the caller's transaction (a change computes its next
-- fire from the values it locked, so two changes never mix), and the database's time to
-- compute it from.
SELECT name, fsm, cron, timezone, state::text, queue, priority, missed, catch_up_limit, overlap,
       enabled, next_fire_at, last_fire_at, last_instance_id, fires, skipped, last_error,
       last_error_at, source, created_at, updated_at, now()
FROM {schema}.schedules WHERE name = %(name)s FOR UPDATE;

-- name: schedule_now
-- The database's time: a new schedule's first fire is computed from it.
SELECT now();

-- name: schedule_list
-- Every schedule, by name.
SELECT name, fsm, cron, timezone, state::text, queue, priority, missed, catch_up_limit, overlap,
       enabled, next_fire_at, last_fire_at, last_instance_id, fires, skipped, last_error,
       last_error_at, source, created_at, updated_at
FROM {schema}.schedules ORDER BY name;

-- name: schedule_create
-- Create a schedule made at run time; no row when the name is taken.
WITH ins AS (
    INSERT INTO {schema}.schedules
        (name, fsm, cron, timezone, state, queue, priority, missed, catch_up_limit, overlap,
         enabled, next_fire_at, source)
    VALUES (%(name)s, %(fsm)s, %(cron)s, %(timezone)s, %(state)s::jsonb, %(queue)s, %(priority)s,
            %(missed)s, %(catch_up_limit)s, %(overlap)s, %(enabled)s, %(next_fire_at)s, 'api')
    ON CONFLICT (name) DO NOTHING
    RETURNING name, fsm, cron, timezone, state::text, queue, priority, missed, catch_up_limit,
              overlap, enabled, next_fire_at, last_fire_at, last_instance_id, fires, skipped,
              last_error, last_error_at, source, created_at, updated_at
)
SELECT ins.*, pg_notify({schema}.schedule_channel(), ins.name) IS NULL AS notified FROM ins;

-- name: schedule_write
-- Store a changed schedule (the caller locked it with schedule_get_for_update and computed
-- its next fire): definition, enabled, next fire; an enable or a new definition clears the
-- error of the last occurrence.
WITH upd AS (
    UPDATE {schema}.schedules
    SET fsm = %(fsm)s, cron = %(cron)s, timezone = %(timezone)s, state = %(state)s::jsonb,
        queue = %(queue)s, priority = %(priority)s, missed = %(missed)s,
        catch_up_limit = %(catch_up_limit)s, overlap = %(overlap)s, enabled = %(enabled)s,
        next_fire_at = %(next_fire_at)s,
        last_error = CASE WHEN %(clear_error)s THEN NULL ELSE last_error END,
        last_error_at = CASE WHEN %(clear_error)s THEN NULL ELSE last_error_at END,
        updated_at = now()
    WHERE name = %(name)s
    RETURNING name, fsm, cron, timezone, state::text, queue, priority, missed, catch_up_limit,
              overlap, enabled, next_fire_at, last_fire_at, last_instance_id, fires, skipped,
              last_error, last_error_at, source, created_at, updated_at
)
SELECT upd.*, pg_notify({schema}.schedule_channel(), upd.name) IS NULL AS notified FROM upd;

-- name: schedule_delete
-- Delete a schedule (its instances stay); no row when there is none by that name.
DELETE FROM {schema}.schedules WHERE name = %(name)s
RETURNING name, pg_notify({schema}.schedule_channel(), name) IS NULL AS notified;

-- name: schedule_trigger
-- Fire a schedule now, outside its cron: one instance of its machine (newest registered
-- version) with its state, under the key 'schedule:NAME@manual:TIME' (reserved in the
-- statuses of the scope parameter: every status); it becomes the
-- schedule's previous run (for overlap). found: the schedule exists; id NULL: its machine
-- is not registered.
WITH s AS (
    SELECT name, fsm, state, queue, priority FROM {schema}.schedules WHERE name = %(name)s
), m AS (
    SELECT mm.version, mm.initial_step, mm.queue FROM {schema}.machines AS mm, s
    WHERE mm.name = s.fsm ORDER BY mm.version DESC LIMIT 1
), ins AS (
    INSERT INTO {schema}.instances
        (fsm, version, step, state, queue, priority, eligible_at, correlation_key, correlation_scope)
    SELECT s.fsm, m.version, m.initial_step, s.state, COALESCE(s.queue, m.queue), s.priority, now(),
           'schedule:' || s.name || '@manual:'
               || to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           %(scope)s::text[]
    FROM s, m
    RETURNING id, queue
), upd AS (
    UPDATE {schema}.schedules AS sc SET last_instance_id = ins.id, updated_at = now()
    FROM ins WHERE sc.name = %(name)s
)
SELECT EXISTS (SELECT 1 FROM s) AS found, s.fsm, ins.id,
       CASE WHEN ins.id IS NOT NULL
            THEN pg_notify({schema}.notify_channel(ins.queue), '') IS NULL END AS notified
FROM (SELECT 1) AS one LEFT JOIN s ON true LEFT JOIN ins ON true;

-- name: schedule_register_many
-- The schedules declared in code, upserted by name at a supervisor's start. A new name is
-- created as declared. For an existing one, each field follows the code only when the
-- code's declaration of that field changed since it was last registered (declared): an
-- operator's run-time change (a disable, a new cron) outlives restarts of the same code,
-- and a deploy that changes a field in code wins for that field. A changed cron or time
-- zone, or an enable from code, leaves next_fire_at to be computed (NULL). Returns the
-- names created or changed.
WITH d AS (
    SELECT * FROM unnest(%(names)s::text[], %(fsms)s::text[], %(crons)s::text[], %(timezones)s::text[],
                         %(states)s::text[], %(queues)s::text[], %(priorities)s::int[],
                         %(misseds)s::text[], %(catch_up_limits)s::int[], %(overlaps)s::text[],
                         %(enableds)s::boolean[], %(declareds)s::text[])
        AS d(name, fsm, cron, timezone, state, queue, priority, missed, catch_up_limit, overlap,
             enabled, declared)
), up AS (
    INSERT INTO {schema}.schedules AS s
        (name, fsm, cron, timezone, state, queue, priority, missed, catch_up_limit, overlap,
         enabled, source, declared)
    SELECT name, fsm, cron, timezone, state::jsonb, queue, priority, missed, catch_up_limit, overlap,
           enabled, 'code', declared::jsonb
    FROM d ORDER BY name
    ON CONFLICT (name) DO UPDATE SET
        fsm = CASE WHEN s.declared->'fsm' IS DISTINCT FROM excluded.declared->'fsm'
                   THEN excluded.fsm ELSE s.fsm END,
        cron = CASE WHEN s.declared->'cron' IS DISTINCT FROM excluded.declared->'cron'
                    THEN excluded.cron ELSE s.cron END,
        timezone = CASE WHEN s.declared->'timezone' IS DISTINCT FROM excluded.declared->'timezone'
                        THEN excluded.timezone ELSE s.timezone END,
        state = CASE WHEN s.declared->'state' IS DISTINCT FROM excluded.declared->'state'
                     THEN excluded.state ELSE s.state END,
        queue = CASE WHEN s.declared->'queue' IS DISTINCT FROM excluded.declared->'queue'
                     THEN excluded.queue ELSE s.queue END,
        priority = CASE WHEN s.declared->'priority' IS DISTINCT FROM excluded.declared->'priority'
                        THEN excluded.priority ELSE s.priority END,
        missed = CASE WHEN s.declared->'missed' IS DISTINCT FROM excluded.declared->'missed'
                      THEN excluded.missed ELSE s.missed END,
        catch_up_limit = CASE WHEN s.declared->'catch_up_limit' IS DISTINCT FROM excluded.declared->'catch_up_limit'
                              THEN excluded.catch_up_limit ELSE s.catch_up_limit END,
        overlap = CASE WHEN s.declared->'overlap' IS DISTINCT FROM excluded.declared->'overlap'
                       THEN excluded.overlap ELSE s.overlap END,
        enabled = CASE WHEN s.declared->'enabled' IS DISTINCT FROM excluded.declared->'enabled'
                       THEN excluded.enabled ELSE s.enabled END,
        next_fire_at = CASE
            WHEN (s.declared->'cron' IS DISTINCT FROM excluded.declared->'cron'
                  AND s.cron IS DISTINCT FROM excluded.cron)
              OR (s.declared->'timezone' IS DISTINCT FROM excluded.declared->'timezone'
                  AND s.timezone IS DISTINCT FROM excluded.timezone)
              OR (s.declared->'enabled' IS DISTINCT FROM excluded.declared->'enabled'
                  AND excluded.enabled AND NOT s.enabled)
            THEN NULL ELSE s.next_fire_at END,
        source = 'code', declared = excluded.declared, updated_at = now()
    WHERE s.declared IS DISTINCT FROM excluded.declared
    RETURNING s.name
)
SELECT up.name, pg_notify({schema}.schedule_channel(), up.name) IS NULL AS notified FROM up;

-- name: schedule_unset_lock
-- Enabled schedules whose next fire is to be computed (new, or changed in code), locked;
-- with the database's time to compute it from.
SELECT name, cron, timezone, now() FROM {schema}.schedules
WHERE enabled AND next_fire_at IS NULL
ORDER BY name LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: schedule_set_next_many
-- Store the next fires computed for the schedules schedule_unset_lock returned.
UPDATE {schema}.schedules AS s SET next_fire_at = v.at, updated_at = now()
FROM unnest(%(names)s::text[], %(ats)s::timestamptz[]) AS v(name, at)
WHERE s.name = v.name AND s.enabled AND s.next_fire_at IS NULL;

-- name: schedule_break
-- A schedule whose cron expression or time zone no longer parses (changed by SQL): it is
-- disabled with the reason, once, instead of failing every pass.
UPDATE {schema}.schedules
SET enabled = false, last_error = %(error)s, last_error_at = now(), updated_at = now()
WHERE name = %(name)s;

-- name: schedule_due_lock
-- The cron pass: enabled schedules due at the given time (NULL: now), in fire order, locked — SKIP
-- LOCKED, so passes on several supervisors split them and none fires what another holds.
-- With each: whether a supervisor registered its machine, and the status of its previous
-- run (NULL: none, or collected).
SELECT s.name, s.fsm, s.cron, s.timezone, s.missed, s.catch_up_limit, s.overlap, s.next_fire_at,
       s.last_instance_id, s.last_error,
       EXISTS (SELECT 1 FROM {schema}.machines AS m WHERE m.name = s.fsm) AS known,
       i.status AS last_status,
       COALESCE(%(at)s::timestamptz, now()) AS now
FROM {schema}.schedules AS s
LEFT JOIN {schema}.instances AS i ON i.id = s.last_instance_id
WHERE s.enabled AND s.next_fire_at <= COALESCE(%(at)s::timestamptz, now())
ORDER BY s.next_fire_at, s.name
LIMIT %(limit)s
FOR UPDATE OF s SKIP LOCKED;

-- name: schedule_advance
-- Move a due schedule on to its next fire, guarded by the next fire the pass read: no row
-- when another pass moved it meanwhile (the pass then fires nothing for it). skipped counts
-- occurrences not fired; error: why this occurrence did not fire (NULL clears it).
UPDATE {schema}.schedules
SET next_fire_at = %(next)s, skipped = skipped + %(skipped)s,
    last_error = %(error)s::text,
    last_error_at = CASE WHEN %(error)s::text IS NULL THEN NULL
                         WHEN last_error IS NOT DISTINCT FROM %(error)s::text THEN last_error_at
                         ELSE now() END,
    updated_at = now()
WHERE name = %(name)s AND enabled AND next_fire_at = %(old)s
RETURNING name;

-- name: schedule_fire
-- Insert the occurrences of a schedule the pass advanced (oldest first), each under its
-- key 'schedule:NAME@TIME', reserved in the statuses of the scope parameter — every
-- status, until GC — so an occurrence is never inserted twice; record the last as the schedule's previous run. Returns the new rows.
WITH s AS (
    SELECT name, fsm, state, queue, priority FROM {schema}.schedules WHERE name = %(name)s
), m AS (
    SELECT mm.version, mm.initial_step, mm.queue FROM {schema}.machines AS mm, s
    WHERE mm.name = s.fsm ORDER BY mm.version DESC LIMIT 1
), ins AS (
    INSERT INTO {schema}.instances
        (fsm, version, step, state, queue, priority, eligible_at, correlation_key, correlation_scope)
    SELECT s.fsm, m.version, m.initial_step, s.state, COALESCE(s.queue, m.queue), s.priority, now(),
           k.key, %(scope)s::text[]
    FROM s, m, unnest(%(keys)s::text[]) WITH ORDINALITY AS k(key, ord)
    ORDER BY k.ord
    ON CONFLICT (correlation_key) WHERE correlation_key IS NOT NULL AND status = ANY (correlation_scope)
    DO NOTHING
    RETURNING id, queue, correlation_key
), upd AS (
    UPDATE {schema}.schedules AS sc
    SET last_instance_id = COALESCE((SELECT max(id) FROM ins), sc.last_instance_id),
        last_fire_at = %(fired_at)s, fires = fires + (SELECT count(*) FROM ins)
    WHERE sc.name = %(name)s
)
SELECT id, correlation_key, pg_notify({schema}.notify_channel(queue), '') IS NULL AS notified
FROM ins ORDER BY id;

-- name: schedule_next_due
-- Seconds from now to the earliest next fire of an enabled schedule (NULL: none; 0: one
-- is due or to be computed), by the database's clock: the cron pass sleeps that long.
SELECT CASE WHEN bool_or(next_fire_at IS NULL) THEN 0
            ELSE GREATEST(0, extract(epoch FROM min(next_fire_at) - clock_timestamp())) END::float8
FROM {schema}.schedules WHERE enabled;

-- name: schedule_channel
-- The channel the cron pass LISTENs on.
SELECT {schema}.schedule_channel();

-- name: schedule_errors
-- Schedules whose last occurrence did not fire, and why (pgdurable status lists them).
SELECT name, fsm, enabled, last_error, last_error_at FROM {schema}.schedules
WHERE last_error IS NOT NULL ORDER BY name;
