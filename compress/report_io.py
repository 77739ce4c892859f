"""Writing a run's report in every format, and reading a recipe's earlier runs for the page.

report.json is the record; report.md is for people and logs; report.html is one self-contained
page. Each is replaced atomically after every stage, so a reader never sees half a card.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compress.atomic import atomic_write_text
from compress.html_report import render_html
from compress.render import render_markdown
from compress.report import RunReport, read_report, run_folders


def earlier_runs(folder: Path, limit: int = 30) -> list[RunReport]:
    """The recipe's earlier passed runs (siblings of this run's folder), oldest first."""
    out = []
    for d in [d for d in run_folders(Path(folder).parent) if d != Path(folder)][-limit:]:
        try:
            r = read_report(d)
        except (OSError, ValueError):
            continue  # a run being written right now, or not ours
        if r.status == "passed":
            out.append(r)
    return out


def write_report(report: RunReport, folder: Path, history: Sequence[RunReport] = ()) -> Path:
    """JSON (the record), Markdown and a self-contained HTML page; each replaced atomically."""
    folder = Path(folder)
    atomic_write_text(folder / "report.json", report.model_dump_json(indent=2))
    atomic_write_text(folder / "report.md", render_markdown(report))
    if report.reference is not None:
        atomic_write_text(folder / "report.html", render_html(report, history))
    return folder
