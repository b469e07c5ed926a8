"""Level-2 learning on out-of-fold tables.

Blends (mean, geometric mean, rank average, learned weights),
logistic-regression score fusion and a LightGBM meta-learner, registered once
in ``stacking.learners.REGISTRY``; scikit-learn estimators on the level-2
arrays of ``stacking.inputs.Level2Inputs`` (column layout in
``stacking.base.Level2Layout``), scored by honest cross-validation on the
shared folds (``stacking.evaluate``: ``cross_val_predict`` over
``PredefinedSplit``), and the stage ``python -m stacking.stack``.
"""
