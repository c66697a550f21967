"""``FineTuneClassifier``: a pretrained CNN fine-tuned end to end as a scikit-learn classifier."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from skt._base import BACKBONE_CONSTRAINTS, RUNTIME_CONSTRAINTS, ImageEstimatorMixin
from skt._sklearn import Interval, StrOptions, _fit_context
from skt._utils import expand_path, resolve_num_workers
from skt.backbones import PRE_LOGITS, Backbone, resolve_backbone
from skt.cache import default_cache_dir, fingerprint, fingerprint_module
from skt.extract import FeatureRuntime, extract_into, resolve_device
from skt.extractor import FeatureExtractor
from skt.images import as_image_list, torch_threads, view_count, view_of
from skt.training import (
    Callback,
    Checkpoint,
    EarlyStopping,
    ImageBatches,
    ProgressBar,
    TrainingLoop,
    TrainingState,
    TrunkStore,
    WeightAverage,
    load_checkpoint,
    make_domain_classifier,
    read_checkpoint,
    record_head_input,
    require_skada,
)
from skt.training._distributed import all_gather, broadcast, join_process_group

__all__ = ["FineTuneClassifier"]

# Parameters that change how a fit runs, not what it computes: a checkpoint
# written under one value resumes under another.
_RUNTIME_PARAMS = ("checkpoint", "device", "n_threads", "num_workers", "tta", "verbose",
                   "warm_start")


def _describe_param(value):
    if isinstance(value, nn.Module):
        return f"module:{fingerprint_module(value)}"
    if isinstance(value, np.random.RandomState):
        return "RandomState"
    return repr(value)


def _is_missing(label) -> bool:
    """None, a float NaN of any width, or pandas' NA (without importing pandas)."""
    if label is None or type(label).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(label, float | np.floating) and bool(np.isnan(label))


def _check_label_values(labels: np.ndarray) -> None:
    """Refuse missing labels (None, NaN) and a mix of strings and numbers, naming positions.

    ``labels`` as given: a list like ``["a", 1]`` must not reach NumPy,
    which would turn its numbers into strings.
    """
    if labels.dtype.kind == "f":
        missing = np.flatnonzero(np.isnan(labels))
    elif labels.dtype == object:
        missing = np.flatnonzero([_is_missing(label) for label in labels])
    else:
        return
    if len(missing):
        raise ValueError(f"y has {len(missing)} missing labels (None or NaN), at positions "
                         f"{missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}. Label "
                         "those images, or leave them out of X and y.")
    if labels.dtype == object:
        text = np.array([isinstance(label, str | bytes) for label in labels])
        if text.any() and not text.all():
            first, other = int(np.argmax(text)), int(np.argmin(text))
            raise TypeError(
                f"y mixes strings and numbers (y[{first}] = {labels[first]!r}, y[{other}] = "
                f"{labels[other]!r}); class labels must be all strings or all numbers. Convert "
                "them first, e.g. y = [str(label) for label in y].")


# What early stopping watches for each ``scoring``: a history column, and whether lower is better.
_MONITORS = {"accuracy": ("valid_score", False), "loss": ("valid_loss", True),
             "target_entropy": ("target_entropy", True)}

_DOMAINS = ("positive for labelled source images, negative for unlabelled target images, "
            "as in skada")


def _plain(value):
    """A NumPy scalar as the Python value it holds, for error messages."""
    return value.item() if isinstance(value, np.generic) else value


def _check_domains(sample_domain, n_images: int) -> np.ndarray:
    """``sample_domain`` as int64, refused unless it is one non-zero integer per image."""
    domains = np.asarray(sample_domain)
    if domains.ndim != 1:
        raise ValueError(f"sample_domain must be one domain per image, a list or a 1-D array; "
                         f"got an array of shape {domains.shape}.")
    if len(domains) != n_images:
        raise ValueError(f"X has {n_images} images but sample_domain has {len(domains)} "
                         f"entries; pass one domain per image ({_DOMAINS}).")
    if domains.dtype.kind in "iu":
        bad = np.flatnonzero(domains == 0)
    else:
        bad = np.flatnonzero([isinstance(d, bool | np.bool_) or not isinstance(d, Real)
                              or not np.isfinite(d) or d != int(d) or d == 0
                              for d in domains.tolist()])
    if len(bad):
        raise ValueError(f"sample_domain must hold non-zero integers ({_DOMAINS}), but "
                         f"sample_domain[{bad[0]}] = {_plain(domains[bad[0]])!r}.")
    return domains.astype(np.int64)


def _is_mask(label) -> bool:
    """skada's mask for an unlabelled target image: -1, as a number or a string."""
    if isinstance(label, str | bytes):
        return label in ("-1", b"-1")
    return isinstance(label, Real) and not isinstance(label, bool | np.bool_) and label == -1


def _masks(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind in "iuf":
        return labels == -1
    return np.array([_is_mask(label) for label in labels.tolist()], dtype=bool)


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values, dtype=np.int64).tobytes(),
                           digest_size=16).hexdigest()


def _check_masks(labels: np.ndarray, source: np.ndarray) -> None:
    """Target labels must be skada's mask, -1, and source labels must not."""
    is_source = np.zeros(len(labels), dtype=bool)
    is_source[source] = True
    masked = _masks(labels)
    labelled = np.flatnonzero(~is_source & ~masked)
    if len(labelled):
        first = labelled[0]
        raise ValueError(
            f"y labels {len(labelled)} target image(s) (sample_domain < 0), e.g. y[{first}] = "
            f"{_plain(labels[first])!r}; domain adaptation learns without target labels. Mask "
            "them with -1, as skada does: y[sample_domain < 0] = -1.")
    unlabelled = np.flatnonzero(is_source & masked)
    if len(unlabelled):
        first = unlabelled[0]
        raise ValueError(
            f"y[{first}] = -1 for a source image (sample_domain[{first}] > 0), but -1 marks an "
            "unlabelled target image (skada's mask). Label every source image, or give the "
            "unlabelled ones a negative sample_domain.")


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for another random stream of the same fit."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _no_classifier(backbone) -> ValueError:
    name = backbone if isinstance(backbone, str) else type(backbone).__name__
    return ValueError(
        f"Backbone {name!r} has no nn.Linear layer to replace with a new classifier. "
        "FineTuneClassifier needs a network whose last nn.Linear is its classifier "
        "(SqueezeNet's is a convolution); use FeatureExtractor with a scikit-learn head instead."
    )


class FineTuneClassifier(ImageEstimatorMixin, ClassifierMixin, TransformerMixin, TrainingLoop,
                         BaseEstimator):
    """Fine-tune a pretrained CNN end to end as a scikit-learn classifier.

    The backbone, its weights and its preprocessing are resolved exactly as
    in :class:`skt.FeatureExtractor`. The network's classifier (declared per
    backbone family; for a user module, its last ``nn.Linear``) is replaced
    by a new one with one output per class seen in ``fit``; the whole network
    (less what ``freeze`` holds) then trains with cross-entropy. The loop is
    :class:`skt.training.TrainingLoop`: a subclass can override
    ``train_step``, ``get_loss``, ``train_epoch``, ``validation_step`` and the
    other steps one at a time; :class:`skt.training.Callback` objects passed
    as ``callbacks`` act on named events around them.

    **BatchNorm.** Frozen BatchNorm layers stay in eval mode, with their
    pretrained statistics. With ``batchnorm="auto"`` so do layers that train
    but came with pretrained statistics: their affine parameters train, their
    statistics do not move. Recomputing statistics from a few hundred images
    under weights that are still changing is what breaks small-data
    fine-tuning: on 500 digit images (64 px, Lite0, 3 epochs) a plain
    train-mode loop ends at 0.36-0.51 eval-mode accuracy, batch statistics
    averaged over the last epoch at 0.66, fixed statistics at 0.89. Layers
    without pretrained statistics (random initialisation) normalise with
    batch statistics and keep as running statistics the plain average of
    the last epoch's batch statistics (``momentum=None``, restarted every
    epoch), never a stale exponential average (resnet18 from scratch, 32 px:
    0.91, against 0.88 with momentum 0.1 and 0.83 with fixed statistics).
    Training across processes makes the same choice: fixed statistics stay
    fixed (and identical on every process), while layers that normalise with
    batch statistics use those of each process's piece of the batch
    (``SyncBatchNorm`` needs CUDA), and their running statistics are averaged
    over the processes at the end of each epoch.

    **Training across processes.** Launched by ``torchrun`` (or with a
    ``torch.distributed`` process group of several processes already
    initialised), ``fit`` trains with ``DistributedDataParallel``: it
    initialises the group if needed (``"gloo"`` on the CPU, ``"nccl"`` on
    CUDA, where ``device="auto"`` or ``"cuda"`` means ``cuda:LOCAL_RANK``),
    and every process, given the same images and labels, decodes and trains
    on its piece of each batch (:class:`skt.training.ImageBatches`, ``shard``).
    ``batch_size`` stays the global batch and the loss is scaled so that the
    averaged gradients are those of the whole batch: without dropout or
    layers that normalise with batch statistics, the weights are those of
    one process up to float rounding (a final partial batch with fewer than
    2 images per process is left out, where one process keeps any of 2 or
    more). Rank 0 alone shows progress and writes the checkpoint, which every
    process reads to resume (so it must be on a filesystem they share); the
    fitted classifier is the same on every process, a plain network on the
    CPU that predicts in a single process. ``python -m skt.train`` fits one
    from an image folder (:mod:`skt.train`).

    **Source and target domains.** ``fit(X, y, sample_domain=...)`` follows
    skada's convention: one non-zero integer per image, positive for a
    labelled source domain, negative for an unlabelled target domain, whose
    labels in ``y`` are masked with -1 (several domains of a kind are
    pooled). With ``domain_adaptation``, each training step runs a batch of
    source images and a batch of as many target images (shuffled and
    augmented alike; a new pass over the target images starts each epoch,
    and whenever one ends) through the network together, as one batch, and
    adds ``adaptation_strength`` times an alignment loss between their
    penultimate features (the classifier's input) to the source loss:
    ``"coral"`` is Deep CORAL (Sun & Saenko, 2016), which matches the two
    batches' feature covariances; ``"dann"`` is DANN (Ganin et al., 2016):
    a domain classifier (Linear-ReLU-Linear, trained at the head's learning
    rate) learns to tell the batches apart while, through a gradient
    reversal layer, the network learns features it cannot tell apart; the
    reversal's coefficient ramps as ``2 / (1 + exp(-10 p)) - 1`` over the
    fit's progress ``p`` from 0 to 1, as Ganin et al. do. The losses are
    skada's (``pip install "skt[da]"``). The domain classifier is dropped
    after ``fit``: ``model_`` stays a plain classifier and ``predict``
    takes images alone. Without ``domain_adaptation``, ``sample_domain``
    only picks the source images to train on (skada's "source only"
    baseline); the target images then serve ``scoring="target_entropy"``
    alone. Early stopping holds out a share of the source images, and
    records each epoch's ``valid_loss`` and the mean prediction entropy on
    the target images (``target_entropy``), which ``scoring`` may choose:
    with no target labels, lower entropy (more confident target
    predictions) is the usual proxy. The frozen stages are computed once
    for target images as for source images. Across processes, each process
    aligns its piece of the source batch with its piece of the target
    batch, so that CORAL's covariances are those of the pieces.
    ``sample_domain`` is requested by default in scikit-learn's metadata
    routing, so that with ``sklearn.set_config(enable_metadata_routing=True)``
    a ``Pipeline``, ``GridSearchCV`` or skada's ``make_da_pipeline`` passes
    it on to ``fit`` (importing skada, which a domain-adaptation fit does,
    turns routing on, as skada always does).

    Parameters
    ----------
    backbone : str or nn.Module, default="efficientnet_lite0"
        As for :class:`skt.FeatureExtractor`: a torchvision classifier name, an
        EfficientNet-Lite variant, or an ``nn.Module`` whose last ``nn.Linear``
        is its classifier.
    weights : str, path or None, default="DEFAULT"
        Pretrained weights (``"DEFAULT"``, an enum name, a state-dict file), or
        None for random initialisation.
    image_size : int, optional
        Crop size fed to the network; default from the weights.
    mean, std : float or sequence of 3 floats, optional
        Normalisation; default from the weights.
    crop_mode : {"center", "squash"} or None, default=None
        A centre crop, or the whole image resized to ``image_size`` (for
        framed images), as for :class:`skt.FeatureExtractor`; None: the
        weights' choice. Random crops (``augment="standard"``) ignore it.
    max_iter : int, default=6
        Epochs (passes over the training images). With the defaults
        (``freeze="auto"``, 224 px for Lite0), 6 epochs on the 1,968 ELPV
        training cells took under 3 minutes on 2 CPU cores and scored
        better than the frozen features with any head (README, "Fine-tuning
        on a CPU").
    batch_size : int, default=32
        Images per optimisation step (at least 2, for BatchNorm), and per
        forward pass when predicting. Across processes it is the global
        batch, split between them (at least 2 images each).
    learning_rate_init : float, default=3e-3
        Peak learning rate of the new head (the backbone's is
        ``backbone_lr_scale`` times it). 3e-3 scored 0.875 on ELPV against
        0.867 for 1e-3 (README, "Fine-tuning on a CPU").
    backbone_lr_scale : float, default=0.1
        Learning rate of the pretrained layers relative to the head
        (discriminative fine-tuning); 0 keeps their weights.
    optimizer : {"adamw", "sgd"}, default="adamw"
        AdamW, or SGD with Nesterov momentum 0.9 (which wants a larger
        ``learning_rate_init``, e.g. 0.01).
    weight_decay : float, default=1e-4
        Weight decay of weight matrices and kernels (decoupled for AdamW);
        biases and norm layers are not decayed. Not applied with
        ``regularization="l2sp"``, whose penalty replaces it.
    lr_schedule : {"cosine", "onecycle", "constant"}, default="cosine"
        Per-step learning rate: linear warm-up then cosine decay to 0, the
        one-cycle policy (Smith, 2018), or linear warm-up then constant.
    warmup : float, default=0.1
        Fraction of all optimisation steps spent warming up (the rising
        phase of "onecycle").
    freeze : "auto", None, int, "all", str or list of str, default="auto"
        What of the backbone does not train. An int freezes that many stages
        from the input side (:func:`skt.list_stages` lists them); ``"auto"``
        freezes all but the last third of them, rounded up
        (:func:`skt.training.auto_frozen_stages`: 6 of EfficientNet-Lite0's
        9, 3 of ResNet's 5); ``"all"`` freezes the whole backbone, a linear
        probe trained by gradient descent; None trains everything; a string
        or list of strings freezes the parameters whose names match these
        ``fnmatch`` patterns (``"layer1"``, ``"*.bn*"``). Frozen stages are
        computed once per image and view (``frozen_cache``), so each
        frozen stage makes an epoch cheaper as well as the model steadier
        on few images.
    unfreeze_schedule : int, optional
        Gradual unfreezing: every ``unfreeze_schedule`` epochs the frozen
        stage nearest the head starts training. Needs ``freeze`` to be a
        stage count or ``"all"``.
    batchnorm : {"auto", "fixed", "batch"}, default="auto"
        Statistics of BatchNorm layers that train: ``"fixed"`` keeps their
        running statistics (eval mode), ``"batch"`` normalises with batch
        statistics and ends with the last epoch's average, ``"auto"`` fixes
        pretrained statistics and uses batch statistics for layers that have
        none (running mean 0 and variance 1, as initialised).
    augment : {None, "flip", "dihedral", "standard"}, default=None
        Training augmentation: none, random horizontal flips, one of the 8
        flips and quarter turns drawn per image and epoch (for images with
        no up or down: cells, tissue, satellite tiles;
        :func:`skt.images.dihedral_view`), or random resized crops (scale
        0.25-1) with flips. All but ``"standard"`` draw from a few fixed
        views, so ``frozen_cache`` can keep the frozen stages' output of
        each.
    frozen_cache : {"auto", "memory", "disk"} or None, default="auto"
        Compute the frozen stages once per image and view. With ``freeze``
        a stage count (or ``"all"``), the frozen stages are a fixed function
        of the image: the network is cut after them
        (:func:`skt.training.split_network`), their output for each training and
        validation image under each view of ``augment`` is computed the
        first time an epoch draws it and kept, and every step runs only the
        stages that train. Without augmentation, the weights reached are
        those of the plain path up to float rounding (with it, the two
        paths draw their views differently). ``"auto"`` keeps the outputs in memory up to
        4 GiB (:data:`skt.training.MEMORY_BYTES`) and beyond that in a
        temporary file under skt's cache folder (``$SKT_CACHE_DIR``), and
        quietly takes the plain path where the cut is not possible (no
        stage frozen, ``augment="standard"``, ``regularization="lwf"``, a
        network FX cannot trace); ``"memory"`` and ``"disk"`` insist, and
        raise where it is not possible. None always runs the whole network.
        With ``unfreeze_schedule``, the cut moves as stages thaw.
    tta : {None, "flip", "dihedral"}, default=None
        Test-time augmentation in ``predict``, ``predict_proba`` and
        ``decision_function``: the logits are averaged over the image's 2
        flips or 8 dihedral views (:func:`skt.images.dihedral_view`), at 2 or
        8 times the cost. ``transform`` is not affected.
    class_weight : None, "balanced" or dict, default=None
        Cross-entropy weight of each class; ``"balanced"`` weights classes
        inversely to their frequency; a dict maps labels to weights.
    regularization : {"none", "l2sp", "lwf"}, default="none"
        ``"l2sp"`` (Li et al., 2018) adds ``alpha / 2 * ||w - w_pretrained||^2``
        over the backbone and ``beta / 2 * ||W_head||^2``. ``"lwf"`` (learning
        without forgetting, Li & Hoiem, 2016) minimises
        ``alpha * L_source + (1 - alpha) * L_target``, where ``L_source`` is the
        distillation loss (temperature 2) between the original network's
        outputs and a copy of its classifier on the fine-tuned features. With
        random weights the anchor is the initial network.
    alpha : float, optional
        Strength of the regulariser; None means 0.01 for ``"l2sp"`` and 0.5 for
        ``"lwf"`` (which needs ``alpha <= 1``).
    beta : float, default=0.01
        L2-SP penalty on the new head's weights.
    head_init : {"random", "linear_probe"}, default="random"
        ``"linear_probe"`` is LP-FT (Kumar et al., 2022): a scikit-learn
        ``LogisticRegression`` is first fitted on the frozen network's
        features (from :class:`skt.FeatureExtractor`) and its weights start
        the head, so fine-tuning does not begin from a random head.
    average_epochs : int, optional
        End with the mean of the weights after each of the last
        ``average_epochs`` epochs (stochastic weight averaging over epochs;
        the :class:`skt.training.WeightAverage` callback), instead of the
        last epoch's. With early stopping, the best epoch's weights win.
    domain_adaptation : {None, "coral", "dann"}, default=None
        Adapt the backbone to the target images of ``sample_domain`` (see
        "Source and target domains" above) with Deep CORAL or DANN; None
        trains on the source images alone. Needs ``sample_domain`` and
        skada (``pip install "skt[da]"``).
    adaptation_strength : float, default=1.0
        Weight of the alignment loss added to the source loss. For DANN, the
        features thus receive ``-adaptation_strength * lambda_p`` times the
        domain loss's gradient (Ganin et al.'s ``lambda``). CORAL's loss is
        divided by ``4 d^2`` for ``d`` features, and is often small: compare
        ``adaptation_loss`` with ``train_loss`` in ``history_`` when choosing
        it.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the (source) images, stratified,
        score them after each epoch, stop after ``n_iter_no_change`` epochs
        without improvement of ``scoring`` and restore the best epoch's
        weights (the :class:`skt.training.EarlyStopping` callback).
    scoring : {"accuracy", "loss", "target_entropy"}, default="accuracy"
        What early stopping watches: accuracy or cross-entropy on the
        held-out images, or the mean prediction entropy on the target
        images of ``sample_domain`` (lower is better; no target label
        needed). Used only with ``early_stopping=True``.
    validation_fraction : float, default=0.1
        Share of images held out for early stopping.
    n_iter_no_change : int, default=3
        Epochs without a better validation score before stopping.
    warm_start : bool, default=False
        Continue from the fitted network for ``max_iter`` more epochs (with a
        fresh optimiser and schedule) instead of starting again.
    checkpoint : str or path, optional
        File written atomically at the end of each epoch (the
        :class:`skt.training.Checkpoint` callback) with the network,
        optimiser, scheduler, history, callbacks' and random-number states.
        ``fit`` with the
        same parameters and data resumes from it and, on the CPU, ends with the
        same weights as an uninterrupted run; a checkpoint of a finished fit
        is simply loaded. One written by another configuration is replaced,
        with a warning. A leading ``~`` is expanded; a folder, or a path
        that cannot be written, is refused before training starts. The file
        carries a checksum: a damaged one is refused before anything is
        loaded from it. Across processes, rank 0 writes it and every
        process reads it to resume: put it on a filesystem they share.
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU. A fitted classifier
        loaded on a machine without that device predicts on the CPU.
    callbacks : list of skt.training.Callback, optional
        Called on ``on_train_begin``, ``on_epoch_begin``, ``on_batch_end``,
        ``on_epoch_end`` and ``on_train_end``, after the built-in progress
        bar and early stopping and before the checkpoint. Each fit uses fresh
        copies; the list itself is never changed.
    num_workers : int or None, default=None
        Threads that decode and resize image files (for training, validation
        and prediction) while the network runs. None means one per core, up
        to 4; 0 decodes in the calling thread. Results do not depend on it:
        each image's augmentation has a seed of its own.
    n_threads : int or None, default=None
        CPU threads of the network in ``fit`` and prediction; None: torch's
        setting. As in :class:`skt.FeatureExtractor`, each image is
        preprocessed on one thread of its own.
    random_state : int, RandomState or None, default=None
        Seeds the initialisation, the validation split, shuffling,
        augmentation and dropout: the same int gives bit-identical results
        on the CPU.
    verbose : int, default=0
        1 shows a progress bar per epoch with the loss and validation score
        (the :class:`skt.training.ProgressBar` callback).

    Attributes
    ----------
    model_ : nn.Module
        The fine-tuned network on the CPU, in eval mode; its classifier has
        one output per class of ``classes_``.
    classes_ : ndarray of shape (n_classes,)
        Class labels, in the order of ``predict_proba`` columns.
    weights_ : str or None
        The pretrained weights fine-tuning started from, e.g.
        ``"efficientnet_lite0.IMAGENET1K_V1"``.
    preprocessing_ : skt.images.Preprocessing
        Resize, crop, interpolation, mean and std in use.
    n_iter_ : int
        Epochs run, over all ``warm_start`` fits.
    loss_curve_ : list of float
        Mean training loss (regulariser included) of each epoch.
    history_ : list of dict
        One row per epoch, over all ``warm_start`` fits: ``epoch``,
        ``train_loss``, ``valid_score`` (validation accuracy), with early
        stopping ``valid_loss`` (mean cross-entropy on the held-out images)
        and, given target images, ``target_entropy``; with domain
        adaptation, ``adaptation_loss`` (the epoch's mean alignment loss,
        before ``adaptation_strength``); and what callbacks added.
    validation_scores_ : list of float or None
        What ``scoring`` measured after each epoch (validation accuracy by
        default); None without early stopping.
    best_validation_score_ : float or None
        Its best value (the highest accuracy, or the lowest loss or
        entropy); None without early stopping.
    best_iteration_ : int or None
        Epoch (counted from 1) whose weights were kept; None without early
        stopping.
    world_size_ : int
        Processes that trained the last fit together (1 without
        ``torch.distributed``).

    Examples
    --------
    >>> import numpy as np
    >>> from skt import FineTuneClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    >>> X[8:, :, :16] = 255  # class "b" has a bright left half
    >>> y = np.array(["a"] * 8 + ["b"] * 8)
    >>> clf = FineTuneClassifier("resnet18", weights=None, image_size=32, max_iter=1,
    ...                          batch_size=8, learning_rate_init=1e-2, random_state=0)
    >>> clf.fit(X, y).classes_.tolist()
    ['a', 'b']
    >>> clf.predict_proba(X[:2]).sum(axis=1).round(6).tolist()
    [1.0, 1.0]
    >>> clf.transform(X[:2]).shape  # penultimate features of the fine-tuned network
    (2, 512)
    """


    _parameter_constraints: ClassVar[dict] = {
        **BACKBONE_CONSTRAINTS,
        **RUNTIME_CONSTRAINTS,
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "backbone_lr_scale": [Interval(Real, 0, None, closed="left")],
        "optimizer": [StrOptions({"adamw", "sgd"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "lr_schedule": [StrOptions({"cosine", "onecycle", "constant"})],
        "warmup": [Interval(Real, 0, 1, closed="left")],
        "freeze": [Interval(Integral, 0, None, closed="left"), str, list, tuple, None],
        "unfreeze_schedule": [Interval(Integral, 1, None, closed="left"), None],
        "batchnorm": [StrOptions({"auto", "fixed", "batch"})],
        "augment": [StrOptions({"flip", "dihedral", "standard"}), None],
        "frozen_cache": [StrOptions({"auto", "memory", "disk"}), None],
        "tta": [StrOptions({"flip", "dihedral"}), None],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "regularization": [StrOptions({"none", "l2sp", "lwf"})],
        "alpha": [Interval(Real, 0, None, closed="left"), None],
        "beta": [Interval(Real, 0, None, closed="left")],
        "head_init": [StrOptions({"random", "linear_probe"})],
        "average_epochs": [Interval(Integral, 1, None, closed="left"), None],
        "domain_adaptation": [StrOptions({"coral", "dann"}), None],
        "adaptation_strength": [Interval(Real, 0, None, closed="left")],
        "early_stopping": ["boolean"],
        "scoring": [StrOptions({"accuracy", "loss", "target_entropy"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "checkpoint": [str, os.PathLike, None],
        "callbacks": [list, tuple, None],
    }
    _runtime_attributes: ClassVar[tuple[str, ...]] = ("_runtime",)
    # Requested by default, as skada's estimators do: routing passes it on without
    # set_fit_request(sample_domain=True).
    __metadata_request__fit: ClassVar[dict] = {"sample_domain": True}
    # The predict methods take sample_domain only for skada's scorers, which call them
    # directly; routing (a skada pipeline) has nothing to pass them.
    __metadata_request__predict: ClassVar[dict] = {"sample_domain": False}
    __metadata_request__predict_proba: ClassVar[dict] = {"sample_domain": False}
    __metadata_request__predict_log_proba: ClassVar[dict] = {"sample_domain": False}
    __metadata_request__decision_function: ClassVar[dict] = {"sample_domain": False}

    def __init__(
        self,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        *,
        image_size=None,
        mean=None,
        std=None,
        crop_mode=None,
        max_iter=6,
        batch_size=32,
        learning_rate_init=3e-3,
        backbone_lr_scale=0.1,
        optimizer="adamw",
        weight_decay=1e-4,
        lr_schedule="cosine",
        warmup=0.1,
        freeze="auto",
        unfreeze_schedule=None,
        batchnorm="auto",
        augment=None,
        frozen_cache="auto",
        tta=None,
        class_weight=None,
        regularization="none",
        alpha=None,
        beta=0.01,
        head_init="random",
        average_epochs=None,
        domain_adaptation=None,
        adaptation_strength=1.0,
        early_stopping=False,
        scoring="accuracy",
        validation_fraction=0.1,
        n_iter_no_change=3,
        warm_start=False,
        checkpoint=None,
        callbacks=None,
        device="auto",
        num_workers=None,
        n_threads=None,
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.crop_mode = crop_mode
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.backbone_lr_scale = backbone_lr_scale
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup = warmup
        self.freeze = freeze
        self.unfreeze_schedule = unfreeze_schedule
        self.batchnorm = batchnorm
        self.augment = augment
        self.frozen_cache = frozen_cache
        self.tta = tta
        self.class_weight = class_weight
        self.regularization = regularization
        self.alpha = alpha
        self.beta = beta
        self.head_init = head_init
        self.average_epochs = average_epochs
        self.domain_adaptation = domain_adaptation
        self.adaptation_strength = adaptation_strength
        self.early_stopping = early_stopping
        self.scoring = scoring
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.warm_start = warm_start
        self.checkpoint = checkpoint
        self.callbacks = callbacks
        self.device = device
        self.num_workers = num_workers
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    def fit(self, X, y, sample_domain=None):
        """Fine-tune the network on images ``X`` with labels ``y``.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        y : array-like of shape (n_samples,)
            Class labels: strings, ints, anything ``LabelEncoder`` accepts.
            With ``sample_domain``, -1 for every target image (skada's mask),
            and a class label for every source image; only then is -1 not a
            class.
        sample_domain : array-like of shape (n_samples,), optional
            Non-zero integers: positive for labelled source images, negative
            for unlabelled target images (skada's convention). The classes
            are those of the source images. See "Source and target domains"
            in the class description.

        Returns
        -------
        self : FineTuneClassifier
            The fitted classifier.

        Notes
        -----
        Parameters, ``checkpoint``, ``y`` and ``sample_domain`` are checked
        before any image is decoded. A fit that fails or is interrupted (an
        unreadable image, ``KeyboardInterrupt``) changes no fitted attribute:
        the classifier stays as its last successful fit left it, or unfitted.
        Its decoding threads and any file of the frozen stages' outputs are
        gone by then.

        Under ``torchrun`` (or in a process group of several processes),
        every process calls ``fit`` with the same images, labels and
        ``sample_domain``; see "Training across processes" in the class
        description.
        """
        if self.domain_adaptation is not None:
            # Before scikit-learn's fit context, which would undo the metadata routing that
            # importing skada turns on (and a later ``import skada`` would not turn it on again).
            require_skada()
        with torch_threads(self.n_threads):
            return self._fit(X, y, sample_domain)

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit(self, X, y, sample_domain):
        checkpoint = self._check_checkpoint()
        self._check_regularization()
        user_callbacks = self._check_callbacks()
        folder = self._trunk_folder()
        images = as_image_list(X)
        domains = self._check_sample_domain(sample_domain, len(images))
        rows = np.arange(len(images)) if domains is None else np.flatnonzero(domains > 0)
        labels, classes = self._check_y(y, len(images), None if domains is None else rows)
        device = resolve_device(self.device)
        rank, world, device = join_process_group(device, self.device) or (0, 1, device)
        if self.batch_size < 2 * world:
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch, split over {world} "
                f"processes, and each piece needs at least 2 images (BatchNorm): pass "
                f"batch_size >= {2 * world}.")
        warm = self.warm_start and hasattr(self, "model_")
        if warm and not np.array_equal(classes, self.classes_):
            raise ValueError(
                f"warm_start=True continues a fit with classes {self.classes_.tolist()}, but y "
                f"has classes {classes.tolist()}. Pass the same classes, or warm_start=False.")
        key, resume, seeds = self._start(checkpoint, images, labels, domains, warm, rank,
                                         world)
        init_seed, loop_seed, split_seed, shuffle_seed = seeds
        if warm:  # the same pretrained network anchors the regularisers
            init_seed = self._init_seed

        backbone = resolve_backbone(self.backbone, self.weights, image_size=self.image_size,
                                    mean=self.mean, std=self.std,
                                    crop_mode=self.crop_mode, random_state=init_seed)
        if backbone.classifier is None:
            raise _no_classifier(self.backbone)
        model = self._build_network(backbone, len(classes), init_seed, warm)
        train_idx, valid_idx = self._split(labels, split_seed, rows)
        generator = torch.Generator().manual_seed(shuffle_seed)
        shard = None if world == 1 else (rank, world)
        train, valid = self._batches(images, labels, train_idx, valid_idx,
                                     backbone.preprocessing, generator, folder, shard)
        target, target_eval = self._target_batches(images, labels, domains,
                                                   backbone.preprocessing, shuffle_seed, folder,
                                                   shard, len(train))
        if world > 1 and not len(train):
            raise ValueError(
                f"{len(train_idx)} training images make no batch for {world} processes, "
                "whose pieces of a batch need at least 2 images each. Add images, or train "
                "in fewer processes.")
        if target is not None and not len(target):
            n_target = len(target.indices)
            raise ValueError(
                f"sample_domain marks {n_target} target image{'s' * (n_target != 1)}, too few "
                f"for a target batch: domain adaptation needs at least {2 * world}"
                f"{' (2 per process)' if world > 1 else ''}, for the statistics of the "
                "alignment loss. Add target images.")
        try:
            state = self.init_state(
                model, backbone.classifier, backbone.model, backbone.stages, device=device,
                generator=generator, steps_per_epoch=len(train),
                class_weight=self._class_weights(classes, labels[train_idx], device),
                domain_classifier=self._domain_classifier(model, backbone.classifier,
                                                          init_seed))
            state.rank, state.world = rank, world
            state.target_batches, state.target_eval = target, target_eval
            # With several processes rank 0 alone probes the whole split: building the
            # DistributedDataParallel wrapper, before the first step, broadcasts its head.
            if self.head_init == "linear_probe" and not warm and resume is None and rank == 0:
                features = (self._trunk_features(state, train) if state.reuse_trunk
                            else self._frozen_features(images, train_idx, init_seed))
                self._probe_head(state.head, features, classes[labels[train_idx]])
            state.callbacks = self._make_callbacks(user_callbacks, checkpoint, key, seeds, rank)
            self._train(state, train, valid, loop_seed, resume)
        finally:  # also when training fails: no trunk file or kept images outlive the fit
            for batches in (train, valid, target, target_eval):
                if batches is not None:
                    batches.close()
        self._set_fitted(model, classes, backbone, init_seed, state, warm)
        return self

    def _start(self, checkpoint: Path | None, images, labels: np.ndarray,
               domains: np.ndarray | None, warm: bool, rank: int,
               world: int) -> tuple[str | None, dict | None, list[int]]:
        """This fit's checkpoint key, the checkpoint to resume from, and its four seeds.

        With several processes, rank 0 decides (it alone fingerprints the
        images for the key, and draws the seeds from ``random_state``) and
        tells the others, which read the same checkpoint file; then every rank
        checks that all fit the same thing. Every rank raises the same error,
        so that none waits for the others in vain.
        """
        key, resume, seeds, failure = None, None, None, None
        if rank == 0:
            try:
                key, resume = self._find_checkpoint(checkpoint, images, labels, domains, warm)
            except ValueError as exc:  # a damaged checkpoint, say
                if world == 1:
                    raise
                failure = exc
            seeds = resume["seeds"] if resume is not None else [
                int(s) for s in check_random_state(self.random_state).randint(0, 2**31 - 1,
                                                                              size=4)]
        if world == 1:
            return key, resume, seeds
        key, seeds, epoch, failure = broadcast(
            (key, seeds, None if resume is None else resume["epoch"], failure))
        if failure is not None:
            raise failure
        found = None
        if rank != 0 and epoch is not None:
            try:
                resume = read_checkpoint(checkpoint)
                found = None if resume is None or resume["key"] != key else resume["epoch"]
            except ValueError as exc:
                found = str(exc)
        elif resume is not None:
            found = resume["epoch"]
        mine = {"number of images": len(images),
                "labels": _digest(labels),
                "sample_domain": None if domains is None else _digest(domains),
                "warm_start network": fingerprint_module(self.model_) if warm else None,
                "checkpoint epoch": found}
        every = all_gather(mine)
        differ = [name for name in mine if len({repr(seen[name]) for seen in every}) > 1]
        if differ:
            seen = ", ".join(f"rank {r}: {row[differ[0]]!r}" for r, row in enumerate(every))
            raise ValueError(
                f"The {world} processes training together differ in their {differ[0]} "
                f"({seen}). Every process must call fit with the same images, labels and "
                "sample_domain, and see the same checkpoint file: put it on a filesystem they "
                "share.")
        return key, resume, seeds

    def _build_network(self, backbone: Backbone, n_classes: int, seed: int,
                       warm: bool) -> nn.Module:
        """The network to train: the pretrained one with a new head, or the fitted one."""
        if warm:
            return copy.deepcopy(self.model_)
        model = copy.deepcopy(backbone.model)
        old = model.get_submodule(backbone.classifier)
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"The classifier {backbone.classifier!r} of {backbone.name} is a "
                f"{type(old).__name__}, not an nn.Linear, so FineTuneClassifier cannot give it "
                "a new head. Fine-tune a backbone with a linear classifier, or pass an "
                "nn.Module whose last nn.Linear is its classifier.")
        in_features = old.in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = nn.Linear(in_features, n_classes)
        model.set_submodule(backbone.classifier, head)
        return model

    def _batches(self, images, labels, train_idx, valid_idx, config, generator, folder, shard):
        workers = resolve_num_workers(self.num_workers)
        store = {"store": self.frozen_cache or "auto", "folder": folder, "shard": shard}
        train = ImageBatches(images, labels, train_idx, config, self.batch_size,
                             augment=self.augment, shuffle=True, num_workers=workers,
                             generator=generator, max_epochs=self.max_iter, **store)
        valid = None if valid_idx is None else ImageBatches(
            images, labels, valid_idx, config, self.batch_size, num_workers=workers, **store)
        return train, valid

    def _target_batches(self, images, labels, domains, config, seed: int, folder, shard,
                        steps: int) -> tuple[ImageBatches | None, ImageBatches | None]:
        """Shuffled target batches for the alignment loss, and every target image in order
        for ``target_entropy``; each None where nothing needs it.

        The target batches draw their order and augmentation from a generator
        of their own, derived from ``seed``: the source batches are those of
        a fit without domain adaptation.
        """
        rows = np.zeros(0, dtype=np.int64) if domains is None else np.flatnonzero(domains < 0)
        if not len(rows):
            return None, None
        workers = resolve_num_workers(self.num_workers)
        store = {"store": self.frozen_cache or "auto", "folder": folder, "shard": shard}
        target = None
        if self.domain_adaptation is not None:
            generator = torch.Generator().manual_seed(_derived_seed(seed, 1))
            target = ImageBatches(images, labels, rows, config, self.batch_size,
                                  augment=self.augment, shuffle=True, num_workers=workers,
                                  generator=generator, max_epochs=self.max_iter, **store)
            if len(target):  # the passes over the target images in the fit, for the trunk store
                target.max_epochs = self.max_iter * -(-steps // len(target))
        scored = None if not self.early_stopping else ImageBatches(
            images, labels, rows, config, self.batch_size, num_workers=workers, **store)
        return target, scored

    def _domain_classifier(self, model: nn.Module, head: str, seed: int) -> nn.Module | None:
        """DANN's domain classifier on the head's input, from a seed of its own; else None."""
        if self.domain_adaptation != "dann":
            return None
        return make_domain_classifier(model.get_submodule(head).in_features,
                                      _derived_seed(seed, 2))

    def _check_callbacks(self) -> list[Callback]:
        callbacks = list(self.callbacks or ())
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks holds {callback!r}, a {type(callback).__name__}; "
                                "pass instances of skt.training.Callback subclasses.")
        return callbacks

    def _make_callbacks(self, user: list[Callback], checkpoint: Path | None, key: str | None,
                        seeds: list[int], rank: int) -> list[Callback]:
        """Built-in callbacks first (progress, weight average, early stopping), then the
        user's, the checkpoint last.

        The checkpoint then saves what every other callback did in the epoch.
        With several processes, only rank 0 shows progress and writes the
        checkpoint; the other callbacks run on every rank, where they see the
        same weights and scores.
        """
        callbacks: list[Callback] = []
        if self.verbose and rank == 0:
            callbacks.append(ProgressBar())
        if self.average_epochs is not None:
            callbacks.append(WeightAverage(epochs=self.average_epochs))
        if self.early_stopping:  # after the average: the best epoch's weights win
            monitor, lower_is_better = _MONITORS[self.scoring]
            callbacks.append(EarlyStopping(patience=self.n_iter_no_change, monitor=monitor,
                                           lower_is_better=lower_is_better))
        callbacks += [copy.deepcopy(callback) for callback in user]
        if key is not None and rank == 0:
            callbacks.append(Checkpoint(checkpoint, key=key, seeds=seeds))
        return callbacks

    def _train(self, state: TrainingState, train, valid, seed: int, resume: dict | None) -> None:
        """Run the loop with seeded random numbers; leave the network as a plain module."""
        model = state.model
        momenta = {m: m.momentum for m in model.modules() if isinstance(m, _BatchNorm)}
        cuda = [state.device.index or 0] if state.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                if resume is not None:
                    load_checkpoint(state, resume)
                self.fit_loop(state, train, valid)
        finally:
            for module, momentum in momenta.items():
                module.momentum = momentum
            model.requires_grad_(True)

    def _check_sample_domain(self, sample_domain, n_images: int) -> np.ndarray | None:
        """``sample_domain`` checked against what the parameters need.

        None without ``sample_domain``. Target images are needed by domain
        adaptation and by early stopping on ``target_entropy``; otherwise a
        fit on source images alone may have none.
        """
        entropy = self.early_stopping and self.scoring == "target_entropy"
        if sample_domain is None:
            if self.domain_adaptation is not None:
                raise ValueError(
                    f"domain_adaptation={self.domain_adaptation!r} aligns source and target "
                    f"images, but fit got no sample_domain. Pass sample_domain ({_DOMAINS}), "
                    "or domain_adaptation=None.")
            if entropy:
                raise ValueError(
                    "scoring='target_entropy' scores predictions on target images, but fit "
                    f"got no sample_domain. Pass sample_domain ({_DOMAINS}), or another "
                    "scoring.")
            return None
        domains = _check_domains(sample_domain, n_images)
        if not (domains > 0).any():
            raise ValueError(
                "sample_domain marks no source image (none is positive); the classifier learns "
                "from labelled source images. Give them a positive domain, e.g. 1, and the "
                "unlabelled target images a negative one, e.g. -2.")
        if (self.domain_adaptation is not None or entropy) and not (domains < 0).any():
            need = ("domain_adaptation=" + repr(self.domain_adaptation)
                    if self.domain_adaptation is not None else "scoring='target_entropy'")
            raise ValueError(
                f"sample_domain marks no target image (none is negative), which {need} "
                "needs. Give the unlabelled target images a negative domain, e.g. -2 (with "
                "y = -1), or fit without it.")
        return domains

    def _check_y(self, y, n_images: int,
                 source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``y`` encoded as 0..n_classes-1, and the classes; every error names ``y``.

        scikit-learn's own checks decide what is a label vector; their
        messages are kept, after a sentence saying what ``y`` should be.
        With ``source`` (the positions of the source images), every other
        label must be skada's mask, -1; the classes are those of the source
        images, and the other positions are encoded as -1.
        """
        if y is None:
            raise ValueError("FineTuneClassifier.fit needs y, one class label per image.")
        try:
            labels = column_or_1d(y, warn=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"y must be one class label per image, as a list or a 1-D array "
                             f"({exc})") from exc
        if len(labels) != n_images:
            raise ValueError(f"X has {n_images} images but y has {len(labels)} labels; pass one "
                             "label per image.")
        given = labels if isinstance(y, np.ndarray) else np.asarray(y, dtype=object).ravel()
        if source is not None:
            _check_masks(given, source)
            labels, given = labels[source], given[source]
        _check_label_values(given)
        try:
            check_classification_targets(labels)
        except ValueError as exc:
            try:
                kind = repr(type_of_target(labels))
            except ValueError:  # what made the check fail can make this fail too
                kind = "unusable"
            raise ValueError(f"y must hold class labels, but scikit-learn reads it as "
                             f"{kind} values ({exc}) For a regression "
                             "target, fit a regressor on FeatureExtractor features; for "
                             "whole numbers stored as floats, pass y.astype(int).") from exc
        encoder = LabelEncoder().fit(labels)
        if len(encoder.classes_) < 2:
            raise ValueError(f"y has a single class ({encoder.classes_[0].item()!r}); a classifier "
                             "needs images of at least two classes.")
        if source is None:
            return encoder.transform(labels), encoder.classes_
        encoded = np.full(n_images, -1, dtype=np.int64)
        encoded[source] = encoder.transform(labels)
        return encoded, encoder.classes_

    def _check_regularization(self) -> None:
        if self.regularization == "lwf" and self.alpha is not None and self.alpha > 1:
            raise ValueError(f"alpha={self.alpha} with regularization='lwf': the loss is "
                             "alpha * L_source + (1 - alpha) * L_target, so alpha must be "
                             "in [0, 1].")

    def _split(self, labels: np.ndarray, seed: int,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Training and validation positions among ``rows`` (the source images)."""
        if not self.early_stopping:
            return rows, None
        try:
            train, valid = train_test_split(rows, test_size=self.validation_fraction,
                                            stratify=labels[rows], random_state=seed)
        except ValueError as exc:
            raise ValueError(
                f"early_stopping=True holds out validation_fraction={self.validation_fraction} "
                f"of the {len(rows)} {'source ' if len(rows) < len(labels) else ''}images, "
                f"stratified by class, which failed: {exc} Raise validation_fraction, add "
                "images, or set early_stopping=False.") from exc
        return np.sort(train), np.sort(valid)

    def _frozen_features(self, images, indices, seed: int) -> np.ndarray:
        """Penultimate features of the pretrained network (:class:`skt.FeatureExtractor`)."""
        extractor = FeatureExtractor(
            self.backbone, self.weights, image_size=self.image_size, mean=self.mean,
            std=self.std, crop_mode=self.crop_mode, batch_size=self.batch_size,
            device=self.device,
            num_workers=self.num_workers, random_state=seed)
        subset = [images[i] for i in indices]
        return extractor.fit(subset).transform(subset)

    def _trunk_features(self, state: TrainingState, train: ImageBatches) -> np.ndarray:
        """Penultimate features of the training images from the frozen trunk's outputs.

        The outputs are kept, so this costs the first epoch nothing; only
        the stages after the trunk run once more, in eval mode.
        """
        train.use_trunk(state.trunk, state.device)
        state.model.eval()
        remove = record_head_input(state)
        rows = []
        try:
            with torch.no_grad():
                for features, _ in train.unaugmented():
                    state.trunk.rest(features.to(state.device), training=False)
                    rows.append(state.penultimate.flatten(1).float().cpu())
        finally:
            remove()
        return torch.cat(rows).numpy()

    def _probe_head(self, head: nn.Linear, features: np.ndarray, y: np.ndarray) -> None:
        """LP-FT: start the head from a logistic regression on frozen features."""
        probe = LogisticRegression(max_iter=1000, class_weight=self.class_weight)
        probe.fit(features, y)
        coef, intercept = probe.coef_, probe.intercept_
        if coef.shape[0] == 1:  # binary: logit(b) - logit(a) = w.x + c
            coef = np.concatenate([-coef, coef]) / 2
            intercept = np.concatenate([-intercept, intercept]) / 2
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(intercept, dtype=head.bias.dtype))

    def _class_weights(self, classes: np.ndarray, train_labels: np.ndarray,
                       device: torch.device) -> torch.Tensor | None:
        if self.class_weight is None:
            return None
        weights = compute_class_weight(self.class_weight, classes=classes,
                                       y=classes[train_labels])
        return torch.as_tensor(weights, dtype=torch.float32, device=device)

    def _checkpoint_key(self, images, labels: np.ndarray, domains: np.ndarray | None,
                        start: nn.Module | None) -> str:
        params = {name: _describe_param(value)
                  for name, value in self.get_params(deep=False).items()
                  if name not in _RUNTIME_PARAMS}
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps(params, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        if domains is not None:  # another split into source and target is another fit
            digest.update(b"sample_domain")
            digest.update(np.ascontiguousarray(domains, dtype=np.int64).tobytes())
        for i in range(len(images)):
            digest.update(fingerprint(images[i]).encode())
        if start is not None:
            digest.update(fingerprint_module(start).encode())
        return digest.hexdigest()

    def _check_checkpoint(self) -> Path | None:
        """The ``checkpoint`` file, ``~`` expanded; refused now if it could never be written.

        Otherwise a folder, or a path under a file, would fail only when the
        first epoch ends.
        """
        if self.checkpoint is None:
            return None
        path = expand_path(self.checkpoint)
        if path.is_dir():
            raise ValueError(f"checkpoint={str(path)!r} is a folder; pass the path of a file "
                             f"in it, e.g. checkpoint={str(path / 'fit.ckpt')!r}.")
        if path.exists() and not path.is_file():
            raise ValueError(f"checkpoint={str(path)!r} exists and is not a regular file (a "
                             "device, a pipe or a socket); choose another path.")
        folder = path.parent
        while not folder.exists():  # missing folders are created when the file is written
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"checkpoint={str(path)!r} cannot be written: {str(folder)!r} is "
                             "a file, not a folder. Choose another path.")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise ValueError(f"checkpoint={str(path)!r} cannot be written: the folder "
                             f"{str(folder)!r} is not writable ({exc.strerror or exc}). Choose "
                             "a path in a folder you can write to.") from exc
        return path

    def _trunk_folder(self) -> Path | None:
        """skt's cache folder, where frozen stages' outputs too large for memory go.

        Checked now with ``frozen_cache="disk"``, which insists on a file.
        """
        if self.frozen_cache not in ("auto", "disk"):
            return None
        folder = default_cache_dir()
        if self.frozen_cache != "disk":
            return folder
        advice = ("Set SKT_CACHE_DIR to a writable folder, or use frozen_cache='auto' or "
                  "'memory'.")
        if folder is None:  # skt.cache has warned, naming the folder
            raise ValueError("frozen_cache='disk' keeps the output of the frozen stages in a "
                             "file in skt's cache folder ($SKT_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/skt or ~/.cache/skt), which cannot be written. "
                             f"{advice}")
        try:
            TrunkStore.check_folder(folder)
        except OSError as exc:
            raise ValueError(f"frozen_cache='disk' keeps the output of the frozen stages in a "
                             f"file in skt's cache folder: {exc.strerror} {advice}") from exc
        return folder

    def _find_checkpoint(self, path: Path | None, images, labels, domains,
                         warm: bool) -> tuple[str | None, dict | None]:
        """This fit's checkpoint key, and the checkpoint to resume from if there is one."""
        if path is None:
            return None, None
        key = self._checkpoint_key(images, labels, domains, self.model_ if warm else None)
        payload = read_checkpoint(path)
        if payload is None or payload["key"] == key:
            return key, payload
        warnings.warn(
            f"checkpoint={str(path)!r} was written by a fit with other "
            "parameters, images, labels or domains; it will be overwritten by this fit.",
            UserWarning, stacklevel=3)
        return key, None

    def _set_fitted(self, model, classes, backbone: Backbone, init_seed, state, warm) -> None:
        model.eval()
        model.to(device="cpu", memory_format=torch.contiguous_format)
        previous = self.n_iter_ if warm else 0
        history = [{**row, "epoch": previous + row["epoch"]} for row in state.history]
        self.model_ = model
        self.classes_ = classes
        self.preprocessing_ = backbone.preprocessing
        self.weights_ = backbone.weights
        self.history_ = (list(self.history_) if warm else []) + history
        self.n_iter_ = len(self.history_)
        self.loss_curve_ = [row["train_loss"] for row in self.history_]
        stopper = next((c for c in state.callbacks if isinstance(c, EarlyStopping)), None)
        if self.early_stopping and stopper is not None:
            self.validation_scores_ = [row[stopper.monitor] for row in self.history_
                                       if row.get(stopper.monitor) is not None]
            self.best_validation_score_ = stopper.best_score
            self.best_iteration_ = (None if stopper.best_epoch is None
                                    else previous + stopper.best_epoch)
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
            self.best_iteration_ = None
        self.world_size_ = state.world
        self._classifier = backbone.classifier
        self._init_seed = init_seed
        self._runtime = None

    # ------------------------------------------------------------- predict

    def _run(self, X, kind: str) -> np.ndarray:
        """Logits (``"logits"``) or penultimate features (``"features"``) of ``X``.

        The same path as :meth:`skt.FeatureExtractor.transform`: the network
        truncated at the classifier's output or input, run by the torch
        engine in batches, images decoded in threads. Logits are averaged
        over the views of ``tta``.
        """
        check_is_fitted(self)
        images = as_image_list(X)
        views = [view_of(draw, self.tta) for draw in range(view_count(self.tta))]
        with torch_threads(self.n_threads):
            runtime = self._get_runtime(kind)
            out = np.empty((len(images), runtime.layout[0].width), dtype=np.float32)
            return extract_into(out, images, runtime, "avg", batch_size=self.batch_size,
                                num_workers=resolve_num_workers(self.num_workers),
                                views=views if kind == "logits" else (0,))

    def _get_runtime(self, kind: str) -> FeatureRuntime:
        """The runtime for ``kind`` in this process (rebuilt after unpickling)."""
        if self._runtime is None:
            self._runtime = {}
        if kind not in self._runtime:
            layer = self._classifier if kind == "logits" else PRE_LOGITS
            self._runtime[kind] = FeatureRuntime(
                self.model_, self._classifier, self.preprocessing_, [layer], "avg",
                device=resolve_device(self.device, fallback=True), engine="torch")
        return self._runtime[kind]

    def decision_function(self, X, sample_domain=None):
        """Confidence scores per class: the network's logits.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        sample_domain : array-like of shape (n_samples,), default=None
            Ignored: the fitted network treats images of every domain alike.
            Accepted because skada's scorers pass it.

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes), dtype float32
            For two classes, the logit of ``classes_[1]`` minus that of
            ``classes_[0]``, positive where ``classes_[1]`` is predicted;
            otherwise one column per class of ``classes_``.
        """
        logits = self._run(X, "logits")
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X, sample_domain=None):
        """Class probabilities: the softmax of the logits.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        sample_domain : array-like of shape (n_samples,), default=None
            Ignored: the fitted network treats images of every domain alike.
            Accepted because skada's scorers pass it.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes), dtype float64
            Columns in the order of ``classes_``; each row sums to 1.
        """
        logits = self._run(X, "logits").astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X, sample_domain=None):
        """Logarithm of the class probabilities.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        sample_domain : array-like of shape (n_samples,), default=None
            Ignored: the fitted network treats images of every domain alike.
            Accepted because skada's scorers pass it.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes), dtype float64
            ``log(predict_proba(X))``, columns in the order of ``classes_``.
        """
        return np.log(self.predict_proba(X))

    def predict(self, X, sample_domain=None):
        """The most probable class of each image.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        sample_domain : array-like of shape (n_samples,), default=None
            Ignored: the fitted network treats images of every domain alike.
            Accepted because skada's scorers pass it.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Labels from ``classes_`` (strings stay strings), never indices.
        """
        logits = self._run(X, "logits")
        return self.classes_[np.argmax(logits, axis=1)]

    def transform(self, X):
        """Penultimate features of the fine-tuned network (the classifier's input).

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features), dtype float32
            Row ``i`` holds the features of image ``i``, ready for another head.
        """
        return self._run(X, "features")

    def get_feature_names_out(self, input_features=None):
        """Get output feature names for transformation.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Ignored: images have no input feature names. Accepted so that
            ``Pipeline`` and ``ColumnTransformer`` can ask every step alike.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``pre_logits_<i>`` for each column of :meth:`transform`.
        """
        check_is_fitted(self)
        layout = self._get_runtime("features").layout[0]
        return np.asarray(layout.feature_names("avg"), dtype=object)
