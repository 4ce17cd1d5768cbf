"""The engine: the one execution path — claim, admission, run, group commit.

``testing.drain()`` drives it inline; the runtime's worker processes drive the same
functions with concurrency. It knows nothing of processes, signals or configuration files.
"""

from pgdurable.engine.pipeline import Engine

__all__ = ["Engine"]
