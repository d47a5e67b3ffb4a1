"""The one way benchmarks publish: print the section, and append it to benchmarks/RESULTS.md on --write."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(text: str, write: bool) -> None:
    print(text)
    if write:
        with open(RESULTS, "a") as handle:
            handle.write("\n" + text.rstrip("\n") + "\n")
