"""What the benchmark runners in bench/ share: processes, load, servers, datasets, plots, fuzzing.

Nothing here is run on its own as a benchmark; the runners are the modules one level up
(``python -m bench.suite`` and the others).  A few modules here are also started as child
processes by the runners (``bench.lib.load --worker``, ``bench.lib.responders``,
``bench.lib.delayproxy``), or redraw plots (``python -m bench.lib.plots RESULT.json``).
"""
