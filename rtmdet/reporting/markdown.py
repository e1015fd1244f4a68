"""Small markdown and figure helpers shared by the report pages (no tabulate dependency)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "–"  # an undefined number (COCO's -1, a null, a format that was not run)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` decimals, None and NaN as a dash, the rest as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one letter per column, l or r (default: r for numbers)."""
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) and not isinstance(rows[0][i], bool)
                        else "l" for i in range(len(headers)))  # fmt: skip
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(fmt(h) for h in headers) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def image(path: str, alt: str) -> str:
    """An embedded image with a relative link."""
    return f"![{alt}]({path})"


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes, bounding box tight so no label is clipped.

    Same as rtmdet.evaluation.plots.figure_png, which cannot be imported here without torch and
    pycocotools: the report stage must stay light (it runs after every experiment).
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()
