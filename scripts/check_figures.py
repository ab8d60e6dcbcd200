"""Every figure the docs mark as measured points at a raw file that exists and names its command, device and commit.

A block (paragraph, table or list item run, between blank lines) that gives measured figures carries, in it or on
the line just before it, a marker naming its raw files relative to the page:

    <!-- measured: bench/long3/results.jsonl -->

The raw file, or a README.md / meta.json in its folder or a folder above it (up to docs/bench), must say
"command", "device" and "commit". A block that says "measured" and holds figures but has no marker fails.

    python scripts/check_figures.py          # README.md and docs/*.md; exit 1 on a failure
"""
from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!--\s*measured:\s*(.+?)\s*-->")
FIGURE = re.compile(r"\d+\.\d+|\d[\d,]*\s?(?:ms|s\b|MiB|GiB|KiB|MB|GB|tok/s|%|×)")
PROVENANCE = ("command", "device", "commit")


def pages(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def blocks(text: str):
    """(first line number, block text) for each block outside fenced code."""
    block, start, fenced = [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, "\n".join(block)
            block = []
    if block:
        yield start, "\n".join(block)


def provenance(path: str, root: str = ROOT) -> str | None:
    """The text that names the raw file's command, device and commit, or None."""
    stop = os.path.join(root, "docs", "bench")
    candidates = [path]
    folder = os.path.dirname(path)
    while True:
        candidates += [os.path.join(folder, "README.md"), os.path.join(folder, "meta.json")]
        if os.path.abspath(folder) in (os.path.abspath(stop), os.path.abspath(root)) or folder == os.path.dirname(folder):
            break
        folder = os.path.dirname(folder)
    found = {}
    for candidate in candidates:
        if os.path.isfile(candidate) and not candidate.endswith((".npz", ".png", ".pt")):
            text = open(candidate, errors="replace").read(200_000).lower()
            for word in PROVENANCE:
                found.setdefault(word, candidate) if word in text else None
    return None if len(found) < len(PROVENANCE) else ", ".join(sorted(set(found.values())))


def check(root: str = ROOT) -> tuple[list[str], list[str]]:
    """(lines reporting each marked figure block, failures)."""
    report, failures = [], []
    for page in pages(root):
        where = os.path.relpath(page, root)
        previous = ""
        for line, block in blocks(open(page).read()):
            code_free = re.sub(r"`[^`]*`", "", block)  # a marker shown in a code span is an example, not a marker
            markers = MARKER.findall(code_free) or (MARKER.findall(previous) if MARKER.fullmatch(previous.strip()) else [])
            prose = MARKER.sub("", code_free)
            if markers:
                for marker in markers:
                    for name in marker.split():
                        path = os.path.normpath(os.path.join(os.path.dirname(page), name))
                        if not os.path.isfile(path):
                            failures.append(f"{where}:{line}: raw file {name} does not exist ({path})")
                            continue
                        source = provenance(path, root)
                        if source is None:
                            failures.append(f"{where}:{line}: {name} (and no README.md or meta.json beside it) does "
                                            f"not name its {' / '.join(PROVENANCE)}")
                        else:
                            report.append(f"{where}:{line}: {name} (provenance: {os.path.relpath(source.split(', ')[0], root)})")
            elif re.search(r"\bmeasured\b", prose, re.I) and FIGURE.search(prose):
                failures.append(f"{where}:{line}: says 'measured' and gives figures, but has no "
                                f"<!-- measured: PATH --> marker: {prose.strip()[:100]!r}")
            previous = block
    return report, failures


def main() -> int:
    report, failures = check()
    print("\n".join(report))
    print(f"{len(report)} measured figure blocks with raw files; {len(failures)} failures")
    for failure in failures:
        print("FAIL " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
