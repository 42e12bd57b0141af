"""Finding the PostgreSQL server binaries (pg_ctl and initdb) on this machine.

Used when no bin directory is configured: an administrator's PATH wins, then the Debian/Ubuntu
versioned directories (newest first), then a source build's default location.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EmbeddedPostgresError

_REQUIRED_BINARIES = ("pg_ctl", "initdb")


# --------------------------------------------------------------------------
# locating things


def _has_binaries(d: Path) -> bool:
    return all(os.access(d / name, os.X_OK) and (d / name).is_file() for name in _REQUIRED_BINARIES)


def _version_key(d: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin so that 15 beats 9.6."""
    parts: list[int] = []
    for piece in d.parent.name.split("."):
        try:
            parts.append(int(piece))
        except ValueError:
            return (-1,)
    return tuple(parts)


def find_pg_bin_dir() -> Path:
    """Find the directory holding the PostgreSQL server binaries.

    PATH wins so that an administrator can choose a version explicitly; Debian
    and Ubuntu keep server binaries off PATH under /usr/lib/postgresql/<v>/bin
    (newest wins); source builds default to /usr/local/pgsql/bin.
    """
    tried: list[str] = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            candidate = Path(entry)
            if _has_binaries(candidate):
                # /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl: prefer the
                # real directory, which also holds postgres, psql and friends.
                real = (candidate / "pg_ctl").resolve().parent
                return real if _has_binaries(real) else candidate
    tried.append("PATH")
    versioned = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in versioned:
        if _has_binaries(candidate):
            return candidate
    tried.append("/usr/lib/postgresql/*/bin")
    fallback = Path("/usr/local/pgsql/bin")
    if _has_binaries(fallback):
        return fallback
    tried.append(str(fallback))
    raise EmbeddedPostgresError(
        f"PostgreSQL server binaries ({', '.join(_REQUIRED_BINARIES)}) not found; tried "
        f"{', '.join(tried)}; install the PostgreSQL server (e.g. `apt-get install postgresql`) "
        "or configure a database DSN instead of the embedded cluster"
    )
