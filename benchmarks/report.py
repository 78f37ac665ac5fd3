"""Render the README's benchmark tables from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrite the tables in README.md in place
    python benchmarks/report.py --check    # exit 1 if README.md's tables differ from the results

Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers, so the README
never carries a number that is not in a checked-in result file. The tables themselves are rendered
by kiln.bench.report (the same code renders `kiln serve`'s /report page and `kiln bench report`).
"""

from __future__ import annotations

import sys

from kiln.bench.report import ROOT, TABLES, render  # noqa: F401 (TABLES: the sections, for callers)

if __name__ == "__main__":
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in sys.argv:
        sys.exit(0 if new == old else 1)
    path.write_text(new)
