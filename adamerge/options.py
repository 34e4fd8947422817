"""Command-line options shared by the commands: ``KEY=VALUE`` assignments (``adamerge demo
--set``, ``--hparam``, the diagnostics script's ``--set``: one parser, so every option reads values
the same way) and the environment variable behind ``--verbose``."""

from __future__ import annotations

import json
from typing import Any, Sequence

# ``adamerge ... --verbose`` sets it for one command; read by adamerge.report.verbose_requested
VERBOSE_ENV = "ADAMERGE_VERBOSE"


def parse_overrides(items: Sequence[str], option: str = "--set", form: str = "FIELD=VALUE") -> dict[str, Any]:
    """``["head_shift=0.4", "colour=false"]`` -> ``{"head_shift": 0.4, "colour": False}``.

    Values are JSON, else kept as strings (the consumer checks each against the type it
    expects). ``option`` and ``form`` name the command-line option in error messages.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects {form}, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
