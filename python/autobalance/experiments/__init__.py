"""The experiments: imbalanced image data sets, models, Algorithm 1 end to
end with the paper's baselines (``recipes``), tables and plots (``report``)
and the ``autobalance`` command (``cli``).

Installed with the ``experiments`` extra (``pip install autobalance[experiments]``:
matplotlib, tqdm, scikit-learn, mlxtend); the library (``autobalance``)
never imports this package. Its modules load their optional dependencies
when they are used, so ``import autobalance.experiments.recipes`` works
without them.
"""
