"""benchmarks/RESULTS.md: each benchmark owns one `## ` section and replaces only that one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

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


class PeakTreeMemory:
    """Peak resident memory of this process and, with `children`, all its descendants (Ray's
    raylet and workers are descendants of a driver that starts a local Ray), sampled every 50 ms."""

    def __init__(self, children: bool = True, poll_s: float = 0.05) -> None:
        self.children, self.poll_s = children, poll_s
        self.before = self._sample()  # resident set when the measured step starts
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *(me.children(recursive=True) if self.children else [])]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.poll_s)

    def __enter__(self) -> "PeakTreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
