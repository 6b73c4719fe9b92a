"""The CSV writer of every benchmark script (standard library only: scripts that set their environment before
importing torch or Triton import it too)."""
from __future__ import annotations

import csv


def write_csv(rows: list[dict], path: str) -> None:
    """rows (dicts with the same keys, in column order) -> path, header first; the file is rewritten."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
