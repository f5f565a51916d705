"""Write one benchmark's section into ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section ``heading`` (a ``## `` line) of ``path`` up to the next ``## `` heading, or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip("\n") + "\n"
    new = pattern.sub(lambda _: body + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new)
