"""Level-2 learning on out-of-fold tables.

Blends (mean, geometric mean, rank average), logistic-regression score
fusion and a LightGBM meta-learner, scored by honest cross-validation on the
shared folds (``stacking.evaluate``), and the stage ``python -m stacking.stack``.
"""
