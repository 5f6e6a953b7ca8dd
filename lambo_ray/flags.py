"""Command-line flags generated from config dataclasses: one flag per field, help from the field.

A config dataclass is the single description of a setting: its type, its default and (in
``field(metadata={"help": ..., "choices": ...})``) what it means. :class:`DataclassFlags` turns each
field into one flag with that help, the default shown, ``choices=`` where the field has them and the
right parsing for its type:

=====================  ======================================================================
field type             on the command line
=====================  ======================================================================
int, float, str        ``--name VALUE``
bool                   ``--name`` / ``--no-name`` / ``--name false``
tuple[X, ...]          ``--name V1 V2 ...`` (one or more)
tuple[X, Y]            ``--name V1 V2`` (exactly as many as the tuple has)
dict[str, ...]         ``--name KEY=VALUE ...`` (values read as YAML scalars: 2, 1e-3, true)
X | None               as X, plus ``none`` for None
=====================  ======================================================================

Flags default to "not given" (``argparse.SUPPRESS``): :meth:`DataclassFlags.values` returns only what
the command line set, so a value from a ``--config`` file is overridden by a flag and by nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lambo_ray.errors import LamboInputError

NONE_WORDS = ("none", "null")


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line; every attribute overrides what the field implies."""

    names: tuple[str, ...] = ()  # option strings; default ``--field-name``
    help: str | None = None
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None
    convert: Callable[[Any], Any] | None = None  # command-line value -> field value (e.g. ms -> s)
    default_text: str | None = None  # the default as shown in --help, in command-line units
    metavar: str | None = None
    required: bool = False


class DataclassFlags:
    """The flags of one config dataclass: :meth:`add_to` puts them on a parser, :meth:`values` reads back
    the field values that a parsed command line set (flags not given are absent).

    ``flags`` adjusts single fields (names kept for compatibility, choices known only at run time, unit
    conversions); ``exclude`` leaves fields to the command (nested configs, values it derives itself).
    """

    def __init__(
        self,
        cls: type,
        *,
        prefix: str = "",
        flags: Mapping[str, Flag] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.cls, self.prefix, self.exclude = cls, prefix, tuple(exclude)
        self.flags = dict(flags or {})

    def _fields(self) -> Iterator[tuple[dataclasses.Field, Flag, _Kind]]:
        hints = typing.get_type_hints(self.cls)
        for f in dataclasses.fields(self.cls):
            if f.name not in self.exclude:
                yield f, self.flags.get(f.name, Flag()), _Kind.of(hints[f.name])

    def add_to(self, parser: Any) -> DataclassFlags:
        """Add the flags to ``parser`` (an ArgumentParser or one of its argument groups).

        Every flag has a help text, from ``flags[name].help`` or the field's ``metadata["help"]``; a
        field with neither is a programming error (a ``TypeError`` when the parser is built).
        """
        for f, spec, kind in self._fields():
            help_text = spec.help or f.metadata.get("help")
            if not help_text:
                raise TypeError(f"{self.cls.__name__}.{f.name} has no help text (field metadata 'help')")
            names = spec.names or ("--" + f.name.replace("_", "-"),)
            help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
            shown = spec.default_text if spec.default_text is not None else _default_text(f)
            if shown and "(default" not in help_text.lower():
                help_text = f"{help_text} (default: {shown})"
            common = {"dest": self.prefix + f.name, "default": argparse.SUPPRESS}
            if kind.base is bool:
                names = names + tuple("--no-" + n.removeprefix("--") for n in names)
                parser.add_argument(*names, action=_BoolAction, help=help_text, **common)
            else:
                choices = spec.choices if spec.choices is not None else f.metadata.get("choices")
                kwargs, suffix = kind.argparse_kwargs(f.name, spec, choices)
                parser.add_argument(*names, required=spec.required, help=help_text + suffix, **common, **kwargs)
        return self

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field values of the flags given on the command line, converted to the fields' types."""
        given = vars(args)
        out = {}
        for f, spec, kind in self._fields():
            if self.prefix + f.name in given:
                out[f.name] = (spec.convert or kind.convert)(given[self.prefix + f.name])
        return out


# ------------------------------------------------------------------------------------- field types


@dataclass(frozen=True)
class _Kind:
    base: Any  # the element type the command line parses
    optional: bool = False  # X | None: "none" means None
    nargs: int | str | None = None  # "+" (tuple[X, ...]), n (tuple of n), None (scalar)
    mapping: bool = False  # dict[str, ...]

    @classmethod
    def of(cls, hint: Any) -> _Kind:
        args = typing.get_args(hint)
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            inner = [a for a in args if a is not type(None)]
            return dataclasses.replace(cls.of(inner[0]), optional=True)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return cls(base=args[0], nargs="+")
            return cls(base=args[0], nargs=len(args))
        if origin is dict or hint is dict:
            return cls(base=str, mapping=True)
        if dataclasses.is_dataclass(hint):
            raise TypeError(f"a nested dataclass ({hint.__name__}) gets its own flags: exclude the field")
        return cls(base=hint if hint in (int, float, str, bool) else str)

    def parse_one(self, text: str) -> Any:
        if self.optional and text.lower() in NONE_WORDS:
            return None
        if self.mapping:
            return _key_value(text)
        if self.base is float:
            return _finite(text)
        return self.base(text)

    def convert(self, value: Any) -> Any:
        if self.mapping:
            return dict(value)
        if isinstance(value, list):
            return tuple(value)
        return value

    def argparse_kwargs(self, name: str, spec: Flag, choices: Sequence[Any] | None) -> tuple[dict[str, Any], str]:
        """argparse keywords for a field named ``name``, and what to add to its help (the choices when
        the metavar cannot show them)."""
        parse = spec.type or self.parse_one
        kwargs: dict[str, Any] = {"type": _named(parse, _type_name(self)), "metavar": name.upper()}
        suffix = ""
        if self.mapping:
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        elif self.nargs is not None:
            kwargs["nargs"] = self.nargs
        if isinstance(choices, LazyChoices):
            kwargs["choices"] = choices  # expanded by %(choices)s only when the help is shown
            suffix = "; one of: %(choices)s"
        elif choices is not None:
            kwargs["choices"] = list(choices) + ([None] if self.optional else [])
            shown = [str(c) for c in choices] + (["none"] if self.optional else [])
            if self.nargs is None:
                kwargs["metavar"] = "{" + ",".join(shown) + "}"
            else:
                suffix = "; each one of: " + ", ".join(shown)
        if spec.metavar is not None:
            kwargs["metavar"] = spec.metavar
        return kwargs, suffix


def _named(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """argparse names the type function in its error message ("invalid float value"): keep it readable."""

    def parse(text: str) -> Any:
        try:
            return fn(text)
        except LamboInputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _type_name(kind: _Kind) -> str:
    name = getattr(kind.base, "__name__", "value")
    return f"{name} or none" if kind.optional else name


def _key_value(text: str) -> tuple[str, Any]:
    from lambo_ray.config_files import load_yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise LamboInputError(f"expected KEY=VALUE, got {text!r}")
    return key, load_yaml(value, key) if value else ""


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return format_value(value)


def format_value(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return " ".join(format_value(v) for v in value) if value else "(empty)"
    if isinstance(value, dict):
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items()) if value else "(empty)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _BoolAction(argparse.Action):
    """``--name`` (true), ``--name VALUE`` (true/false/yes/no/1/0) and ``--no-name`` (false)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", type=parse_bool, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        negative = bool(option and option.startswith("--no-"))
        if negative and values is not None:
            parser.error(f"argument {option}: takes no value")
        setattr(namespace, self.dest, (not negative) if values is None else values)


class LazyChoices(Sequence):
    """Choices computed on first use, for registries that are costly to import (torch): ``--help`` and
    a given value ask for them, a command that never sees the flag does not."""

    def __init__(self, load: Callable[[], Sequence[Any]]) -> None:
        self._load = load
        self._items: list[Any] | None = None

    def _all(self) -> list[Any]:
        if self._items is None:
            self._items = list(self._load())
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()
