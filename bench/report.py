"""What a sweep writes to bench/results/: Markdown tables (a caption paragraph, then one row per
measured setting) and its figure as a PNG."""
from __future__ import annotations

from pathlib import Path


def markdown(caption: str, columns: list[str], rows: list[list[str]]) -> str:
    """The caption, a blank line and a table; the first column left-aligned (setting names), the
    others right-aligned (figures)."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
