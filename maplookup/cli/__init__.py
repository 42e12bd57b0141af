"""The ``maplookup`` command line: argparse front end, one module per command group.

The top layer: it may import any other; nothing imports it (``maplookup.__main__`` and the
console script excepted).
"""

from maplookup.cli.main import main

__all__ = ["main"]
