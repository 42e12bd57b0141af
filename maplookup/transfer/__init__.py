"""Import Postfix source map files into the database, and export the database back to them.

``maplookup import`` reads the files a classic ``hash:``/``lmdb:`` set-up is built from, in
postmap(1) source format, and loads them in one transaction: either everything valid goes in or
(on any error, without ``--skip-errors``) nothing does.  ``maplookup export`` writes the database
back in the same format, so a site can leave maplookup again, or diff its data.

Markers (documented in every exported file's header): a comment line starting exactly with
``# disabled: `` holds a disabled record (Postfix skips it, import restores it disabled); in the
alias-domains file the value ``alias-of=DOMAIN`` (Postfix ignores domain-list values) marks a
mirror domain, whose hash-table equivalent is the catch-all ``@mirror  @DOMAIN`` in the virtual
file.  Together they make export -> import lossless for everything a source file can express.

The package, in the order an import runs through it:

- ``problems``: :class:`Problem` (a skipped or caveated line, with its file and line) and the
  terminal :class:`Progress` line, shared by every stage;
- ``source``: postmap(1) source format (logical lines, continuations, comments, key/value);
- ``records``, ``routing_records``: the typed records and the rules for each field (the six
  delivery maps; the sender-login, relay and transport maps of issue 14);
- ``checking``: what every reader shares (records from entries, repeated keys, derived blocks);
- ``reading``, ``reading_routing``: the files into checked, de-duplicated records
  (:func:`read_sources`);
- ``plan``: what the import will write, and the database rows it is compared with;
- ``planning``, ``planning_routing``: the rules comparing the files with the database;
- ``importing``, ``importing_routing``: the one transaction that fetches, plans and writes,
  and the summary;
- ``writing``: one export file (temporary file renamed into place) and what a line can hold;
- ``exporting``, ``exporting_routing``: the database back as source files, derived lines
  included, so that Postfix's ``hash:`` tables answer what maplookup answers.

This module re-exports what the CLI (maplookup/cli/transfer.py) and the tests use.

Layer: the Postfix side, above ``db`` (it writes through the admin rules); never
``serve`` or ``cli`` (tests/unit/test_layers.py).
"""

from __future__ import annotations

from .exporting import export_maps, export_summary, prepare_export_directory
from .importing import ImportOptions, import_parsed, summary_lines
from .problems import Problem, Progress, print_problems
from .reading import Sources, read_sources
from .source import parse_source

__all__ = [
    "ImportOptions",
    "Problem",
    "Progress",
    "Sources",
    "export_maps",
    "export_summary",
    "import_parsed",
    "parse_source",
    "prepare_export_directory",
    "print_problems",
    "read_sources",
    "summary_lines",
]
