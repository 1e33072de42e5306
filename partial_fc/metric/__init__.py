"""Metric losses on the backbone's features over the gathered global batch (see docs/metric_losses.md)."""
from .center import CenterLoss
from .circle import CircleLoss
from .registry import METRIC_LOSSES, build_metric_loss, metric_loss_options
from .triplet import TripletLoss

__all__ = ["CenterLoss", "TripletLoss", "CircleLoss", "METRIC_LOSSES", "build_metric_loss",
           "metric_loss_options"]
