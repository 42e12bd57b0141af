"""The one exception of the embedded cluster, shared by every module of this package."""

from __future__ import annotations


class EmbeddedPostgresError(Exception):
    """The private cluster could not be set up, started or stopped.

    Messages are one line and say what to do, because they end up printed by
    the CLI in front of an administrator.
    """
