"""Center, triplet and circle losses with the project's distributed gradient convention.

The implementations live in :mod:`partial_fc.metric` (one module per loss); this module is
the stable import path.
"""
from .metric import METRIC_LOSSES, CenterLoss, CircleLoss, TripletLoss, build_metric_loss, metric_loss_options

__all__ = ["CenterLoss", "TripletLoss", "CircleLoss", "METRIC_LOSSES", "build_metric_loss",
           "metric_loss_options"]
