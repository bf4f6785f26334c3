"""Typed options and the flags they come from: one dataclass field per flag.

A concern's options are a dataclass whose fields are declared with `flag(default, help, ...)`
(the flag is `--<field name>`, diffusers' name where diffusers has one). A command's argparse
surface is a layout: help groups listing field names (`build`); the parsed flags go back into
the dataclasses with `pick`. A `--config run.toml` file supplies defaults under the same names.
No torch here: `--help` and flag errors come back at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from trainer.errors import UserError


def flag(default: Any, help: str, *, aliases: tuple[str, ...] = (), type: Callable | None = None,
         choices: tuple | None = None, metavar: str | None = None, nargs: str | None = None, const: Any = None):
    """A dataclass field that is also the flag --<name>. A bool field defaulting to False is a switch."""
    spec = {"default": default, "help": help, "aliases": aliases, "type": type, "choices": choices,
            "metavar": metavar, "nargs": nargs, "const": const}
    if isinstance(default, list):  # (a fresh list per instance)
        return dataclasses.field(default_factory=lambda: list(default), metadata={"flag": spec})
    return dataclasses.field(default=default, metadata={"flag": spec})


def flag_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "flag" in f.metadata}


def on_off(text: str) -> bool:
    """--kernels on|off (also 1/0, true/false, yes/no)."""
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


# "-1e-4", "-inf" are values, not flags (argparse alone only knows "-1" and "-.5"), so that
# `--learning_rate -1e-4` gets the range message instead of "expected one argument"
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help line (on/off for switches)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=38)

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or action.required or "%(default)" in text
                or not action.option_strings or action.dest == "help"):
            return text
        d = action.default
        if d is None:
            return text  # the help line says what "not given" means
        shown = ("on" if d else "off") if isinstance(d, bool) else d
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def option_adder(group):
    """group.add_argument with short metavars: N for counts, X for numbers."""
    def add(*names, **kw):
        if "metavar" not in kw and not kw.get("choices") and kw.get("type") in (int, float):
            kw["metavar"] = "N" if kw["type"] is int else "X"
        return group.add_argument(*names, **kw)
    return add


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=description)
    p._negative_number_matcher = NEGATIVE_NUMBER
    return p


def add_field(add, field: dataclasses.Field, *, name: str | None = None, default: Any = dataclasses.MISSING,
              help: str | None = None, required: bool = False) -> argparse.Action:
    """The flag of one option field on an option_adder; name/default/help override the field's own."""
    spec = field.metadata["flag"]
    default = spec["default"] if default is dataclasses.MISSING else default
    kw: dict[str, Any] = {"dest": field.name, "help": spec["help"] if help is None else help}
    if required:
        kw["required"] = True
    names = ("--" + (name or field.name), *spec["aliases"])
    if default is False and spec["type"] is None and spec["nargs"] is None:
        return add(*names, action="store_true", **kw)
    kw["default"] = list(default) if isinstance(default, list) else default
    for key in ("type", "choices", "metavar", "nargs", "const"):
        if spec[key] is not None:
            kw[key] = list(spec[key]) if key == "choices" else spec[key]
    return add(*names, **kw)


def build(p: argparse.ArgumentParser, layout, fields: dict[str, dataclasses.Field], *, names: dict | None = None,
          defaults: dict | None = None, helps: dict | None = None, required: tuple = ()) -> argparse.ArgumentParser:
    """Add the flags of `layout` ((group title, (field name, ...)), ...) to `p`, each as its field declares it
    (`fields`: name -> dataclass field), with per-command names, defaults and help lines."""
    names, defaults, helps = names or {}, defaults or {}, helps or {}
    for title, members in layout:
        add = option_adder(p.add_argument_group(title))
        for dest in members:
            add_field(add, fields[dest], name=names.get(dest), default=defaults.get(dest, dataclasses.MISSING),
                      help=helps.get(dest), required=dest in required)
    return p


def pick(cls, values: dict, **fixed):
    """An options dataclass from parsed flags (`values`: vars() of argparse's namespace); fields no flag of
    this command set keep their defaults."""
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own}, **fixed)


def config_file_defaults(p: argparse.ArgumentParser, argv: list[str]) -> None:
    """--config run.toml: its keys become the parser's defaults, so flags given on the line override them."""
    first, _ = p.parse_known_args(argv)
    if not first.config:
        return
    path = Path(first.config)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from e
    unknown = sorted(set(table) - {act.dest for act in p._actions})
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    p.set_defaults(**table)
