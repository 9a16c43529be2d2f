"""Text tables a person can read, and JSON files."""

from __future__ import annotations

import json
import os


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); a missing value prints as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(format_table(rows, columns))


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The same table in Markdown (``|`` in a cell is escaped)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(key) is None else format(row[key], spec).replace("|", "\\|")
                 for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` (indented) through a temporary file, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


CHAIN_COLUMNS = [("case", "case", "s"), ("impl", "impl", "s"), ("backend", "ran", "s"), ("model", "model", "s"),
                 ("batch", "B", "d"), ("median_ms", "median ms", ".2f"), ("min_ms", "min", ".2f"),
                 ("max_ms", "max", ".2f"), ("runs", "runs", "d"), ("vs_eager", "x eager", ".2f"),
                 ("gflops", "GFLOP/s", ".1f"), ("sgemm_gflops", "sgemm", ".0f"), ("of_sgemm", "of sgemm", ".0%"),
                 ("compile_s", "compile s", ".1f"), ("final_energy", "E(z_K)", ".3f"),
                 ("load_average", "load", ".1f")]


def with_milliseconds(rows: list[dict]) -> list[dict]:
    """Rows with ``median_ms``, ``min_ms``, ``max_ms`` beside their ``*_s``."""
    return [dict(r, **{f"{k}_ms": r[f"{k}_s"] * 1e3 for k in ("median", "min", "max") if r.get(f"{k}_s")})
            for r in rows]


def chain_table(rows: list[dict]) -> str:
    """The chain rows as a text table, then one line per distinct note (why a row was skipped or fell back).
    ``compile s`` is each row's one-time cost, left out of its time: torch.compile, the Triton JIT, the capture."""
    text = format_table(with_milliseconds(rows), CHAIN_COLUMNS)
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
    return text + "".join(f"\n  note  {n}" for n in notes)
