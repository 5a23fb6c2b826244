"""benchmarks/RESULTS.md: each benchmark owns one `## ` section and replaces only that one."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(table: str, section: str) -> None:
    """Replace one benchmark's section (from its heading line to the next `## ` heading),
    keeping the others; append it when absent."""
    text = RESULTS.read_text() if RESULTS.exists() else "# partlift benchmark results\n\n"
    if section in text:
        start = text.index(section)
        end = text.find("\n## ", start + len(section))
        text = text[:start] + table + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + table
    RESULTS.write_text(text)
