"""Command-line options made from the fields of the settings dataclasses.

A command's option for a field of :class:`~tensornet_llm.compress.config.CompactifyConfig`,
:class:`~tensornet_llm.train.heal.HealConfig` or
:class:`~tensornet_llm.train.quantize_selection.QuantizeConfig` takes its default from the field and its
help from the class docstring's ``Attributes`` section, so the two cannot drift apart. The
parsed value lands under the field's own name, and :func:`settings_from` gathers the fields a
command line gave into keyword arguments for the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any, Callable

__all__ = ["field_help", "add_field", "settings_from"]

_ENTRY = re.compile(r"^(\w+(?:, \w+)*): (.*)$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's description in ``cls``'s docstring (``Attributes:`` section): its first
    sentence, as one line; an entry ``a, b: ...`` describes both."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.split("Attributes:", 1)[1].splitlines() if "Attributes:" in doc else []
    entries: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if line.strip() and not line.startswith(" "):
            break  # the section ended
        match = _ENTRY.match(line.strip()) if line.startswith("    ") and not line.startswith(
            "     ") else None
        if match:
            current = [match.group(2)]
            for name in match.group(1).split(", "):
                entries[name] = current
        elif current and line.strip():
            current.append(line.strip())
    return {name: _plain(_first_sentence(" ".join(words))) for name, words in entries.items()}


def _first_sentence(text: str) -> str:
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start()] if end else text


def _plain(text: str) -> str:
    """Docstring markup as plain text: roles and double backquotes dropped, ``%`` escaped for
    argparse."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    return text.replace("``", "").replace("%", "%%")


def add_field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, name: str,
              *flags: str, type: Callable[[str], Any] | None = None, **options: Any
              ) -> argparse.Action:
    """An option for field ``name`` of dataclass ``cls``, stored under ``name``.

    The flag is ``--<name with dashes>`` unless ``flags`` are given. A boolean field that is
    ``True`` by default becomes ``--no-<name>`` (storing False), one that is ``False`` a plain
    switch. Other fields take ``type`` (default: the type of the field's default, or
    ``Literal`` choices from its annotation) and keep the field's default; ``options`` go to
    ``add_argument`` as they are (``help`` replaces the docstring's, ``required``, ``nargs``,
    ``choices``, ``metavar``, ``default``, ``action``).
    """
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    options.setdefault("help", field_help(cls).get(name, ""))
    options.setdefault("default", default)
    if isinstance(default, bool) and "action" not in options:
        options["action"] = "store_false" if default else "store_true"
        if default and not flags:  # --no-<name> says what it turns off
            options["help"] = f"turn off (on by default): {options['help']}"
        flags = flags or (f"--{'no-' if default else ''}{name.replace('_', '-')}",)
        return parser.add_argument(*flags, dest=name, **options)
    flags = flags or (f"--{name.replace('_', '-')}",)
    if "action" not in options:
        choices = _literal_choices(cls, name)
        if choices and "choices" not in options:
            options["choices"] = choices
        if type is None and default is not None and not isinstance(default, (list, tuple)):
            type = _builtin_type(default)
        if type is not None:
            options["type"] = type
        if options["default"] not in (None, [], ()) and "(default" not in options["help"]:
            options["help"] += f" (default {options['default']})"
    return parser.add_argument(*flags, dest=name, **options)


def _builtin_type(value: Any) -> Callable[[str], Any]:
    return {int: int, float: float, str: str}.get(value.__class__, str)


def _literal_choices(cls: type, name: str) -> list | None:
    try:
        hint = typing.get_type_hints(cls)[name]
    except (NameError, TypeError):  # an annotation this Python cannot evaluate: no choices
        return None
    for arg in ([hint] if typing.get_origin(hint) is typing.Literal else typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def settings_from(args: argparse.Namespace, cls: type, *, skip: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds (options made by :func:`add_field`), as
    keyword arguments, less ``skip``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if hasattr(args, f.name) and f.name not in skip}
