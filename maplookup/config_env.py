"""The environment as a configuration layer: the ``MAPLOOKUP_*`` names, and reading them.

Owns the names (``ENV_PREFIX``, ``ENV_NESTED_DELIMITER``, the ``MAPLOOKUP_DSN`` short name,
the project's own variables that are no settings), the pydantic-settings source that reads a
given mapping instead of ``os.environ``, and the check that refuses a ``MAPLOOKUP_*`` variable
naming no setting.  The settings models are in ``config``, ``load_settings`` in
``config_load``.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource

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
    # tests/integration/test_complete_copy.py: how many examples, and whether to shrink.
    "MAPLOOKUP_TEST_EXAMPLES",
    "MAPLOOKUP_TEST_SHRINK",
)


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


class EnvironSource(EnvSettingsSource):
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
            data = merge(data, {"database": {"dsn": dsn}})
        return data


def _map_keys(annotation: object) -> list[str]:
    """The keys of a table field whose keys are an enum (tcp_table's map names), else none."""
    if get_origin(annotation) is not dict:
        return []
    key = get_args(annotation)[0]
    if isinstance(key, type) and issubclass(key, enum.Enum):
        return [str(member.value) for member in key]
    return []


def setting_variables(settings_cls: type[BaseSettings]) -> frozenset[str]:
    """Every environment variable that names a setting, spelt as pydantic-settings reads them.

    A section can be given whole as JSON (``MAPLOOKUP_LIMITS``) or field by field; a table
    with known keys (``tcp_table``) also key by key (``MAPLOOKUP_LISTEN__TCP_TABLE__VMAILBOX``).
    """
    names = {DSN_VARIABLE}
    for name, field in settings_cls.model_fields.items():
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


def unknown_variables(environ: Mapping[str, str], known: frozenset[str]) -> list[str]:
    """A problem for each MAPLOOKUP_* variable that is no setting, with the closest valid name.

    pydantic-settings ignores variables that match no field, so without this a misspelt
    ``MAPLOOKUP_WORKER=4`` would leave ``workers`` at its default without a word.  Names are
    compared ignoring case, as pydantic-settings reads them.
    """
    candidates = sorted(v.removeprefix(ENV_PREFIX) for v in known)
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if upper in NOT_SETTINGS:
            continue
        problem = f"environment: {name} is not a maplookup setting"
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), candidates, n=1)
        if close:
            problem += f"; did you mean {ENV_PREFIX}{close[0]}?"
        problems.append(problem)
    return problems
