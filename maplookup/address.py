"""Mail addresses the way Postfix reads and writes them: folding, quoting, extensions.

Pure functions over ``str``, no I/O.  Each follows one Postfix source file, because an answer
is right only when it matches what Postfix itself would do with a ``hash:`` table holding the
same data (DESIGN.md section 2, facts 10 to 12):

* :func:`fold` — ``src/util/casefold.c``: with ``smtputf8_enable = yes`` ICU's full default
  case folding (no normalisation), which Python's ``str.casefold`` reproduces exactly (checked
  against Postfix 3.7's own folding over every code point); with ``no``, ASCII letters only.
* :func:`unquote_local`, :func:`quote_local` — ``src/global/quote_822_local.c``: Postfix works
  on the *internal* (unquoted) form and sends a local part that is not a dot-atom in quoted
  (*external*) form, ``"joe+odd user"@example.org``.
* :func:`split_extension` — ``src/global/split_addr.c``: where an address extension starts.
"""

from __future__ import annotations

import re

# RFC 822 specials, space and controls: a local part holding any of them, or not a
# dot-separated sequence of non-empty atoms, is quoted (quote_822_local.c: is_822_dot_string).
# Bytes >= 0x80 are ordinary (QUOTE_FLAG_8BITCLEAN), so UTF-8 local parts stay unquoted.
_DOT_ATOM = re.compile(r'[^()<>@,;:\\".\[\]\x00-\x20\x7f]+(?:\.[^()<>@,;:\\".\[\]\x00-\x20\x7f]+)*')

_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# Local parts that are never split at the recipient delimiter (split_addr.c).
_NEVER_SPLIT = frozenset({"postmaster", "mailer-daemon", "double-bounce"})


def fold(text: str, smtputf8: bool = True) -> str:
    """Fold ``text`` as Postfix folds table keys (casefold.c).

    ``smtputf8`` is Postfix's ``smtputf8_enable``: full Unicode case folding when true
    (``Straße`` and ``STRASSE`` both become ``strasse``, every capital sigma a small one),
    ASCII letters only when false.  Never a plain ``lower()``: it differs from Postfix on about 300
    code points (``ß``, ``ς``, ``ﬁ``, Cherokee).
    """
    if text.isascii():
        return text.lower()  # the same as both foldings for ASCII, and the fastest
    if not smtputf8:
        return text.translate(_ASCII_UPPER)
    return text.casefold()


def unquote_local(address: str) -> str:
    """The internal form of an address: quotes and backslash escapes removed from its local part.

    As ``unquote_822_local`` does: everything up to the last ``@`` outside quotes is unquoted,
    the domain after it is kept as it is.  ``"joe+odd user"@example.org`` becomes
    ``joe+odd user@example.org``; a plain address is returned unchanged.
    """
    if '"' not in address and "\\" not in address:
        return address
    out: list[str] = []
    in_quote = False
    bare_at_src = -1
    bare_at_dst = -1
    i = 0
    n = len(address)
    while i < n:
        c = address[i]
        if not in_quote and c == "@":
            bare_at_src, bare_at_dst = i, len(out)
        if c == '"':
            in_quote = not in_quote
            i += 1
            continue
        if c == "\\":
            if i + 1 == n:
                i += 1
                continue
            i += 1
            c = address[i]
        out.append(c)
        i += 1
    if bare_at_dst >= 0:
        del out[bare_at_dst:]
        return "".join(out) + address[bare_at_src:]
    return "".join(out)


def quote_local(address: str) -> str:
    """The external form of an internal address: its local part quoted unless a dot-atom.

    As ``quote_822_local``: the local part is what precedes the last ``@`` (all of it for a
    local account name); inside quotes, ``"`` and ``\\`` are escaped.  ``jsmith+odd
    user@example.org`` becomes ``"jsmith+odd user"@example.org``; ``straße@x`` is unchanged.
    """
    at = address.rfind("@")
    local, rest = (address, "") if at < 0 else (address[:at], address[at:])
    if _DOT_ATOM.fullmatch(local):
        return address
    escaped = local.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\\r")
    return f'"{escaped}"{rest}'


def split_extension(local_part: str, delimiter: str) -> tuple[str, str | None]:
    """``(base, extension)`` of a local part; the extension starts with its delimiter.

    As ``split_addr`` (src/global/split_addr.c): the local part is cut at the first character
    that is in ``delimiter`` (a set, like ``recipient_delimiter``), but never for
    ``postmaster``, ``mailer-daemon`` and ``double-bounce``, nor for ``owner-*`` and
    ``*-request`` when ``-`` is a delimiter, nor when the base would be empty.
    ``("user+Tag", "+")`` gives ``("user", "+Tag")``; no extension gives ``(local, None)``.
    """
    if not delimiter or not local_part:
        return local_part, None
    # The cut first: most local parts hold no delimiter, and then no rule below can matter
    # (a lookup's hot path: bench/README.md, "Complete mode").
    if len(delimiter) == 1:
        cut = local_part.find(delimiter)
    else:
        cut = min((i for i in map(local_part.find, delimiter) if i >= 0), default=-1)
    if cut <= 0:
        return local_part, None
    lowered = local_part.lower() if local_part.isascii() else local_part.translate(_ASCII_UPPER)
    if lowered in _NEVER_SPLIT:
        return local_part, None
    if "-" in delimiter and (
        lowered.startswith("owner-") or (len(lowered) > 8 and lowered.endswith("-request"))
    ):
        return local_part, None
    return local_part[:cut], local_part[cut:]


def split_address_list(value: str) -> list[str]:
    """The addresses of a table result, in external form, split as Postfix's tok822 parser
    splits them for a plain list: at commas and white space outside double quotes.

    ``a@x, "joe user"@y z@w`` gives ``['a@x', '"joe user"@y', 'z@w']``.  Comments and
    ``<...>`` are not read (the callers refuse them); an unbalanced quote runs to the end.
    """
    addresses: list[str] = []
    current: list[str] = []
    in_quote = False
    i = 0
    while i < len(value):
        c = value[i]
        if in_quote and c == "\\" and i + 1 < len(value):
            current.append(value[i : i + 2])
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif not in_quote and (c == "," or c.isspace()):
            if current:
                addresses.append("".join(current))
                current = []
            i += 1
            continue
        current.append(c)
        i += 1
    if current:
        addresses.append("".join(current))
    return addresses
