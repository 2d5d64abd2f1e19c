"""``scalable-shampoo compare``: Shampoo against first-order optimizers on paper-like workloads.

- :mod:`.workloads`: the :class:`~.workloads.Workload` structure and the built-in workloads,
- :mod:`.optimizers`: ``kind:key=value`` optimizer specifications and learning-rate grids,
- :mod:`.runner`: training runs, learning-rate sweeps, targets, resume,
- :mod:`.report`: the table, ``results.json``/``results.md`` and the plots.

Needs the ``bench`` extra (tqdm, matplotlib, scikit-learn); ``import scalable_shampoo``
does not import this package.
"""
