"""RESULTS.md is written by several benchmarks: each owns the section between its two markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(start: str, end: str, section: str, path: Path = RESULTS) -> None:
    """Put `section` (which begins with `start` and ends with `end`) in place of the old one, or at the end."""
    from penwright import files

    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    files.write_text(path, text)
