"""Configuration: one pydantic model, read from a TOML file, the environment and flags.

Precedence, lowest first: defaults, the TOML file (``--config``), environment variables,
command-line flags.  The environment is read by pydantic-settings (``env_prefix``
``MAPLOOKUP_``, ``env_nested_delimiter`` ``__``): ``MAPLOOKUP_<FIELD>`` for top-level
settings (``MAPLOOKUP_WORKERS``), ``MAPLOOKUP_<SECTION>__<FIELD>`` for the others
(``MAPLOOKUP_LIMITS__MAX_CONNECTIONS``), lists and tables as JSON, and ``MAPLOOKUP_DSN`` as
the short name of ``MAPLOOKUP_DATABASE__DSN``.

Every model forbids unknown keys, so a typo is an error, not a silently ignored setting; the
same holds for the environment: a ``MAPLOOKUP_*`` variable that names no setting is an error
(with the closest valid name), except the few the project uses for other things
(``NOT_SETTINGS``).  Every model is frozen, so a running server cannot see half-changed
settings.  Limits carry their unit in the name.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

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


class CacheConfig(_Model):
    """The answer cache (DESIGN.md section 5).  ``max_entries = 0`` turns it off."""

    # About 500 bytes an entry with its strings (bench/cache.py): 100,000 entries ~ 50 MB.
    max_entries: Annotated[int, Field(ge=0)] = 100_000
    # Changes arrive by NOTIFY within milliseconds; the TTLs only bound the damage if one is
    # ever missed without the connection dropping.
    positive_ttl_s: PositiveFloat = 600.0
    negative_ttl_s: PositiveFloat = 60.0
    # While PostgreSQL is unreachable, cached answers up to this old are still served.
    max_stale_s: Annotated[float, Field(ge=0)] = 3600.0
    # How often the LISTEN connection is checked when no notification arrives.
    listen_keepalive_s: PositiveFloat = 5.0


class EmbeddedSettings(_Model):
    """The private PostgreSQL cluster started when no dsn is configured."""

    state_dir: Path | None = None  # default: /var/lib/maplookup as root, else XDG state dir
    run_as_user: str | None = None  # default: postgres when running as root
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 = any free port on 127.0.0.1


ENV_PREFIX = "MAPLOOKUP_"
ENV_NESTED_DELIMITER = "__"
# The short name of MAPLOOKUP_DATABASE__DSN, older than the nested names and the one documented.
DSN_VARIABLE = "MAPLOOKUP_DSN"
# MAPLOOKUP_* variables that are not settings but are used by the project itself, so they may
# be set wherever maplookup runs without being an unknown setting.
NOT_SETTINGS = (
    "MAPLOOKUP_TEST_DSN",  # tests/conftest.py: the PostgreSQL the tests use instead of their own
    # tests/differential: how many random datasets, and which record kinds to leave out.
    "MAPLOOKUP_DIFFERENTIAL_SEEDS",
    "MAPLOOKUP_DIFFERENTIAL_EXCLUDE",
)


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

        ``load_settings`` reads the environment (``_EnvironSource``) so that it can be passed
        in (tests give ``environ={}``), checked for unknown names first and placed between
        the file and the flags; a second, implicit reading here would undo all three.
        """
        return (init_settings,)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ.

    Two departures from the stock source, both to keep what the hand-written reader accepted:
    ``MAPLOOKUP_DSN`` is read as ``database.dsn``, and a list or table value that is not JSON
    is passed on as the string it is, for the field's own validators (``socketmap`` takes a
    plain ``HOST:PORT``) or a validation error naming the variable, instead of pydantic-settings'
    SettingsError.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        # env_vars is what the stock source looks names up in; replacing it (rather than
        # patching os.environ) keeps the injected mapping local to this load.  Lower-cased
        # as the stock source does (case_sensitive=False); env_parse_none_str is not used.
        self.env_vars = {
            name.lower(): value
            for name, value in environ.items()
            if not (self.env_ignore_empty and value == "")
        }

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        dsn = self.env_vars.get(DSN_VARIABLE.lower())
        if dsn is not None:
            data = _merge(data, {"database": {"dsn": dsn}})
        return data


def _map_keys(annotation: object) -> list[str]:
    """The keys of a table field whose keys are an enum (tcp_table's map names), else none."""
    if get_origin(annotation) is not dict:
        return []
    key = get_args(annotation)[0]
    if isinstance(key, type) and issubclass(key, enum.Enum):
        return [str(member.value) for member in key]
    return []


def _setting_variables() -> frozenset[str]:
    """Every environment variable that names a setting, spelt as pydantic-settings reads them.

    A section can be given whole as JSON (``MAPLOOKUP_LIMITS``) or field by field; a table
    with known keys (``tcp_table``) also key by key (``MAPLOOKUP_LISTEN__TCP_TABLE__VMAILBOX``).
    """
    names = {DSN_VARIABLE}
    for name, field in Settings.model_fields.items():
        top = f"{ENV_PREFIX}{name.upper()}"
        names.add(top)
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        for sub_name, sub_field in section.model_fields.items():
            variable = f"{top}{ENV_NESTED_DELIMITER}{sub_name.upper()}"
            names.add(variable)
            names.update(
                f"{variable}{ENV_NESTED_DELIMITER}{key.upper()}"
                for key in _map_keys(sub_field.annotation)
            )
    return frozenset(names)


SETTING_VARIABLES = _setting_variables()


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A problem for each MAPLOOKUP_* variable that is no setting, with the closest valid name.

    pydantic-settings ignores variables that match no field, so without this a misspelt
    ``MAPLOOKUP_WORKER=4`` would leave ``workers`` at its default without a word.  Names are
    compared ignoring case, as pydantic-settings reads them.
    """
    candidates = sorted(v.removeprefix(ENV_PREFIX) for v in SETTING_VARIABLES)
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in SETTING_VARIABLES:
            continue
        if upper in NOT_SETTINGS:
            continue
        problem = f"environment: {name} is not a maplookup setting"
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), candidates, n=1)
        if close:
            problem += f"; did you mean {ENV_PREFIX}{close[0]}?"
        problems.append(problem)
    return problems


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from file, environment (``os.environ`` unless given) and flags.

    Each layer is a nested dict merged over the one below, so a flag replaces one setting of
    the environment or the file, not a whole section.  Every problem is a ConfigError whose
    lines say where (file and line, or environment variable) and why.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"cannot read config file {config_file}: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{config_file}: invalid TOML: {exc}"]) from exc
    environ = os.environ if environ is None else environ
    unknown = _unknown_variables(environ)
    if unknown:
        raise ConfigError(unknown)
    try:
        from_env = _EnvironSource(Settings, environ)()
    except SettingsError as exc:  # not expected: non-JSON values are passed on as strings
        raise ConfigError([f"environment: {exc}"]) from exc
    flags = dict(overrides or {})
    try:
        settings = Settings.model_validate(_merge(_merge(data, from_env), flags))
    except ValidationError as exc:
        text = config_file.read_text(encoding="utf-8") if config_file else ""
        raise ConfigError(_describe(exc, config_file, text, environ, from_env, flags)) from exc
    return _read_dsn_file(settings)


def _read_dsn_file(settings: Settings) -> Settings:
    path = settings.database.dsn_file
    if path is None:
        return settings
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError([f"database.dsn_file: cannot read {path}: {exc.strerror}"]) from exc
    dsn = lines[0].strip() if lines else ""
    if not dsn:
        raise ConfigError([f"database.dsn_file: {path} is empty"])
    database = settings.database.model_copy(update={"dsn": SecretStr(dsn)})
    return settings.model_copy(update={"database": database})


def _describe(
    exc: ValidationError,
    config_file: Path | None,
    text: str,
    environ: Mapping[str, str],
    from_env: Mapping[str, Any],
    flags: Mapping[str, Any],
) -> list[str]:
    """One line per error, naming where the bad value came from: flags beat the environment,
    which beats the file, so a value present in a higher layer is the one that was used."""
    problems = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        where = ".".join(loc)
        variable = None if _holds(flags, loc) else _variable_of(loc, environ, from_env)
        if variable is not None:
            name, rest = variable
            inner = f"{'.'.join(loc)}: " if rest else ""
            problems.append(f"environment: {name}: {inner}{error['msg']}")
            continue
        line = _line_of(text, loc) if text else None
        if config_file is None:
            prefix = "configuration"
        elif line is None:
            prefix = f"{config_file} (or the environment/flags)"
        else:
            prefix = f"{config_file}:{line}"
        problems.append(f"{prefix}: {where}: {error['msg']}")
    return problems


def _holds(data: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    """Whether ``data`` supplies the value at ``loc`` (or the list or value containing it)."""
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping):
            return True  # loc goes on into a list or a scalar that this layer supplied
        if part not in node:
            return False
        node = node[part]
    return True


def _variable_of(
    loc: tuple[str, ...], environ: Mapping[str, str], from_env: Mapping[str, Any]
) -> tuple[str, tuple[str, ...]] | None:
    """The environment variable that supplied the value at ``loc``, as it was spelt, and the
    part of ``loc`` below it (an item of a JSON list, a key of a JSON section), if any."""
    if not _holds(from_env, loc):
        return None
    present = {name.upper(): name for name in environ}
    for length in range(len(loc), 0, -1):
        head = loc[:length]
        names = [ENV_PREFIX + ENV_NESTED_DELIMITER.join(head).upper()]
        if head == ("database", "dsn"):
            names.insert(0, DSN_VARIABLE)  # read last, so it wins
        for name in names:
            if name in present:
                return present[name], loc[length:]
    return None


_SECTION = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")


def _line_of(text: str, loc: tuple[str, ...]) -> int | None:
    """The line of a TOML key given pydantic's error location, e.g. ("limits", "max_conns").

    Good enough for this file's shape (top-level keys and one level of [sections]); None when
    the value did not come from the file.
    """
    if not loc:
        return None
    section, key = ("", loc[0]) if len(loc) == 1 else (loc[0], loc[1])
    if len(loc) > 1 and loc[0] not in Settings.model_fields:
        section, key = "", loc[0]
    current = ""
    key_line = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            if not section and current == key:
                return number
            continue
        if current == section and key_line.match(line):
            return number
    return None


def redact_dsn(dsn: str) -> str:
    """A DSN fit to print: its password replaced by ``***``."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return re.sub(r"(password=)[^&\s]*", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
