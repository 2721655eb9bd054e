"""fed-ecg common package: data, models, training and metrics.

Pure PyTorch / NumPy code. Nothing in this package imports Flower; the Flower glue lives in
``server/`` and ``client/``.
"""
