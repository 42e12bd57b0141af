"""maplookup: Postfix virtual-hosting lookup tables served from PostgreSQL over socketmap."""

__version__ = "0.1.0"
