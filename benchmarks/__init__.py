"""Side-by-side benchmarks of the ``ptycho_torch`` flavor; ``python benchmarks/run.py --help`` says how to run them.

Layout: :mod:`benchmarks.records` (the result types), :mod:`benchmarks.harness` (interleaved timer, statistics,
thread control, profiles), :mod:`benchmarks.report` (records -> markdown / JSON),
:mod:`benchmarks.models` (the models every section measures), :mod:`benchmarks.probes` (measurements that need a
fresh interpreter), one module per section under :mod:`benchmarks.sections`, and the CLI ``run.py``.
"""
