"""Unsupervised domain adaptation of the backbone: Deep CORAL and DANN on penultimate features.

Each training step of a domain-adaptation fit runs a labelled source batch
and an unlabelled target batch through the network together; besides the
source cross-entropy, an alignment loss between the two batches' penultimate
features (the classifier's input) pulls the domains together:

- Deep CORAL (Sun & Saenko, 2016): the squared Frobenius distance between
  the two feature covariances, divided by ``4 d^2``
  (:func:`skada.deep.losses.deepcoral_loss`);
- DANN (Ganin et al., 2016): a small domain classifier learns to tell the
  domains apart from the features, which reach it through a gradient
  reversal layer (:class:`skada.deep.modules.GradientReversalLayer`), so
  that the network learns features it cannot tell apart. The loss is
  skada's :class:`~skada.deep.DANNLoss` with a logit criterion.

skada (with skorch, which ``skada.deep`` imports) is imported only when a
fit adapts: ``pip install "skt[da]"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DOMAIN_CLASSIFIER_WIDTH", "coral_loss", "cycle_batches", "dann_coefficient",
           "dann_loss", "make_domain_classifier", "prediction_entropy", "require_skada"]

DOMAIN_CLASSIFIER_WIDTH = 100
"""Hidden units of DANN's domain classifier (skada's ``DomainClassifier`` has 100 too)."""


def require_skada() -> Any:
    """``skada.deep``, imported now; an ``ImportError`` saying how to install it if missing.

    Importing skada turns on scikit-learn's metadata routing
    (``sklearn.set_config(enable_metadata_routing=True)``), which its
    pipelines need.
    """
    try:
        import skada.deep
    except ImportError as exc:
        raise ImportError(f"domain_adaptation needs skada and skorch ({exc}). Install them "
                          'with: pip install "skt[da]"') from exc
    return skada.deep


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: ``||C_source - C_target||_F^2 / (4 d^2)`` between feature covariances.

    ``source`` and ``target`` are ``(n, d)`` features of at least two items
    each (:func:`skada.deep.losses.deepcoral_loss`).
    """
    return require_skada().losses.deepcoral_loss(source, target)


def make_domain_classifier(in_features: int, seed: int) -> nn.Sequential:
    """DANN's domain classifier: Linear-ReLU-Linear to one logit (target vs source).

    skada 0.6's ``DomainClassifier`` ends with ``nn.Softmax()`` over its single
    output, which is always 1.0: its loss is a constant and no gradient
    reaches the classifier or the features. This one returns the logit, for
    ``BCEWithLogitsLoss``. Initialised from ``seed``, whatever torch's
    global generator holds.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_features, DOMAIN_CLASSIFIER_WIDTH), nn.ReLU(),
                             nn.Linear(DOMAIN_CLASSIFIER_WIDTH, 1))


def dann_coefficient(progress: float) -> float:
    """The gradient reversal's coefficient ``2 / (1 + exp(-10 p)) - 1`` at training progress ``p``.

    Ganin et al. (2016) ramp it from 0 at the start of training to nearly 1
    at its end, so that the domain classifier's noisy early signal does not
    disturb the features while the classifier itself is still random.

    Examples
    --------
    >>> from skt.training import dann_coefficient
    >>> [round(dann_coefficient(p), 3) for p in (0.0, 0.1, 0.5, 1.0)]
    [0.0, 0.462, 0.987, 1.0]
    """
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def dann_loss(domain_classifier: nn.Module, source: torch.Tensor, target: torch.Tensor,
              coefficient: float) -> torch.Tensor:
    """DANN's domain loss: binary cross-entropy of telling target (1) from source (0).

    The sum of the two domains' mean losses (skada's ``DANNLoss``; ``2 ln 2``
    at chance). The features pass a gradient reversal layer first: the
    domain classifier descends this loss while the features ascend it,
    scaled by ``coefficient`` (:func:`dann_coefficient`).
    """
    deep = require_skada()
    reverse = deep.modules.GradientReversalLayer.apply
    criterion = deep.DANNLoss(domain_criterion=nn.BCEWithLogitsLoss())
    return criterion(domain_pred_s=domain_classifier(reverse(source, coefficient)).squeeze(1),
                     domain_pred_t=domain_classifier(reverse(target, coefficient)).squeeze(1))


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_k p_k log p_k`` (nats) of each row's softmax, in float64.

    Averaged over target images, it is an unsupervised model-selection
    criterion (lower is better). skada's ``PredictionEntropyScorer`` with
    ``reduction="mean"`` reports the same mean divided by the number of
    classes (it averages over images and classes), negated.
    """
    log_p = F.log_softmax(logits.double(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def cycle_batches(batches: Iterable) -> Iterator:
    """``batches`` pass after pass, without end: each pass draws a new order.

    Closing the iterator closes the pass under way (``yield from`` passes the
    close on, so its decoding threads stop). ``batches`` must yield at least
    one batch per pass.
    """
    while True:
        yield from batches
