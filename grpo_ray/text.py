"""User-facing text: "did you mean" suggestions for one-line errors, and aligned text tables.

The bottom of the import graph (below config): it imports nothing from grpo_ray.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


def suggest(value: Any, choices: Iterable[Any], *, n: int = 1, cutoff: float = 0.6, prefix: str = "", end: str = "") -> str:
    """ "did you mean 'x'?" (n > 1: "'x', 'y'") for the choices closest to `value`, else "".

    `prefix` goes before each suggestion as shown (e.g. a section name), `end` after the question
    mark (e.g. " " when more text follows)."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=n, cutoff=cutoff)
    if not close:
        return ""
    return f"did you mean {', '.join(repr(prefix + c) for c in close)}?{end}"


def cell(value: Any) -> str:
    """A value as a table cell: yes/no, 4 significant digits, empty for None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """Columns aligned: a Markdown table (also readable as plain text), or plain columns two spaces apart."""
    table = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(t[i]) for t in table)]) for i, h in enumerate(headers)]
    if not markdown:
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [list(headers), *table])
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(t) for t in table)])
