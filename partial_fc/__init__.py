"""Sharded margin-softmax classifier (Partial FC), margins and metric losses."""
from .checks import NonFiniteEmbeddingError
from .head import PartialFC
from .optim import PartialFCAdamW, PartialFCSGD, build_head_optimizer
from .sharding import class_range
from .softmax import sharded_cross_entropy, sharded_top1_accuracy

__all__ = ["PartialFC", "NonFiniteEmbeddingError", "PartialFCSGD", "PartialFCAdamW",
           "build_head_optimizer", "class_range", "sharded_cross_entropy", "sharded_top1_accuracy"]
