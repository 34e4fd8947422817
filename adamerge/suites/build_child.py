"""``python -m adamerge.suites.build_child KIND SPEC OUT``: one suite build in the pinned child
process that :func:`adamerge.suites.pinned.build_pinned` starts (``KIND``: ``vision`` or ``text``;
``SPEC``: the spec as JSON; ``OUT``: the folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    kind, spec, out = argv[0], json.loads(argv[1]), Path(argv[2])
    if kind == "vision":
        from .synthetic import SuiteSpec, build_suite
        build_suite(SuiteSpec(**{**spec, "tasks": tuple(spec["tasks"])}), out)
    elif kind == "text":
        from .text import TextSuiteSpec, build_text_suite
        build_text_suite(TextSuiteSpec(**{**spec, "tasks": tuple(spec["tasks"])}), out)
    else:
        raise SystemExit(f"unknown suite kind {kind!r} (vision, text)")


if __name__ == "__main__":
    main(sys.argv[1:])
