-- name: metrics_instances
-- The metrics endpoint (docs/observability.md): live instances per queue and status, and
-- the age of each queue's oldest due runnable row. Terminal rows are not counted (their
-- number grows without bound; the step counters say how many finish). At most one run per
-- supervisor per [metrics] database_interval, and only while the endpoint is scraped.
SELECT queue, status, count(*)::bigint AS n,
       EXTRACT(EPOCH FROM now() - min(eligible_at) FILTER (
           WHERE status = 'runnable' AND eligible_at <= now()))::float8 AS oldest_due_age
FROM {schema}.instances
WHERE status IN ('runnable', 'executing', 'awaiting_signal', 'awaiting_children', 'held')
GROUP BY queue, status
ORDER BY queue, status;
