"""``scalable-shampoo compare``: Shampoo against first-order optimizers on paper-like workloads.

- :mod:`.workloads`: the :class:`~.workloads.Workload` structure and the built-in workloads,
- :mod:`.optimizers`: ``kind:key=value`` optimizer specifications and learning-rate grids,
- :mod:`.peers`: other libraries' optimizers (the ``peers`` extra), imported when named,
- :mod:`.runner`: training runs, learning-rate sweeps, targets, resume,
- :mod:`.report`: the table, ``results.json``/``results.md`` and the plots.

Needs the ``bench`` extra (tqdm, matplotlib, scikit-learn); ``import scalable_shampoo``
does not import this package.
"""

# The top-level modules of the bench extra, and how to install it.
BENCH_MODULES = ("sklearn", "matplotlib", "tqdm")
BENCH_EXTRA_HINT = ("pip install 'scalable-shampoo[bench]' (in a checkout: "
                    "pip install -e \".[bench]\")")
