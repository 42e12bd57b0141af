"""The sampled per-lookup query log (:class:`QueryLog`).

On its own because it is on the hot path (one float comparison per lookup when off) and carries
the privacy caveat of logging mail addresses.
"""

from __future__ import annotations

import logging
import random

from .formatting import fields


class QueryLog:
    """Logs a sample of lookups at INFO: fields ``map``, ``key``, ``result``, ``duration_ms``.

    ``sample_rate`` is the fraction of lookups logged: 0.0 never (the cost is then one float
    comparison per lookup), 1.0 every one.

    Privacy: the keys are mail addresses.  Enabling the query log writes the addresses of
    senders and recipients to the log, which may then fall under data-protection rules
    (retention, access); keep the rate at 0 unless debugging.
    """

    __slots__ = ("_logger", "_random", "sample_rate")

    def __init__(
        self, sample_rate: float, logger: logging.Logger, rng: random.Random | None = None
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self._logger = logger
        # Sampling, not security: a seedable PRNG is what is wanted.
        self._random = (random.Random() if rng is None else rng).random  # noqa: S311 - sampling, not secrets

    def maybe_log(self, map_name: str, key: str, status: str, seconds: float) -> None:
        rate = self.sample_rate
        if rate <= 0.0:
            return
        if rate < 1.0 and self._random() >= rate:
            return
        self._logger.info(
            "lookup",
            extra=fields(
                map=str(map_name),
                key=key,
                result=str(status),
                duration_ms=round(seconds * 1000.0, 3),
            ),
        )
