"""fusedops benchmarks: the report CLI (``fusedops-bench``) and pytest-benchmark suites.

Installed as ``fusedops.benchmarks``. One concept per module:

- ``report``      the CLI (also ``python -m fusedops.benchmarks``): parses arguments, prints
                  versions, runs families or the self-check
- ``environment`` versions, device, git commit, the ``<gpu>`` folder name of a results set
- ``registry``    op families (cases, implementations, byte and FLOP counts), by name
- ``cases_*``     one module per op family, registered in ``registry`` (``cases_training``:
                  whole training steps of the models below)
- ``common``      what the families share: dtypes, input rotation, probes, skip reasons
- ``models``      the small GPT of the training family and of ``examples/small_gpt.py``
- ``timing``      median device time (``triton.testing.do_bench``, L2 flushed, inputs
                  rotated) and peak memory
- ``ceilings``    the copy-bandwidth and bf16 matmul ceilings, measured in the same run
- ``runner``      runs a family's cases, with progress, resume and per-implementation errors
- ``store``       the results JSON: append, resume, atomic writes
- ``compare``     speed ratios between implementations measured side by side
- ``render``      the Markdown table, the PNG plots and the terminal table
- ``selfcheck``   the no-GPU parity self-check of the CPU and interpreter tiers
- ``test_bench_*`` pytest-benchmark suites (GPU only; run with ``pytest benchmarks/``)
- ``suite``       what those suites share: the inputs fixture and the timing loop (imports
                  pytest; only the suites import it)

Nothing here imports triton at import time: without a GPU the CLI must set
``TRITON_INTERPRET=1`` before triton is first imported.
"""
