"""``python -m maplookup`` is the ``maplookup`` command."""

from maplookup.cli.main import main

raise SystemExit(main())
