"""`list models`: every registered family, where it loads from, which backend runs on this machine, and its
recurrent state per layer at the paper's matched configuration (262,144 floats for GDN-2 / GDN / KDA at H=16,
K=V=128).

What a family provides (all optional beyond ModelFamily's basics; missing ones show as "n/a"):
    loads_from: str                      class attribute, in words
    backend(device) -> str               which implementation runs on `device`
    paper_config: dict                   class attribute: the paper's config in the family's config.json field names
    paper_configs() -> {label: config}   instead of paper_config when a family has several (e.g. SISO / MIMO)
    state_floats_per_layer(config) -> int
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass
class FamilyRow:
    family: str
    loads_from: str
    backend: str
    state_floats: str        # per layer at the paper's config ("262,144"; "KV cache (grows)" for attention)
    bundled: str = ""        # bundled model names of this family


def _paper_configs(family) -> dict[str, dict]:
    if hasattr(family, "paper_configs"):
        return dict(family.paper_configs())
    config = getattr(family, "paper_config", None)
    return {"": config} if config else {}


def describe_family(family, device: torch.device) -> FamilyRow:
    try:
        backend = family.backend(device)
    except Exception as err:
        backend = f"n/a ({type(err).__name__}: {err})"
    sizes = []
    for label, config in _paper_configs(family).items():
        try:
            floats = family.state_floats_per_layer(config)
            text = f"{floats:,}" if floats else "0 (KV cache grows with context)"
        except Exception as err:
            text = f"n/a ({type(err).__name__})"
        sizes.append(f"{label}: {text}" if label else text)
    return FamilyRow(family.name, getattr(family, "loads_from", "") or "n/a", backend,
                     "; ".join(sizes) if sizes else "n/a")


def describe_families(device: str | torch.device = "auto") -> list[FamilyRow]:
    """One row per family known to the registry (built-ins and registered ones). A family module that fails to
    import is listed with the error instead of breaking the listing."""
    from harness import bundled
    from harness.registry import family_names, get_family, resolve_device

    dev = resolve_device(device)
    rows = []
    for name in family_names():
        try:
            family = get_family(name)
        except Exception as err:
            rows.append(FamilyRow(name, "n/a", f"unavailable: {type(err).__name__}: {err}", "n/a"))
            continue
        row = describe_family(family, dev)
        row.bundled = ", ".join(sorted(k for k, v in bundled.BUNDLED.items() if v.family == name))
        rows.append(row)
    return rows


def format_table(rows: list[FamilyRow], device: torch.device | str) -> str:
    header = ("family", "state floats/layer (paper config)", "backend on " + str(device), "loads from", "bundled")
    body = [(r.family, r.state_floats, r.backend, r.loads_from, r.bundled) for r in rows]
    lines = []
    for row in body:
        lines.append(f"{row[0]}")
        for label, value in zip(header[1:], row[1:], strict=True):
            if value:
                lines.append(f"    {label}: {value}")
    return "\n".join(lines)


def print_families(device: str | torch.device = "auto", file=None) -> int:
    """Print the family table; returns the exit status (0; 2 when the device is not available)."""
    from harness.registry import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as err:
        print(f"list models: {err}", file=sys.stderr)
        return 2
    print(format_table(describe_families(dev), dev), file=file or sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(print_families(sys.argv[1] if len(sys.argv) > 1 else "auto"))
