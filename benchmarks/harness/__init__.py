"""The benchmark harness: what ``fastlangevin bench``, ``benchmarks/*.py`` and ``gpu_validate.py`` share.

One module per job: ``timing`` (medians over repeats, CUDA events on GPUs), ``machine`` (what the numbers were
measured on), ``flops`` (FLOP counts), ``models`` (the benchmark energies), ``implementations`` (the chains being
compared: eager, torch.compile, step op, CUDA graph, fused, JAX), ``measure`` (the rows of a run, timed in
interleaved rounds), ``tables`` (text tables and JSON), ``plots`` (the PNG), ``training`` (a training iteration
timed through the CLI), ``ncu`` (Nsight Compute's per-kernel summary); for ``gpu_validate.py``: ``gpu_parts`` (its
parts) and ``gpu_report`` (issue 18's targets and the Markdown report).

Import it with ``benchmarks/`` on ``sys.path`` (a script in ``benchmarks/`` has it there already).
"""
