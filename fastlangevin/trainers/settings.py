"""Settings declared once: a dataclass field holds a setting's default, help and bounds; the command-line options,
the checks, ``config.json`` and ``--resume`` are derived from it.

    @dataclass
    class TiltSettings:
        steps: int = setting(500, "training iterations", low=1, resume="extend")
        stop_on: str = setting("mmd2", "validation metric that picks the best model", choices=STOP_ON)

``add_options(parser, TiltSettings)`` adds ``--steps`` and ``--stop-on`` (nothing is filled in for options the user
does not give, so ``given_values`` tells given from default); ``make_settings(TiltSettings, values)`` checks values
by name and returns the dataclass; ``to_config`` / ``from_config`` write and read it as JSON.

Types come from the annotations: ``int``, ``float``, ``str``, ``bool``, ``tuple[float, float]`` (a fixed count),
``list[int]`` (one or more), each optionally ``| None``. An int is never a bool (numpy integers count as ints);
a float is finite. ``resume`` says what ``--resume`` does with a setting: ``"run"`` (the run's value; giving another
one is an error), ``"extend"`` (may grow: ``steps``) or ``"invocation"`` (this command's value: how it runs, not
what it learns).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import math
import numbers
import types
import typing

RESUME = ("run", "extend", "invocation")


class LazyChoices(collections.abc.Sequence):
    """Choices computed on first use, e.g. ``LazyChoices(lambda: fastlangevin.data.DATASETS)``: building the command
    line does not import what lists them (the data sets import scikit-learn); checking a value, an error message or
    ``--help`` does. Give the setting a ``metavar`` (argparse's usage line would list the choices)."""

    def __init__(self, compute):
        self._compute, self._values = compute, None

    def _get(self) -> tuple:
        if self._values is None:
            self._values = tuple(self._compute())
        return self._values

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, value) -> bool:
        return value in self._get()

    def __repr__(self) -> str:
        return repr(self._get())


def setting(default, help: str, *, low=None, above=None, high=None, below=None, choices=None,
            required: bool = False, resume: str = "run", cli: bool = True, positional: bool = False, metavar=None,
            exclusive: str | None = None):
    """A dataclass field for a setting: ``default`` and ``help`` (shown with the default by ``--help``); bounds
    ``low <= value``, ``above < value``, ``value <= high``, ``value < below`` (of each element, for tuples and
    lists); ``choices``; ``required`` (no default: the command
    needs it); ``resume`` (see the module docstring); ``cli=False`` keeps it off the command line; ``positional``;
    ``metavar``; ``exclusive``: a group name, options of one group exclude each other on the command line."""
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {RESUME}, got {resume!r}")
    meta = dict(help=help, low=low, above=above, high=high, below=below,
                choices=choices if choices is None or isinstance(choices, LazyChoices) else tuple(choices),
                required=required, resume=resume, cli=cli, positional=positional, metavar=metavar,
                exclusive=exclusive)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fields(cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, resolved annotation) for every field of the settings class ``cls``: its own first, then those it
    shares with other settings classes (its bases')."""
    hints = typing.get_type_hints(cls)

    def declared_by(f):
        return next(i for i, c in enumerate(cls.__mro__) if f.name in c.__dict__.get("__annotations__", {}))
    return [(f, hints[f.name]) for f in sorted(dataclasses.fields(cls), key=declared_by)]


def _unpack(annotation) -> tuple[object, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _element(kind) -> tuple[type, object]:
    """(element type, count: an int for tuple[T, T], "+" for list[T] or tuple[T, ...], None for a scalar)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return args[0], "+"
    if origin is tuple:
        return args[0], len(args)
    return kind, None


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """An option (or positional argument) per field of ``cls`` with ``cli=True``; absent options stay absent."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f, annotation in fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind, _ = _unpack(annotation)
        element, count = _element(kind)
        default = defaults(cls)[f.name]
        shown = "" if meta["required"] or default is None or element is bool else f" (default: {_shown(default)})"
        kwargs = dict(help=meta["help"] + shown, default=argparse.SUPPRESS)
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if element is bool:
            kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        else:
            kwargs.update(type=element, metavar=meta["metavar"])
            if count is not None:
                kwargs["nargs"] = count
        if meta["positional"]:
            del kwargs["default"]
            parser.add_argument(f.name, **kwargs)
            continue
        target = parser
        if meta["exclusive"]:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        target.add_argument(flag(f.name), dest=f.name, required=meta["required"], **kwargs)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def given_values(namespace: argparse.Namespace, cls) -> dict:
    """The settings of ``cls`` the command line gave (by field name)."""
    return {f.name: getattr(namespace, f.name) for f, _ in fields(cls) if hasattr(namespace, f.name)}


def _check(name: str, value, annotation, meta):
    """``value`` converted to the field's type; ValueError naming the setting (and its option) otherwise."""
    kind, optional = _unpack(annotation)
    option = f" ({flag(name)})" if meta.get("cli", True) and not meta.get("positional") else ""

    def fail(text):
        return ValueError(f"{name} {text}{option}")
    if value is None:
        if optional:
            return None
        raise fail("is required" if meta.get("required") else "must not be None")
    element, count = _element(kind)
    if count is not None:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or (
                len(value) != count if count != "+" else not value):
            size = f"{count} values" if count != "+" else "one or more values"
            raise fail(f"must be {size}, got {value!r}")
        items = [_check(name, v, element, {**meta, "choices": None}) for v in value]
        return tuple(items) if typing.get_origin(kind) is tuple else items
    if element is bool:
        if not isinstance(value, bool):
            raise fail(f"must be True or False, got {value!r}")
        return value
    if element is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise fail(f"must be an int, got {value!r}")
        value, what = int(value), "an int"
    elif element is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise fail(f"must be a finite float, got {value!r}")
        value, what = float(value), "a finite float"
    elif not isinstance(value, element):
        raise fail(f"must be a {element.__name__}, got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise fail(f"must be one of {meta['choices']}, got {value!r}")
    for bound, fails, words in (("low", lambda b: value < b, ">="), ("above", lambda b: value <= b, ">"),
                                ("high", lambda b: value > b, "<="), ("below", lambda b: value >= b, "<")):
        if meta.get(bound) is not None and fails(meta[bound]):
            raise fail(f"must be {what} {words} {meta[bound]}, got {value!r}")
    return value


def make_settings(cls, values: dict, where: str = "settings"):
    """``cls(**values)`` with every value checked and converted (unknown names raise, naming ``where``'s
    settings); cross-setting checks belong in the class's ``__post_init__``."""
    known = {f.name: (f, annotation) for f, annotation in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        what = "is not a setting" if len(unknown) == 1 else "are not settings"
        raise ValueError(f"{where}: {', '.join(unknown)} {what} of this command; its settings: {', '.join(known)}")
    checked = {}
    for name, (f, annotation) in known.items():
        if name in values:
            checked[name] = _check(name, values[name], annotation, f.metadata)
        elif f.metadata.get("required"):
            _check(name, None, annotation, f.metadata)
    return cls(**checked)


def defaults(cls) -> dict:
    """Every field's default (required ones: None)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def to_config(settings) -> dict:
    """The settings as JSON-able values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def from_config(cls, section: dict, where: str = "settings"):
    """The settings saved by ``to_config`` (other keys of ``section`` are ignored; settings added since the run was
    written take their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return make_settings(cls, {k: v for k, v in section.items() if k in names}, where)


def resume_values(cls, saved: dict, given: dict, where: str) -> dict:
    """The values of a resumed run: the saved ones, with the given ``"extend"`` and ``"invocation"`` settings; a
    given ``"run"`` setting must equal the saved value (ValueError otherwise: the run would change under its
    checkpoint), and an ``"extend"`` one must not shrink."""
    values = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}}
    for f, annotation in fields(cls):
        if f.name not in given:
            continue
        policy, value = f.metadata.get("resume", "run"), _check(f.name, given[f.name], annotation, f.metadata)
        old = values.get(f.name)
        old = tuple(old) if isinstance(value, tuple) and isinstance(old, list) else old
        if policy == "run" and f.name in values and value != old:
            raise ValueError(f"{where}: --resume keeps the run's settings: {f.name} is {_shown(old)} in the run, "
                             f"not {_shown(value)}; drop {flag(f.name)}, or start the run anew without --resume")
        if policy == "extend" and old is not None and value < old:
            raise ValueError(f"{where}: --resume cannot lower {f.name} from {old} to {value}")
        values[f.name] = value
    return values
