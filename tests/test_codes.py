"""The one table of codes (``fastlangevin/ops/codes.py``) against every place that uses it: the C++ header, the
Triton constants, the module-side activation table; and the import graph of ``fastlangevin/ops`` (no cycles)."""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastlangevin import energies
from fastlangevin.ops import codes

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include" / "fastlangevin"
CODES_HEADER = INCLUDE / "codes.h"
# before codes.h existed the enums lived beside the kernels that used them
OLD_HEADERS = (INCLUDE / "mlp_chain.h", INCLUDE / "langevin_step.h")
# C++ enumerator prefix -> table of codes.py
PREFIXES = {"kAct": "activation", "kMethod": "method", "kPrior": "prior", "kMatrix": "matrix_unit", "k": "dtype"}


def _snake(camel: str) -> str:
    """LeakyRelu -> leaky_relu, GeluTanh -> gelu_tanh, Float32 -> float32, BFloat16 -> bfloat16."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", camel).lower().replace("b_float", "bfloat")


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """{table: {name: value}} of every ``enum Name { kX = 0, ... }`` in C++ source text."""
    text = re.sub(r"//[^\n]*", "", text)
    tables: dict[str, dict[str, int]] = {}
    for body in re.findall(r"\benum\s+\w+\s*\{([^}]*)\}", text):
        for name, value in re.findall(r"\b(k\w+)\s*=\s*(\d+)", body):
            prefix = next(p for p in PREFIXES if name.startswith(p) and name[len(p)].isupper())
            tables.setdefault(PREFIXES[prefix], {})[_snake(name[len(prefix):])] = int(value)
    return tables


def test_parse_enums_reads_what_the_header_writes():
    tables = parse_enums("enum A {\n  kActLeakyRelu = 1,  // param\n  kActGeluTanh = 4,\n};\n"
                         "enum DtypeCode { kFloat32 = 0, kBFloat16 = 3 };\nenum Method { kMethodMala = 1 };")
    assert tables == {"activation": {"leaky_relu": 1, "gelu_tanh": 4}, "dtype": {"float32": 0, "bfloat16": 3},
                      "method": {"mala": 1}}


def test_cpp_header_matches_codes_py():
    """Every enumerator of the header carries the value codes.py gives its name; once codes.h exists, it holds the
    whole table (an activation added in Python and missing in C++ fails here)."""
    headers = (CODES_HEADER,) if CODES_HEADER.exists() else OLD_HEADERS
    found: dict[str, dict[str, int]] = {}
    for header in headers:
        for table, entries in parse_enums(header.read_text()).items():
            found.setdefault(table, {}).update(entries)
    for table, entries in found.items():
        assert entries == {name: codes.TABLES[table][name] for name in entries}, table
    assert set(found) == set(codes.TABLES)
    if CODES_HEADER.exists():
        assert found == codes.TABLES


def test_codes_are_unique_per_table_and_named_constants_agree():
    for table in codes.TABLES.values():
        assert len(set(table.values())) == len(table)
    assert codes.ACTIVATIONS["identity"] == codes.IDENTITY == 8 and codes.ACTIVATIONS["sigmoid"] == codes.SIGMOID == 9
    assert codes.METHODS == {"ula": codes.ULA, "mala": codes.MALA}


def test_module_side_activation_table_covers_every_code():
    assert {name: entry.code for name, entry in energies.ACTIVATIONS.items()} == codes.ACTIVATIONS
    for name, entry in energies.ACTIVATIONS.items():  # each module reads back as its own entry
        module = entry.build(0.3 if name in ("leaky_relu", "elu") else entry.default_param)
        assert energies.activation_of(module) == (name, 0.3 if name in ("leaky_relu", "elu") else 0.0)


def test_triton_constants_mirror_codes_py():
    pytest.importorskip("triton")
    import triton.language as tl

    from fastlangevin.ops.triton import codes as triton_codes
    for name, value in vars(codes).items():
        if name.isupper() and isinstance(value, int):
            constant = getattr(triton_codes, name)
            assert isinstance(constant, tl.constexpr) and constant.value == value


def _ops_modules() -> dict[str, Path]:
    package = ROOT / "fastlangevin" / "ops"
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in package.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every fastlangevin module the file imports, at the top or inside a function (the package imports absolutely;
    ``from a.b import c`` counts as importing a.b and, if it is one, the module a.b.c)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:  # ``from package import submodule`` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                out.add(submodule if _is_module(submodule) else node.module)
    return {name for name in out if name.startswith("fastlangevin")}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_import_cycle_in_ops():
    """The import graph of fastlangevin/ops (lazy imports inside functions included) has no cycle."""
    modules = _ops_modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_codes_is_a_leaf():
    assert _imports(_ops_modules()["fastlangevin.ops.codes"]) == set()


def test_each_ops_module_imports_first_in_a_fresh_interpreter():
    """``import fastlangevin.ops.X`` as the first import of a fresh interpreter, for every X. ``import fastlangevin``
    comes first in every one of them and imports part of ``ops`` itself (the first run); each module it leaves out
    (Triton's, NVRTC's) gets its own run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(code: str) -> str:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{code}: {result.stderr[-1500:]}"
        return result.stdout

    loaded = set(run("import sys, fastlangevin.ops; print(*sorted(sys.modules))").split())
    for module in sorted(set(_ops_modules()) - loaded):
        if ".triton" not in module or importlib.util.find_spec("triton"):
            run(f"import {module}")
