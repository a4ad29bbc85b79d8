"""The settings dataclasses' shared machinery (``PPOConfig``, ``CompressionConfig``,
``TrainConfig``): type checks (a value of the wrong type is a ``ValueError`` naming the
field, not a ``TypeError`` from deep inside a comparison later), and one declaration per
setting (``setting``: default, help, flag) from which the CLI's flags, the benchmark
scripts' flags and the reference in docs/reference.md are all derived."""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, field, fields, is_dataclass

# The annotations the settings use, as written (``from __future__ import annotations``).
_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def _matches(value, annotation: str) -> bool:
    options = [a.strip() for a in annotation.split("|")]
    if value is None:
        return "None" in options
    for option in options:
        if option in _CHECKS and _CHECKS[option](value):
            return True
        if option.startswith("list[") and isinstance(value, list):
            inner = option[5:-1]
            if value and all(_CHECKS[inner](v) for v in value):
                return True
    return False


def check_types(settings, where: str) -> None:
    """Raise ``ValueError`` for the first field of dataclass ``settings`` whose value does
    not have its annotated type (``int``, ``float`` (finite), ``bool``, ``str``, non-empty
    ``list[...]``, each optionally ``| None``); other annotations are not checked."""
    for f in fields(settings):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        options = [a.strip() for a in annotation.split("|")]
        if not all(o in _CHECKS or o == "None" or o.startswith("list[") for o in options):
            continue  # a nested settings object: checked by its own class
        value = getattr(settings, f.name)
        if not _matches(value, annotation):
            hint = ""
            if isinstance(value, str) and "float" in annotation and _parses_as_float(value):
                hint = " (YAML reads 1e-3 as a string: write 1.0e-3)"
            raise ValueError(
                f"{where}{f.name} = {value!r} has the wrong type: expected {annotation}{hint}"
            )


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----- one declaration per setting: the dataclass field, its help, its flag ---------------
def setting(default, help: str, flag: str | None = None, choices: tuple | None = None):
    """A settings dataclass field declared once: its default, the help text the CLI, the
    benchmark scripts and the generated reference all show, and its command-line ``flag``
    (None: a YAML-only setting). A list or settings default is copied per instance."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, list) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_PARSERS = {"int": int, "float": float, "str": str}


def int_list(text: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]`` (a flag's comma-separated integers)."""
    return [int(x) for x in text.split(",")]


def float_list(text: str) -> list[float]:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]`` (a flag's comma-separated numbers)."""
    return [float(x) for x in text.split(",")]


def _parser_for(annotation: str):
    """The argparse ``type`` for an annotation: ``list[T]`` reads ``a,b,c``."""
    kind = next(a.strip() for a in annotation.split("|") if a.strip() != "None")
    if kind.startswith("list["):
        item = _PARSERS[kind[5:-1]]
        return lambda text: [item(x) for x in text.split(",")]
    return _PARSERS[kind]


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def flagged_fields(cls) -> list:
    """The fields of settings dataclass ``cls`` that have a command-line flag."""
    return [f for f in fields(cls) if f.metadata.get("flag")]


def add_flags(parser, cls, defaults: dict | None = None) -> None:
    """Add a flag for every flagged field of ``cls`` to an argparse ``parser``. Each flag
    defaults to None (unset: the config file's value, else the dataclass default, which
    the help shows unless it is None; ``defaults`` overrides what is shown, e.g. "the task
    preset")."""
    for f in flagged_fields(cls):
        default = (defaults or {}).get(f.name, _default_of(f))
        parser.add_argument(
            f.metadata["flag"],
            type=_parser_for(f.type),
            choices=f.metadata["choices"],
            metavar=None if f.metadata["choices"] else f.name.upper(),
            help=f.metadata["help"] + ("" if default is None else f" (default {_shown(default)})"),
        )


def given_flags(args, cls) -> dict:
    """``{field name: value}`` of the flags of ``cls`` set on the command line ``args``."""
    values = {}
    for f in flagged_fields(cls):
        value = getattr(args, f.metadata["flag"].lstrip("-").replace("-", "_"))
        if value is not None:
            values[f.name] = value
    return values


def _default_of(f):
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def reference_table(cls, section: str) -> str:
    """A Markdown table of every field of ``cls``: YAML key, flag, default, meaning (the
    nested settings sections, ``ppo`` and ``compression``, have tables of their own)."""
    rows = [f"| `{section}` key | flag | default | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        if not f.metadata.get("help") or "Config" in str(f.type):  # a section: its own table
            continue
        flag = f"`{f.metadata['flag']}`" if f.metadata.get("flag") else ""
        default = _shown(_default_of(f))
        rows.append(f"| `{f.name}` | {flag} | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
