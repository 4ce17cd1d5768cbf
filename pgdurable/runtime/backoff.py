"""The back-off of retries against the database: failed claims, reconnections, flushes."""

from __future__ import annotations

import random

RETRY_FIRST = 0.1  # seconds before the first retry
RETRY_MAX = 5.0  # the back-off's ceiling


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed tries in a row: doubling from
    ``RETRY_FIRST`` up to ``RETRY_MAX``, each drawn at random from its upper half, so that a
    fleet's workers do not all retry in the same instant after a database restart."""
    ceiling = min(RETRY_MAX, RETRY_FIRST * 2 ** (max(1, failures) - 1))
    return random.uniform(ceiling / 2, ceiling)
