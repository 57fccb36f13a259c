"""Registry of matching methods ("matchers").

A matcher turns the 2F x 2F correlation matrix of the concatenated features of two models
(model A's F features, then model B's) into a pair ``(merge, unmerge)``:

* ``unmerge`` U, 2F x F, 0/1: ``U[f, c] = 1`` when original feature ``f`` belongs to cluster ``c``;
* ``merge`` M, F x 2F: ``U.T`` with each row divided by its cluster size (a merged feature is the
  mean of its members), so that ``M @ U`` is the F x F identity.

Each matcher lives in its own module and registers itself with :func:`register`; it declares its
parameters (:class:`Param`) so that user input can be checked with :func:`validate_params` and
described in help texts. Importing :mod:`onnxzip.matchers` registers the built-in matchers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from onnxzip.errors import OptionError

__all__ = [
    "Param",
    "Matcher",
    "register",
    "get_matcher",
    "list_matchers",
    "validate_params",
]


@dataclass(frozen=True)
class Param:
    """One declared parameter of a matcher.

    ``type`` is ``float``, ``int`` or ``bool``. ``low``/``high`` are inclusive bounds
    (``None``: unbounded). Numbers must be finite.
    """

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    help: str = ""

    @property
    def range_text(self) -> str:
        """The valid range in words, e.g. ``[0, 1]``, ``>= 2`` or ``any finite number``."""
        if self.type is bool:
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"[{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.low is not None:
            return f">= {_fmt(self.low)}"
        if self.high is not None:
            return f"<= {_fmt(self.high)}"
        return "an integer" if self.type is int else "any finite number"

    def convert(self, value: Any, matcher: str) -> Any:
        """Convert ``value`` to this parameter's type and check its range; OptionError if not."""
        where = f"{self.name}={value!r} for {matcher}"
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise OptionError(f"{where} is not a boolean: give true or false")
        if isinstance(value, bool):
            raise OptionError(f"{where} is a boolean: give a number ({self.range_text})")
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{where} is not a number: give a number ({self.range_text})") from None
        if not math.isfinite(number):
            raise OptionError(
                f"{self.name}={_fmt(number)} is out of range for {matcher}: must be a finite number"
                + (f" in {self.range_text}" if self.low is not None or self.high is not None else "")
            )
        if self.type is int:
            if number != int(number):
                raise OptionError(f"{where} is not an integer: give a whole number ({self.range_text})")
            number = int(number)
        elif self.type is float:
            number = float(number)
        else:  # pragma: no cover - declared types are float, int, bool
            number = self.type(number)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise OptionError(
                f"{self.name}={_fmt(number)} is out of range for {matcher}: must be {_range_phrase(self)}"
            )
        return number


def _fmt(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and math.isfinite(x):
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def _range_phrase(p: Param) -> str:
    if p.low is not None and p.high is not None:
        return f"in {p.range_text}"
    return p.range_text


MatchFunction = Callable[..., "tuple[Any, Any]"]


@dataclass(frozen=True)
class Matcher:
    """A registered matching method.

    ``function(correlation, **params) -> (merge, unmerge)``: ``correlation`` is a float64
    2F x 2F array (the function does not modify it), ``params`` are the validated parameters.
    """

    name: str
    function: MatchFunction
    reference: str
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, Matcher] = {}


def register(
    name: str,
    *,
    reference: str,
    description: str,
    params: "tuple[Param, ...] | list[Param]" = (),
) -> Callable[[MatchFunction], MatchFunction]:
    """Decorator: register ``function`` as the matcher ``name`` (lower case, unique)."""
    key = name.strip().lower()
    if not key:
        raise ValueError("a matcher needs a non-empty name")
    params = tuple(params)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"matcher {key!r} declares a parameter twice: {names}")

    def decorate(function: MatchFunction) -> MatchFunction:
        old = _REGISTRY.get(key)
        if old is not None and _qualname(old.function) != _qualname(function):
            raise ValueError(f"a matcher named {key!r} is already registered")
        # (the same function registering again, e.g. on a module reload, replaces itself)
        _REGISTRY[key] = Matcher(key, function, reference, description, params)
        return function

    return decorate


def _qualname(function: Callable) -> tuple[str, str]:
    return (getattr(function, "__module__", ""), getattr(function, "__qualname__", repr(function)))


def list_matchers() -> list[Matcher]:
    """All registered matchers, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_matcher(name: str) -> Matcher:
    """The matcher called ``name`` (case-insensitive); OptionError listing the names if unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        available = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise OptionError(f"unknown matching method {name!r}: choose one of {available}") from None


def validate_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check ``params`` against matcher ``name``'s declaration; return them converted, defaults filled.

    Raises OptionError for an unknown matcher, an unknown parameter, a value of the wrong type
    or a value out of range.
    """
    matcher = get_matcher(name)
    params = dict(params or {})
    declared = {p.name: p for p in matcher.params}
    unknown = sorted(k for k in params if k not in declared)
    if unknown:
        known = ", ".join(declared) if declared else "none"
        raise OptionError(
            f"unknown parameter {unknown[0]!r} for {matcher.name}: its parameters are {known}"
        )
    out: dict[str, Any] = {}
    for p in matcher.params:
        out[p.name] = p.convert(params[p.name], matcher.name) if p.name in params else p.default
    return out
