"""The report of ``gpu_validate.py``: issue 18's targets evaluated on the figures, and the Markdown with each target
printed beside its figure."""

from __future__ import annotations

from harness.tables import markdown_table, with_milliseconds

FAILED_STATUSES = ("failed", "timed out")  # a part in one of these makes the run fail

# Issue 18's targets: (key, what, threshold). Each is evaluated on the figures and printed beside them.
TARGETS = (
    ("step_of_copy", "step op >= 90 % of a device copy at n >= 2^22 (worst size, per dtype and backend)", 0.90),
    ("fused_vs_eager_b128", "MLP chain, B = 128: fused >= 50x eager", 50.0),
    ("fused_vs_graph_b128", "MLP chain, B = 128: fused >= 5x the CUDA-graphed step-op chain", 5.0),
    ("conv_graph_vs_eager", "conv E(G(z)) chain, B = 64: CUDA graph >= 3x eager", 3.0),
)
TARGET_TEXT = {key: text for key, text, _ in TARGETS}
TARGET_VALUE = {key: value for key, _, value in TARGETS}


def evaluate_targets(parts: dict) -> list[dict]:
    """Issue 18's targets against the figures that exist (a part that did not run leaves its targets open)."""
    results = []
    step_rows = parts.get("step-op", {}).get("results", {}).get("rows", [])
    for dtype in ("float32", "bfloat16"):
        for impl in ("cuda", "triton"):
            big = [r for r in step_rows if r["dtype"] == dtype and r["impl"] == impl and r["log2"] >= 22]
            if big:
                worst = min(big, key=lambda r: r["of_copy"])
                results.append(_target("step_of_copy", worst["of_copy"], f"{dtype} {impl}: {worst['of_copy']:.0%} "
                                                                         f"of copy at n = {worst['n']}"))
    chains = parts.get("chains", {}).get("results", {}).get("rows", [])
    row = lambda case, impl, batch: next((r for r in chains if r["case"] == case and r["impl"] == impl
                                          and r["batch"] == batch and r.get("median_s")), None)
    fused = row("mlp", "fused", 128)
    if fused and fused.get("vs_eager"):
        results.append(_target("fused_vs_eager_b128", fused["vs_eager"], f"{fused['vs_eager']:.1f}x "
                                                                          f"({fused['backend']})"))
    if fused and fused.get("vs_graph"):
        results.append(_target("fused_vs_graph_b128", fused["vs_graph"], f"{fused['vs_graph']:.1f}x"))
    graph = row("conv", "graph", 64)
    if graph and graph.get("vs_eager"):
        results.append(_target("conv_graph_vs_eager", graph["vs_eager"], f"{graph['vs_eager']:.1f}x "
                                                                         f"({graph['backend']})"))
    measured = {r["key"] for r in results}
    results += [dict(key=k, target=TARGET_TEXT[k], figure="not measured", met=None) for k, _, _ in TARGETS
                if k not in measured]
    return results


def _target(key: str, value: float, figure: str) -> dict:
    return dict(key=key, target=TARGET_TEXT[key], figure=figure, value=value, met=value >= TARGET_VALUE[key])


def verdict(met) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def _beside(value, threshold: float, unit: str = "x") -> str:
    """The target printed beside a figure: ``>= 50x: met``."""
    if value is None:
        return ""
    shown = f"{threshold:.0%}" if unit == "%" else f"{threshold:g}x"
    return f">= {shown}: {verdict(value >= threshold)}"


def render_report(state: dict) -> str:
    """The Markdown report: the parts, the targets, then each part's figures with the targets beside them."""
    parts, info = state["parts"], state.get("machine") or {}
    failed = [n for n, p in parts.items() if p["status"] in FAILED_STATUSES]
    title = info.get("gpu") or f"{info.get('cpu', 'CPU')} (dry run)"
    dry = "; DRY RUN (CPU, tiny sizes: the figures say nothing about the targets)" if state["dry_run"] else ""
    lines = [f"# GPU validation: {title}", "",
             f"{'FAILED: ' + ', '.join(failed) if failed else 'No part failed'}; {state['seconds']:.0f} s of "
             f"{state['time_limit_s']:.0f} s; {state['started']}; commit {state.get('commit') or 'unknown'}{dry}",
             "", _machine_line(info), ""]
    rows = [dict(part=n, what=p.get("what", ""), status=p["status"], seconds=p.get("seconds"),
                 expected=p.get("expected_s"), budget=p.get("budget_s"), summary=p.get("summary", ""))
            for n, p in parts.items()]
    lines += [markdown_table(rows, [("part", "part", "s"), ("what", "what", "s"), ("status", "status", "s"),
                                    ("seconds", "s", ".0f"), ("expected", "expected s", "d"),
                                    ("budget", "budget s", "d"), ("summary", "summary", "s")]), ""]
    lines += ["## Targets (issue 18)", "",
              markdown_table([dict(t, verdict=verdict(t["met"])) for t in state["targets"]],
                             [("target", "target", "s"), ("figure", "figure", "s"), ("verdict", "", "s")]), ""]
    for name, part in parts.items():
        body = SECTIONS.get(name, lambda p: [])(part.get("results", {}))
        if body:
            lines += [f"## {name}", "", *body, ""]
    return "\n".join(lines)


def _machine_line(info: dict) -> str:
    keys = ("gpu", "compute_capability", "sm_count", "l2_mib", "gpu_memory_gib", "cuda", "torch", "triton",
            "cupy-cuda13x", "python", "cpu", "cores")
    return "Machine: " + ", ".join(f"{k} {info[k]:.0f}" if isinstance(info.get(k), float) else f"{k} {info[k]}"
                                   for k in keys if info.get(k) is not None)


def _section_install(results: dict) -> list[str]:
    lines = ["```", results.get("backend_info", ""), "```"]
    if results.get("nvidia_smi"):
        lines += ["", "```", results["nvidia_smi"], "```"]
    if results.get("chains"):
        lines += ["", "Chains: " + ", ".join(f"{k} -> {v}" for k, v in results["chains"].items())]
    return lines


def _section_lanes(results: dict) -> list[str]:
    lines = []
    for lane, c in results.get("lanes", {}).items():
        lines.append(f"- `{c['command']}`: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped (exit {c['returncode']})")
        lines += [f"  - {f}" for f in c["failures"]]
    lines += [f"- {k}: {v}" for k, v in results.get("checks", {}).items()]
    return lines


def _section_step_op(results: dict) -> list[str]:
    rows = [dict(r, target=_beside(r["of_copy"], TARGET_VALUE["step_of_copy"], "%")
                 if r["impl"] in ("cuda", "triton") and r["log2"] >= 22 else "") for r in results.get("rows", [])]
    if not rows:
        return []
    return ["Bandwidth counts z and grad read and z written; copy is `out.copy_(z)` timed in the same run.", "",
            markdown_table(rows, [("dtype", "dtype", "s"), ("n", "n", "s"), ("impl", "impl", "s"),
                                  ("us", "median us", ".1f"), ("gbs", "GB/s", ".1f"), ("of_copy", "of copy", ".0%"),
                                  ("copy_gbs", "copy GB/s", ".1f"), ("vs_eager", "x eager", ".1f"),
                                  ("target", "target", "s")])]


def _section_chains(results: dict) -> list[str]:
    rows = []
    for r in with_milliseconds(results.get("rows", [])):
        target = ""
        if r["case"] == "mlp" and r["impl"] == "fused" and r["batch"] == 128:
            target = "; ".join(t for t in (_beside(r.get("vs_eager"), TARGET_VALUE["fused_vs_eager_b128"]),
                                           _beside(r.get("vs_graph"), TARGET_VALUE["fused_vs_graph_b128"])) if t)
        elif r["case"] == "conv" and r["impl"] == "graph" and r["batch"] == 64:
            target = _beside(r.get("vs_eager"), TARGET_VALUE["conv_graph_vs_eager"])
        rows.append(dict(r, target=target, note=r.get("note") or ""))
    if not rows:
        return []
    return ["Medians of interleaved rounds (CUDA events on a GPU); x graph: the CUDA-graphed step-op chain's time "
            "over this row's; compile s: the one-time cost left out (torch.compile, the Triton JIT, the graph "
            "capture).", "",
            markdown_table(rows, [("case", "case", "s"), ("batch", "B", "d"), ("n_steps", "K", "d"),
                                  ("impl", "impl", "s"), ("backend", "ran", "s"), ("median_ms", "median ms", ".3f"),
                                  ("min_ms", "min", ".3f"), ("max_ms", "max", ".3f"), ("vs_eager", "x eager", ".1f"),
                                  ("vs_graph", "x graph", ".2f"), ("gflops", "GFLOP/s", ".0f"),
                                  ("compile_s", "compile s", ".1f"), ("target", "target", "s"),
                                  ("note", "note", "s")])]


def _section_training(results: dict) -> list[str]:
    rows = []
    for trainer, m in results.get("trainers", {}).items():
        if "error" in m:
            rows.append(dict(trainer=trainer, sampler="-", note=m["error"]))
            continue
        for sampler in ("library", "eager"):
            runs = ", ".join(f"{r['steps']}: {r['seconds']:.2f}" for r in m[sampler]["runs"])
            rows.append(dict(trainer=trainer, sampler=sampler, iteration_ms=m[sampler]["iteration_s"] * 1e3,
                             ratio=m["eager_vs_library"] if sampler == "library" else None,
                             note=f"runs (steps: s) {runs}"))
    small, big = results.get("small_steps"), results.get("big_steps")
    warm = ", after a warm-up run of each sampler" if results.get("warm_up") else ""
    lines = [f"Time per iteration = (T({big} steps) - T({small} steps)) / ({big} - {small}): whole CLI runs in one "
             f"process{warm}, samplers alternated."]
    if rows:
        lines += ["", markdown_table(rows, [("trainer", "trainer", "s"), ("sampler", "sampler", "s"),
                                            ("iteration_ms", "ms / iteration", ".2f"),
                                            ("ratio", "eager / library", ".2f"), ("note", "", "s")])]
    lines += [f"- {k}: {v}" for k, v in results.get("skipped", {}).items()]
    return lines


def _section_ncu(results: dict) -> list[str]:
    if not results.get("kernels"):
        return []
    return ["One launch of each kernel after warm-up, clocks as found (`--clock-control none`); the report is "
            "`kernels.ncu-rep`.", "",
            markdown_table(results["kernels"], [
                ("kernel", "kernel", "s"), ("duration_us", "us", ".1f"), ("dram_gbs", "DRAM GB/s", ".0f"),
                ("dram_pct", "DRAM %", ".0f"), ("sm_pct", "SM %", ".0f"),
                ("achieved_occupancy_pct", "occupancy %", ".0f"), ("theoretical_occupancy_pct", "theoretical %", ".0f"),
                ("registers", "registers", ".0f"), ("block_size", "block", ".0f"), ("grid_size", "grid", ".0f"),
                ("static_shared_kib", "static smem KiB", ".1f"), ("dynamic_shared_kib", "dyn. smem KiB", ".1f")])]


SECTIONS = {"install": _section_install, "gpu-tests": _section_lanes, "triton-compile": _section_lanes,
            "nvrtc": _section_lanes, "step-op": _section_step_op, "chains": _section_chains,
            "training": _section_training, "ncu": _section_ncu}

