-- pgdurable schema: trace context — the W3C traceparent of the producer that inserted an
-- instance, and of the producer of each signal (docs/observability.md).

-- "00-<trace id>-<span id>-<flags>", written by Client.insert / insert_many when an
-- OpenTelemetry span is current in the producer, and on the children of a Spawn (the
-- spawning step's span). With [tracing] enabled, a worker parents each step's span on it.
-- NULL (no context) costs nothing: the column is read by the claim and otherwise unused.
ALTER TABLE {schema}.instances ADD COLUMN traceparent text;

-- The same for a signal, written by Client.signal. The step an awaited signal wakes is a
-- child of the signal's context (read with the inbox). A column of the signal, not an
-- update of the instance: a producer may insert signals but update only an instance's
-- status and times (docs/operations.md, the roles).
ALTER TABLE {schema}.signals ADD COLUMN traceparent text;
