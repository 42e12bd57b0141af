"""Loading the configuration: the TOML file, the environment and flags, layered and checked.

Owns ``load_settings`` (each layer a nested dict merged over the one below, then validated
as ``config.Settings``), the DSN file, and the error lines that say where a bad value came
from (file and line, or the environment variable as it was spelt).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from maplookup.config import ConfigError, Settings
from maplookup.config_env import (
    DSN_VARIABLE,
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    EnvironSource,
    merge,
    setting_variables,
    unknown_variables,
)

SETTING_VARIABLES = setting_variables(Settings)


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
    unknown = unknown_variables(environ, SETTING_VARIABLES)
    if unknown:
        raise ConfigError(unknown)
    try:
        from_env = EnvironSource(Settings, environ)()
    except SettingsError as exc:  # not expected: non-JSON values are passed on as strings
        raise ConfigError([f"environment: {exc}"]) from exc
    flags = dict(overrides or {})
    try:
        settings = Settings.model_validate(merge(merge(data, from_env), flags))
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
