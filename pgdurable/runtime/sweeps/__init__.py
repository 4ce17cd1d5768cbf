"""The maintenance sweeps, one module each: the reaper (expired leases), await deadlines,
expiry and instance deadlines, and garbage collection (with the repair of limit counters).

Each sweep is safe with any number of nodes running it at once: it claims its rows with
ordered ``SKIP LOCKED`` (the deadline sweep locks children before their parent, as
``cancel`` does, and decides on the locked rows). The maintenance process
(``runtime.maintenance``) runs them as components; the supervisor calls the reaper's
``reclaim`` itself when a worker dies.
"""
