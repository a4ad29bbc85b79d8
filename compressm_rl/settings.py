"""Type checks for the settings dataclasses (``PPOConfig``, ``CompressionConfig``,
``TrainConfig``): a value of the wrong type is a ``ValueError`` naming the field, not a
``TypeError`` from deep inside a comparison later."""

from __future__ import annotations

import math
from dataclasses import fields

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
