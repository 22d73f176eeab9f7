"""Strict reading of TOML tables: unknown keys, wrong types and bad values become ConfigError."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from latticeflow.base.errors import ConfigError


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning missing/unreadable/malformed files into ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read file ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), None, f"malformed TOML ({exc})") from None


class Table:
    """A TOML table being validated; ``source`` names the file, ``prefix`` the section."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(source, prefix or None, "expected a table")
        self.data, self.source, self.prefix = data, source, prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name) if name else self.prefix or None, problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The value of ``name`` checked against ``kind`` (ints are accepted as floats)."""
        self.seen.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "missing required key")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_names(kinds)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(name, f"must be finite, got {value}")
        return value

    def _in_range(self, name: str, value: Any, low: float | None, high: float | None,
                  low_open: bool = False) -> Any:
        """``value`` (None passes) if within [low, high] (or (low, high]), else a ConfigError."""
        if value is None:
            return value
        if low is not None and (value < low or (low_open and value == low)):
            raise self.error(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise self.error(name, f"must be <= {high}, got {value}")
        return value

    def number(self, name: str, default: Any = ..., *, low: float | None = None,
               high: float | None = None, low_open: bool = False) -> float:
        """A finite float within [low, high] (or (low, high] with ``low_open``)."""
        return self._in_range(name, self.get(name, float, default), low, high, low_open)

    def integer(self, name: str, default: Any = ..., *, low: int | None = None,
                high: int | None = None) -> int:
        """An int within [low, high]."""
        return self._in_range(name, self.get(name, int, default), low, high)

    def choice(self, name: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, str, default)
        if value not in options:
            raise self.error(name, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def sub(self, name: str, required: bool = False) -> Table:
        self.seen.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "missing required section")
            return Table({}, self.source, self.key(name))
        return Table(self.data[name], self.source, self.key(name))

    def finish(self) -> None:
        """Reject keys that were never asked for."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key" + (
                f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "a table"}.get(k, k.__name__) for k in kinds)
