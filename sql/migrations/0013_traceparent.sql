-- pgdurable schema: trace context — the W3C traceparent of the producer that inserted an
-- instance, or of the last signal that woke it (docs/observability.md).

-- "00-<trace id>-<span id>-<flags>", written by Client.insert / insert_many / signal when
-- an OpenTelemetry span is current in the producer, and on the children of a Spawn (the
-- spawning step's span). With [tracing] enabled, a worker parents each step's span on it.
-- NULL (no context) costs nothing: the column is read by the claim and otherwise unused.
ALTER TABLE {schema}.instances ADD COLUMN traceparent text;
