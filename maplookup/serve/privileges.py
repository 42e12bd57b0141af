"""Running as root only as long as needed: bind, then become an unprivileged user.

A lookup server has no business keeping root: once its listeners are bound (a port below 1024,
a socket in a root-owned directory), nothing it does needs privileges.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

log = logging.getLogger(__name__)


class PrivilegeError(Exception):
    """Privileges cannot be dropped as configured, or root is refused."""


def check_not_root(user: str | None, allow_root: bool) -> None:
    """Refuse to run as root unless told which user to become, or told root is fine."""
    if os.geteuid() == 0 and user is None and not allow_root:
        raise PrivilegeError(
            'refusing to run as root: set user = "maplookup" (privileges are dropped once the '
            "listeners are bound) or allow_root = true (MAPLOOKUP_ALLOW_ROOT=true)"
        )


def drop_to(user: str) -> None:
    """Become ``user`` (with its primary and supplementary groups) for the rest of the process.

    glibc applies setuid/setgid to every thread of the process, including the asyncio thread
    that owns the database pool.
    """
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise PrivilegeError(f"user: no user named {user!r}") from exc
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user: {user!r} is root; name an unprivileged user")
    groups = sorted({g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid})
    os.setgroups(groups)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise PrivilegeError("could not drop root privileges")
    log.info("running as user %s (uid %d, gid %d)", user, entry.pw_uid, entry.pw_gid)
