"""The C++ code table (csrc/include/fastlangevin/codes.h) against the Python one (fastlangevin.ops.codes): every
enum constant of the header, parsed with a regex, has the value Python gives the same name, and nothing is missing
on either side."""

import re
from pathlib import Path

import pytest

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastlangevin" / "codes.h"

# C++ constant prefix -> (Python table, how the rest of the name is spelled in Python)
PREFIXES = {
    "kAct": ("activation", lambda s: re.sub(r"(?<!^)(?=[A-Z])", "_", s).lower()),  # LeakyRelu -> leaky_relu
    "kMethod": ("method", str.lower),
    "kPrior": ("prior", str.lower),
    "kFloat": ("dtype", lambda s: "float" + s),
    "kBFloat": ("dtype", lambda s: "bfloat" + s),
}


def header_tables() -> dict[str, dict[str, int]]:
    text = HEADER.read_text()
    tables: dict[str, dict[str, int]] = {}
    for body in re.findall(r"enum\s+\w+\s*\{(.*?)\}", text, flags=re.S):
        body = re.sub(r"//[^\n]*", "", body)
        for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", body):
            prefix = max((p for p in PREFIXES if name.startswith(p)), key=len, default=None)
            assert prefix is not None, f"codes.h: {name} has no known prefix ({sorted(PREFIXES)})"
            table, spell = PREFIXES[prefix]
            tables.setdefault(table, {})[spell(name[len(prefix):])] = int(value)
    return tables


def python_tables() -> tuple[dict[str, dict[str, int]], bool]:
    """The Python tables, and whether they are the complete leaf module (else the older, partial tables)."""
    try:
        from fastlangevin.ops import codes
    except ImportError:  # before the leaf module exists: the tables where they were declared until then
        from fastlangevin.ops.langevin_step import DTYPE_CODES
        from fastlangevin.ops.langevin_step_reference import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
        from fastlangevin.ops.mlp_chain import ACTIVATIONS, METHODS
        return {"activation": dict(ACTIVATIONS), "method": dict(METHODS),
                "prior": {"flat": PRIOR_FLAT, "normal": PRIOR_NORMAL, "diagonal": PRIOR_DIAGONAL},
                "dtype": {str(k).removeprefix("torch."): v for k, v in DTYPE_CODES.items()}}, False
    return {name: dict(table) for name, table in codes.TABLES.items()}, True


def test_header_parses_into_every_table():
    tables = header_tables()
    assert set(tables) == {"activation", "method", "prior", "dtype"}
    assert tables["activation"]["gelu_tanh"] == 4 and tables["dtype"]["bfloat16"] == 3


@pytest.mark.parametrize("table", ["activation", "method", "prior", "dtype"])
def test_header_matches_python(table):
    cxx = header_tables()[table]
    tables, complete = python_tables()
    if complete:
        assert cxx == tables[table]
    else:  # the older tables lack the codes added with the header (identity, sigmoid)
        assert {name: cxx.get(name) for name in tables[table]} == tables[table]
