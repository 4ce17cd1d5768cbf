"""``[tracing]`` in a worker process: the optional ``setup`` hook, and the step tracer.

``setup = "module:function"`` names a function the worker calls once, after the fork and
before its first step, to install the process's tracer provider and exporter (an SDK
``BatchSpanProcessor`` started in the supervisor would not survive the fork). Without it,
the global provider is whatever the imported modules set up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pgdurable.contract.errors import ConfigError
from pgdurable.engine.tracing import StepTracer
from pgdurable.runtime.config import Config


def setup_hook(cfg: Config) -> Callable[[], Any] | None:
    """The ``[tracing] setup`` function, imported (not called); a ConfigError naming the
    key and file when it cannot be found. The supervisor checks it before forking."""
    spec = cfg.tracing.setup
    if spec is None:
        return None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f'expected "module:function", got {spec!r}', file=cfg.path, key="tracing.setup")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module!r}: {exc}", file=cfg.path, key="tracing.setup") from exc
    except AttributeError:
        raise ConfigError(f"module {module!r} has no {name!r}", file=cfg.path, key="tracing.setup") from None
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable", file=cfg.path, key="tracing.setup")
    return fn  # type: ignore[no-any-return]


def worker_tracer(cfg: Config) -> StepTracer | None:
    """In a worker process: run the setup hook, and the tracer its steps run under."""
    if not cfg.tracing.enabled:
        return None
    hook = setup_hook(cfg)
    if hook is not None:
        hook()
    return StepTracer()
