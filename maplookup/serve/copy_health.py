"""The complete copy's part of ``/healthz`` (``cache.mode = "complete"``).

Unhealthy while the first snapshot loads (the server is not ready yet: systemd has not been
told READY either) and when the copy is older than ``max_stale_s`` (lookups then go to the
database, TEMP if it is away).  A copy refused for its size is reported but healthy: the LRU
mode answers, as configured for that case.
"""

from __future__ import annotations

from maplookup.metrics.views import CopyView


def copy_health(copy: CopyView) -> tuple[dict[str, object], str | None]:
    """The details, and the problem that makes the host unhealthy (None if none)."""
    details: dict[str, object] = {"max_stale_s": copy.max_stale_s}
    if copy.refused is not None:
        details["state"] = "refused: answering in LRU mode"
        details["reason"] = copy.refused
        return details, None
    age = copy.age()
    if age is None or copy.copy is None:
        details["state"] = "loading"
        return details, "complete copy: the first snapshot is not loaded yet"
    details.update(
        state="current" if age <= copy.max_stale_s else "too old: lookups go to the database",
        age_s=round(age, 3),
        position=copy.position,
        loaded_in_s=None if copy.loaded_in_s is None else round(copy.loaded_in_s, 3),
        entries=copy.copy.counts(),
    )
    if age > copy.max_stale_s:
        return details, (
            f"complete copy not confirmed current for {age:.1f} s (max_stale_s = "
            f"{copy.max_stale_s} s): lookups go to the database"
        )
    return details, None
