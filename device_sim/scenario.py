"""Scenario files: a fleet and its faults written in TOML, read into a `SimConfig`.

A scenario's top-level keys are `SimConfig`'s fields and its tables are the nested
models (`[timing]`, `[faults]`, `[battery]`, `[link_classes.NAME]`,
`[[merchant_profiles]]`); docs/simulator.md lists every key with its default. A key the
file leaves out keeps its default, and overrides (the command line's options and its
`--set key.path=value`) replace the file's values key by key, so four processes can run
one scenario with four different `--start`/`--count` slices.

Every problem is reported with the dotted path of its key, all at once.
"""

import difflib
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from device_sim.config import SimConfig

_INPUT_SHOWN = 60


class ScenarioError(ValueError):
    """A scenario cannot be used; `problems` has one line per bad key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        """Keep where the scenario came from and each problem."""
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))
        self.source = source
        self.problems = problems


def read_scenario(path: Path) -> dict[str, Any]:
    """Return a scenario file's tables as read, unvalidated.

    Raises:
        ScenarioError: the file cannot be read or is not TOML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(str(path), [f"cannot read it: {exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(str(path), [f"not valid TOML: {exc}"]) from None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, table by table (other values replace)."""
    merged = dict(base)
    for key, value in overrides.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge(below, value)
        else:
            merged[key] = value
    return merged


def parse_setting(text: str) -> dict[str, Any]:
    """Turn ``faults.corrupt_rate=0.1`` into ``{"faults": {"corrupt_rate": 0.1}}``.

    The value is read as a TOML value (numbers, booleans, arrays, inline tables, quoted
    strings); anything that is not TOML is taken as a bare string.

    Raises:
        ValueError: there is no ``=`` or no key.
    """
    key, found, raw = text.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not found or not all(parts):
        msg = f"expected key.path=value, got {text!r}"
        raise ValueError(msg)
    try:
        value: Any = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    for part in reversed(parts):
        value = {part: value}
    result: dict[str, Any] = value
    return result


def build_config(data: Mapping[str, Any], *, source: str) -> SimConfig:
    """Validate scenario tables into a `SimConfig`.

    Raises:
        ScenarioError: a key is unknown or a value is out of range; one line per problem.
    """
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(source, [_describe(error) for error in exc.errors()]) from None


def load_scenario(path: Path | None, overrides: Mapping[str, Any] | None = None) -> SimConfig:
    """Read a scenario file (or start from the defaults), apply `overrides`, validate.

    Raises:
        ScenarioError: the file or the result is not a valid scenario.
    """
    data = read_scenario(path) if path is not None else {}
    source = str(path) if path is not None else "options"
    return build_config(merge(data, overrides or {}), source=source)


def _describe(error: ErrorDetails) -> str:
    # Pydantic marks a bad dict key with a "[key]" step; the key itself names it.
    loc = tuple(part for part in error["loc"] if part != "[key]")
    where = ".".join(str(part) for part in loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = _model_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), list(known.model_fields), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{where}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{where}: required"
    value = error.get("input")
    shown = repr(value)
    plain = not isinstance(value, dict | list) and len(shown) <= _INPUT_SHOWN
    got = f" (got {shown})" if plain and where else ""
    return f"{where}: {message}{got}" if where else message


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model whose keys live at `loc` (list indexes and table names skipped)."""
    model: type[BaseModel] = SimConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = _nested_model(field.annotation) or model
    return model


def _nested_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None
