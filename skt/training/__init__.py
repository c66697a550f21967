"""Training a classifier network: the loop, its state and the pieces it is made of.

This is the extension point of :class:`skt.FineTuneClassifier`:

- :class:`TrainingLoop`: the steps (``train_step``, ``get_loss``,
  ``validation_step``, ...), each a method a subclass may override;
- :class:`Callback` and the built-in :class:`ProgressBar`,
  :class:`EarlyStopping`, :class:`WeightAverage` and :class:`Checkpoint`: what happens on named
  events around the steps, passed with ``FineTuneClassifier(callbacks=...)``;
- :class:`TrainingState`: everything that changes while training;
- :class:`FreezePlan`, :func:`make_optimizer`, :func:`make_scheduler`,
  :func:`l2sp_penalty`, :func:`distillation_loss`, :class:`ImageBatches`,
  :func:`split_network` with :class:`Trunk` and :class:`TrunkStore` (the
  frozen stages computed once per image and view) and the checkpoint
  files: the parts, usable on their own;
- :func:`coral_loss`, :func:`dann_loss` with :func:`make_domain_classifier`
  and :func:`dann_coefficient`, :func:`prediction_entropy` and
  :func:`cycle_batches`: unsupervised domain adaptation of the backbone
  (skada is imported only when a loss is computed).
"""

from skt.training._adaptation import (
    DOMAIN_CLASSIFIER_WIDTH,
    coral_loss,
    cycle_batches,
    dann_coefficient,
    dann_loss,
    make_domain_classifier,
    prediction_entropy,
    require_skada,
)
from skt.training._callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    ProgressBar,
    WeightAverage,
)
from skt.training._checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from skt.training._data import CACHE_BYTES, ImageBatches
from skt.training._freeze import (
    FreezePlan,
    auto_frozen_stages,
    backbone_parameters,
    fixed_statistics,
    make_freeze_plan,
    matches,
)
from skt.training._loop import TrainingLoop
from skt.training._optim import WarmupSchedule, make_optimizer, make_scheduler
from skt.training._regularizers import (
    DEFAULT_ALPHA,
    LWF_TEMPERATURE,
    distillation_loss,
    l2sp_penalty,
    record_head_input,
)
from skt.training._state import TrainingState
from skt.training._trunk import MEMORY_BYTES, Trunk, TrunkStore, split_network

__all__ = [
    "CACHE_BYTES",
    "CHECKPOINT_FORMAT",
    "DEFAULT_ALPHA",
    "DOMAIN_CLASSIFIER_WIDTH",
    "LWF_TEMPERATURE",
    "MEMORY_BYTES",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FreezePlan",
    "ImageBatches",
    "ProgressBar",
    "TrainingLoop",
    "TrainingState",
    "Trunk",
    "TrunkStore",
    "WarmupSchedule",
    "WeightAverage",
    "auto_frozen_stages",
    "backbone_parameters",
    "coral_loss",
    "cycle_batches",
    "dann_coefficient",
    "dann_loss",
    "distillation_loss",
    "fixed_statistics",
    "l2sp_penalty",
    "load_checkpoint",
    "make_domain_classifier",
    "make_freeze_plan",
    "make_optimizer",
    "make_scheduler",
    "matches",
    "prediction_entropy",
    "read_checkpoint",
    "record_head_input",
    "require_skada",
    "save_checkpoint",
    "split_network",
]
