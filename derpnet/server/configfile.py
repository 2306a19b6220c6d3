"""Errors in the relay's operator files (allow list, rate config), with the line they are on.

Layer: relay server (pure). A bad file is refused at start (one line on stderr, naming
the file and line) and, on a SIGHUP reload, logged while the previous configuration
stays in force (reload.py).
"""

from __future__ import annotations

import json

__all__ = ["ConfigError", "line_of"]


class ConfigError(ValueError):
    """A problem in an operator's file: `source` (the path), `line` (1-based; 0: the whole
    file, e.g. unreadable) and what is wrong."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}, line {line}: {problem}" if line else f"{source}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


def line_of(text: str, name: str, after: str = "") -> int:
    """The line of the JSON string `name` in `text` (searched behind the string `after`, if
    given): where to point an operator at a value that parsed but is wrong."""
    start = 0
    if after:
        i = text.find(json.dumps(after))
        start = i if i >= 0 else 0
    i = text.find(json.dumps(name), start)
    if i < 0:
        i = text.find(name, start)
    return text.count("\n", 0, max(i, 0)) + 1
