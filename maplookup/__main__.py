"""``python -m maplookup`` is the ``maplookup`` command."""

from maplookup.cli import main

raise SystemExit(main())
