"""Configuration: one pydantic model, read from a TOML file, the environment and flags.

This module owns the model (what can be configured, its defaults and checks);
``config_load`` reads it (``load_settings``), ``config_env`` names and reads the environment.

Precedence, lowest first: defaults, the TOML file (``--config``), environment variables,
command-line flags.  The environment is read by pydantic-settings (``env_prefix``
``MAPLOOKUP_``, ``env_nested_delimiter`` ``__``): ``MAPLOOKUP_<FIELD>`` for top-level
settings (``MAPLOOKUP_WORKERS``), ``MAPLOOKUP_<SECTION>__<FIELD>`` for the others
(``MAPLOOKUP_LIMITS__MAX_CONNECTIONS``), lists and tables as JSON, and ``MAPLOOKUP_DSN`` as
the short name of ``MAPLOOKUP_DATABASE__DSN``.

Every model forbids unknown keys, so a typo is an error, not a silently ignored setting; the
same holds for the environment: a ``MAPLOOKUP_*`` variable that names no setting is an error
(with the closest valid name), except the few the project uses for other things
(``config_env.NOT_SETTINGS``).  Every model is frozen, so a running server cannot see half-changed
settings.  Limits carry their unit in the name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from maplookup.config_env import ENV_NESTED_DELIMITER, ENV_PREFIX
from maplookup.maps import MapName


class ConfigError(Exception):
    """The configuration cannot be used; each problem says where (file and line) and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostPort(_Model):
    """A TCP endpoint written ``host:port`` (``[v6addr]:port`` for IPv6)."""

    host: str
    port: Annotated[int, Field(ge=0, le=65535)]

    @classmethod
    def parse(cls, text: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _coerce_host_port(value: object) -> object:
    return HostPort.parse(value) if isinstance(value, str) else value


class ListenSettings(_Model):
    """Where the server listens.  Loopback by default: the maps describe every mailbox."""

    socketmap: list[HostPort] = Field(default_factory=lambda: [HostPort.parse("127.0.0.1:9000")])
    socketmap_unix: Path | None = None
    # Postfix's processes (user postfix) must be able to connect; nobody else needs to.
    socketmap_unix_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    socketmap_unix_group: str | None = None
    # tcp_table carries no map name: one listener per map (tcp_table(5)).
    tcp_table: dict[MapName, HostPort] = Field(default_factory=dict)
    # Clients allowed to connect over TCP (CIDR).  Loopback is always allowed.  Binding a
    # non-loopback address needs this list, or allow_any_client = true: the maps name every
    # mailbox and alias, which is not for the whole network to read.
    allowed_clients: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    allow_any_client: bool = False

    @model_validator(mode="after")
    def _exposure_is_deliberate(self) -> ListenSettings:
        exposed = [
            str(e)
            for e in [*self.socketmap, *self.tcp_table.values()]
            if not _is_loopback_host(e.host)
        ]
        if exposed and not self.allowed_clients and not self.allow_any_client:
            raise ValueError(
                f"listening on {', '.join(exposed)} exposes the maps beyond this host: set "
                "allowed_clients (CIDR list) or allow_any_client = true"
            )
        return self

    @field_validator("socketmap", mode="before")
    @classmethod
    def _parse_socketmap(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [_coerce_host_port(v) for v in value]
        return value

    @field_validator("tcp_table", mode="before")
    @classmethod
    def _parse_tcp_table(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {k: _coerce_host_port(v) for k, v in value.items()}
        return value


# Postfix keeps keys under 10,000 bytes (src/global/dict_sockmap.c); room for the map name and
# the netstring header.  Owned here; the protocol codecs take the limit as a parameter (their
# own default is the same number, tests/unit/test_config.py holds them together).
MAX_REQUEST_BYTES_DEFAULT = 16_384


class LimitSettings(_Model):
    """Per-connection limits.  Defaults follow Postfix's own client (src/global/dict_sockmap.c)."""

    # Postfix keeps keys under 10,000 bytes; room for the map name and the netstring header.
    max_request_bytes: PositiveInt = MAX_REQUEST_BYTES_DEFAULT
    # A started request must complete within this; Postfix writes a request in one go.
    read_timeout_s: PositiveFloat = 10.0
    # Longer than Postfix's own 10 s idle close, so Postfix, not us, ends idle connections.
    idle_timeout_s: PositiveFloat = 60.0
    # A peer that stops reading its replies is dropped after this.
    write_timeout_s: PositiveFloat = 10.0
    # Every Postfix process holds one connection per endpoint; default_process_limit is 100.
    max_connections: PositiveInt = 1000
    # On SIGTERM, in-flight requests get this long to be answered before connections are cut.
    drain_timeout_s: PositiveFloat = 10.0


class DatabaseSettings(_Model):
    """PostgreSQL access.  No dsn: the embedded private cluster is used."""

    dsn: SecretStr | None = None
    # A file holding the DSN (first line), readable only by the service: keeps the password
    # out of the config file, the environment and `ps` output.  Overrides dsn.
    dsn_file: Path | None = None
    # Below Postfix's 100 s client timeout, so Postfix gets TEMP rather than a timeout.
    query_timeout_s: PositiveFloat = 5.0
    connect_timeout_s: PositiveFloat = 5.0
    pool_max_connections: PositiveInt = 10
    # Cache misses waiting at the same moment go to PostgreSQL as one statement of up to this
    # many keys (a statement costs far more than a key in it); a lone miss is sent at once.
    max_keys_per_query: Annotated[int, Field(ge=1, le=1000)] = 32


class LookupConfig(_Model):
    """What changes answers; must match Postfix's main.cf (recipient_delimiter)."""

    # Like Postfix's recipient_delimiter: a set of characters, any of which starts an extension.
    recipient_delimiter: Annotated[str, Field(max_length=16)] = "+"
    default_uid: PositiveInt | None = None
    default_gid: PositiveInt | None = None
    # Postfix's smtputf8_enable (yes since compatibility_level 1): keys fold with full Unicode
    # case folding (Straße = STRASSE = strasse) when true, ASCII letters only when false, as
    # Postfix folds them (src/util/casefold.c).  Must match main.cf, like the delimiter.
    smtputf8_enable: bool = True

    @field_validator("recipient_delimiter")
    @classmethod
    def _delimiter_chars(cls, value: str) -> str:
        if any(c.isspace() or c in '@,"' or not c.isprintable() for c in value):
            raise ValueError("recipient_delimiter may not hold white space, '@', ',' or '\"'")
        return value


class MetricsConfig(_Model):
    """Prometheus /metrics and /healthz over HTTP.  Off unless ``listen`` is set."""

    listen: HostPort | None = None  # e.g. "127.0.0.1:9100"; keep it off the public network

    @field_validator("listen", mode="before")
    @classmethod
    def _parse_listen(cls, value: object) -> object:
        return _coerce_host_port(value)


#: ``cache.complete_max_bytes``'s default: 1 GiB, about 3.5 to 6 million addresses at the
#: 157-300 bytes each that bench/README.md ("Complete copy") measures; twice that while the
#: copy is rebuilt (old and new side by side), per worker.
COMPLETE_MAX_BYTES_DEFAULT = 2**30


class CacheConfig(_Model):
    """The answer cache (DESIGN.md section 5).  ``max_entries = 0`` turns it off.

    ``mode`` names what the server keeps in memory: ``"lru"``, the answers recently asked
    (bounded by ``max_entries``, every miss asks PostgreSQL); ``"complete"``, every row the
    maps read, so that every key (present or absent) is answered without PostgreSQL, during
    its outages too (README, "The cache").  Named after the data held, not after speed: both
    are kept coherent by the same change feed.
    """

    mode: Literal["lru", "complete"] = "lru"
    # The complete copy's bound (its own size estimate, checked while the snapshot streams
    # in): a larger copy is refused and the server answers in "lru" mode, saying so once.
    complete_max_bytes: Annotated[int, Field(ge=0)] = COMPLETE_MAX_BYTES_DEFAULT
    # Start-up reports ready (sd_notify READY, /healthz 200) once the copy is loaded, but
    # at the latest after this long: with PostgreSQL down at boot, systemd would otherwise
    # kill and restart the server at its start timeout (90 s by default), over and over.
    # Until the copy is in, lookups go to the database and /healthz says why it is 503.
    complete_ready_timeout_s: PositiveFloat = 60.0
    # Answers given from the complete copy that are remembered (per worker, entries of map
    # and key), forgotten whole at every change: Postfix asks for a recipient several times
    # per message.  About 150 bytes an entry: 100,000 entries ~ 15 MB.  0 = none.
    complete_memo_entries: Annotated[int, Field(ge=0)] = 100_000

    # About 500 bytes an entry with its strings (bench/cache.py): 100,000 entries ~ 50 MB.
    max_entries: Annotated[int, Field(ge=0)] = 100_000
    # Changes arrive by NOTIFY within milliseconds; the TTLs only bound the damage if one is
    # ever missed without the connection dropping.
    positive_ttl_s: PositiveFloat = 600.0
    negative_ttl_s: PositiveFloat = 60.0
    # While PostgreSQL is unreachable, cached answers up to this old are still served.
    max_stale_s: Annotated[float, Field(ge=0)] = 3600.0
    # How often the server reads the change log (on the database it reads lookups from, a
    # standby included) when no NOTIFY wakes it earlier: on a standby, a change is seen within
    # this plus the replay lag; on a primary NOTIFY makes it milliseconds.  Each read also
    # checks the connection.
    change_feed_poll_interval_s: PositiveFloat = 0.2
    # /healthz turns unhealthy (503, and says why) when the change feed has not read the log
    # successfully for this long: the cache then no longer follows changes (every lookup
    # queries the database meanwhile, but a host in that state needs an admin).  Well above
    # what a failover through a host list takes (reconnect back-off up to 2 s, plus
    # connect_timeout_s for each dead host before the one that answers).
    change_feed_stuck_after_s: PositiveFloat = 30.0
    # Unused since the change feed (schema version 5): its reads check the connection every
    # change_feed_poll_interval_s.  Still accepted, so that a config file written for an
    # older version loads after an upgrade (refusing it would stop the server, and mail);
    # `check-config` says to remove it.
    listen_keepalive_s: Annotated[
        PositiveFloat, Field(deprecated="unused since the change feed: remove it")
    ] = 5.0


class EmbeddedSettings(_Model):
    """The private PostgreSQL cluster started when no dsn is configured."""

    state_dir: Path | None = None  # default: /var/lib/maplookup as root, else XDG state dir
    run_as_user: str | None = None  # default: postgres when running as root
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 = any free port on 127.0.0.1


class Settings(BaseSettings):
    """Everything ``maplookup serve`` needs.

    A pydantic-settings model, so that its ``env_prefix`` and ``env_nested_delimiter`` say how
    the environment maps onto it; ``load_settings`` reads the environment with them.
    """

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
    )

    listen: ListenSettings = Field(default_factory=ListenSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    lookup: LookupConfig = Field(default_factory=LookupConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    # Processes answering lookups: one per core is the usual choice.  Each has its own cache
    # (kept coherent by its own LISTEN) and database pool (pool_max_connections each).
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    log_level: str = "info"
    # text (for people), logfmt or json (for log collectors).
    log_format: str = "text"
    # Fraction of lookups logged with map, key, result and duration (0 = none).  Keys are
    # mail addresses: turning this on writes them to the log.
    query_log_sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    # Started as root: switch to this user (and its groups) once the listeners are bound.
    user: str | None = None
    # Started as root without `user`: refuse, unless this is true.
    allow_root: bool = False

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value.lower() not in ("text", "logfmt", "json"):
            raise ValueError("log_format is one of text, logfmt, json")
        return value.lower()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level is one of debug, info, warning, error")
        return value.lower()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: constructing Settings never reads ``os.environ`` by itself.

        ``config_load.load_settings`` reads the environment (``config_env.EnvironSource``) so
        that it can be passed in (tests give ``environ={}``), checked for unknown names first
        and placed between the file and the flags; a second, implicit reading here would undo
        all three.
        """
        return (init_settings,)


def redact_dsn(dsn: str) -> str:
    """A DSN fit to print: its password replaced by ``***``."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return re.sub(r"(password=)[^&\s]*", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
