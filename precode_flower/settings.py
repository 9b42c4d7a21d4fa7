"""Settings declared once: a dataclass field's metadata is its flag, help, type and bounds.

:func:`setting` declares a field of a settings dataclass (:class:`precode_flower.task.RunConfig`)
with a :class:`Spec`: help text, numeric bounds, choices. Everything else is derived from
the fields, so adding a setting touches its dataclass only:

- :func:`validate`: each value checked against its spec (numbers must be finite; a bad value
  raises ValueError naming the key, the bound and the value, in one line);
- :func:`add_arguments` / :func:`from_namespace`: command-line flags (``--some-name`` for
  field ``some_name``) and the dataclass built from parsed flags;
- :func:`toml_lines`: the ``[tool.flwr.app.config]`` entries of ``pyproject.toml`` (a test
  keeps the table there equal to them);
- :func:`subset`: a smaller settings dataclass taken from a larger one by field name.

Settings that belong to a component are declared on that component's dataclass and
inherited: :class:`~precode_flower.task.RunConfig` inherits the defenses' parameters from
:class:`~precode_flower.defenses.DefenseParams` and
:class:`~precode_flower.defenses.DpParams` (fields in inheritance order, the base's
first), and builds those back with :func:`subset`. So adding a defense parameter touches
the defense and its dataclass only: the field is a run-config key, a flag and a check
without any other edit; its ``pyproject.toml`` line is regenerated from :func:`toml_lines`
(the drift test names it). A test asserts that RunConfig declares no defense parameter of
its own.

Nothing here imports Flower or torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "Spec",
    "add_arguments",
    "check",
    "describe",
    "from_namespace",
    "key_of",
    "setting",
    "specs",
    "subset",
    "toml_lines",
    "validate",
]


@dataclass(frozen=True)
class Spec:
    """How one setting is parsed, bounded and documented.

    Attributes:
        help: one line for ``--help`` and the pyproject comment.
        low / high: bounds of a number (None: unbounded); ``low_open`` / ``high_open`` make
            them exclusive. NaN and infinities are never valid.
        choices: the valid strings (compared in lower case).
        zero: what 0 means where 0 is valid whatever ``low`` says ("off", "auto"); "" = no
            such meaning.
        parse: turns a flag or config string into the value (tuples: comma lists).
        flag: the flag's name when it is not ``--<key>`` (e.g. ``--defense``).
        group: the ``--help`` section.
        cli: whether the setting has a flag at all.
    """

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    zero: str = ""
    parse: Callable[[Any], Any] | None = None
    flag: str | None = None
    group: str = "training"
    cli: bool = True


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with a :class:`Spec` (mutable defaults are not supported)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def key_of(name: str) -> str:
    """Field ``some_name`` is key ``some-name`` (Flower's run config style)."""
    return name.replace("_", "-")


def specs(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Spec]]:
    """The fields of ``cls`` that are settings, with their specs, in declaration order."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if isinstance(spec, Spec):
            yield f, spec


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds_text(spec: Spec) -> str:
    parts = []
    if spec.low is not None:
        parts.append(f"{'>' if spec.low_open else '>='} {_num(spec.low)}")
    if spec.high is not None:
        parts.append(f"{'<' if spec.high_open else '<='} {_num(spec.high)}")
    text = " and ".join(parts)
    return text + (f" (0 = {spec.zero})" if spec.zero else "")


def describe(spec: Spec) -> str:
    """The help text with the choices and the meaning of 0, if any."""
    text = spec.help
    if spec.choices:
        text += f": {' | '.join(spec.choices)}"
    if spec.zero:
        text += f" (0 = {spec.zero})"
    return text


def check(key: str, spec: Spec, value: Any) -> Any:
    """``value`` normalised (choices in lower case) if ``spec`` allows it, else ValueError."""
    if spec.choices is not None:
        v = str(value).strip().lower()
        if v not in spec.choices:
            raise ValueError(f"unknown {key} {value!r}; choose one of: {', '.join(spec.choices)}")
        return v
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    if spec.zero and value == 0:
        return value
    low_ok = spec.low is None or (value > spec.low if spec.low_open else value >= spec.low)
    high_ok = spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)
    if not (low_ok and high_ok):
        raise ValueError(f"{key} must be {_bounds_text(spec)}, got {value}")
    return value


def validate(instance: Any) -> None:
    """Check (and normalise, on frozen dataclasses too) every setting of ``instance``."""
    for f, spec in specs(type(instance)):
        value = getattr(instance, f.name)
        if spec.parse is not None and isinstance(f.default, tuple):
            value = spec.parse(value)
        object.__setattr__(instance, f.name, check(key_of(f.name), spec, value))


def _flag_type(key: str, spec: Spec, default: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            if isinstance(default, int):
                value: Any = int(text)
            elif isinstance(default, float):
                value = float(text)
            elif spec.parse is not None:
                spec.parse(text)  # a comma list is joined and parsed once all are in
                return text
            else:
                value = text
            return check(key, spec, value)
        except ValueError as err:
            if isinstance(default, int) and "invalid literal" in str(err):
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
            if isinstance(default, float) and "could not convert" in str(err):
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = type(default).__name__  # argparse names the type in its messages
    return parse


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    titles: dict[str, str] | None = None,
    only: Collection[str] | None = None,
) -> None:
    """One flag per setting of ``cls`` (``defaults``: other defaults by field name; ``only``:
    just these fields), in argument groups named by :attr:`Spec.group` (``titles``: their
    ``--help`` headings).

    Every value is checked as it is parsed: a bad one is a one-line usage error (exit 2).
    """
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    instance = cls()
    for f, spec in specs(cls):
        if not spec.cli or (only is not None and f.name not in only):
            continue
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(
                (titles or {}).get(spec.group, spec.group)
            )
        g = groups[spec.group]
        key = key_of(f.name)
        flag = spec.flag or f"--{key}"
        default = defaults.get(f.name, getattr(instance, f.name))
        if isinstance(f.default, bool):
            g.add_argument(
                flag, dest=f.name, action="store_true", default=default, help=describe(spec)
            )
        elif isinstance(f.default, tuple):
            g.add_argument(
                flag,
                dest=f.name,
                action="append",
                type=_flag_type(key, spec, f.default),
                metavar="NAME[,NAME]",
                help=f"{describe(spec)} (repeatable or a comma list)",
            )
        else:
            g.add_argument(
                flag,
                dest=f.name,
                type=_flag_type(key, spec, f.default),
                default=default,
                choices=None,  # checked by the type (case-insensitively), listed in the help
                metavar="|".join(spec.choices) if spec.choices else None,
                help=describe(spec),
            )


def from_namespace(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``cls`` of parsed flags (see :func:`add_arguments`); ValueError on a bad combination."""
    kwargs: dict[str, Any] = {}
    for f, spec in specs(cls):
        if not spec.cli or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = ",".join(value) if value else f.default
        kwargs[f.name] = value
    kwargs.update(overrides)
    return cls(**kwargs)


def subset(cls: type[T], source: Any) -> T:
    """The ``cls`` made of the same-named fields of ``source`` (e.g. a RunConfig's
    :class:`~precode_flower.defenses.DefenseParams`), checked as ``cls`` checks them."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.init})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def toml_lines(cls: type, values: dict[str, Any], width: int = 31) -> list[str]:
    """``key = value  # help`` for each setting of ``cls`` (``values``: key -> config value)."""
    lines = []
    for f, spec in specs(cls):
        key = key_of(f.name)
        entry = f"{key} = {_toml_value(values[key])}"
        lines.append(f"{entry.ljust(width)}# {describe(spec)}")
    return lines
