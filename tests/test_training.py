"""skt.training: the loop's parts on their own, and callbacks through FineTuneClassifier.

Estimator-level behaviour (what freezing, regularisers or schedules do to a
fit) is in test_finetune.py, whose tiny network and images these tests share.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.base import clone
from torch import nn

from skt.backbones import list_stages
from skt.finetune import FineTuneClassifier
from skt.images import Preprocessing, as_image_list
from skt.training import (
    CHECKPOINT_FORMAT,
    Callback,
    EarlyStopping,
    FreezePlan,
    ImageBatches,
    ProgressBar,
    TrainingLoop,
    TrainingState,
    WarmupSchedule,
    backbone_parameters,
    distillation_loss,
    l2sp_penalty,
    load_checkpoint,
    make_freeze_plan,
    make_optimizer,
    make_scheduler,
    read_checkpoint,
    record_head_input,
    save_checkpoint,
)

from .test_finetune import (
    SIZE,
    Crash,
    Scripted,
    make_clf,
    make_images,
    tiny_net,
    weights_of,
)

TINY_STAGES = (("0",), ("1",), ("3",), ("4",))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_images()


def make_state(model: nn.Module | None = None, **fields) -> TrainingState:
    """A state around ``tiny_net`` (classifier "8"), SGD with momentum, a warm-up schedule."""
    model = tiny_net(outputs=2) if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(10, 2, "cosine"))
    return TrainingState(model=model, head_name="8", optimizer=optimizer, scheduler=scheduler,
                         device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                         **fields)


class Loop(TrainingLoop):
    """The loop's steps without an estimator: hyper-parameters default to FineTuneClassifier's."""

    def __init__(self, regularization="none", **params):
        defaults = FineTuneClassifier().get_params()
        assert set(params) <= set(defaults), set(params) - set(defaults)
        vars(self).update({**defaults, "regularization": regularization, **params})


# ------------------------------------------------------------ state, init_state


def test_state_head_is_the_model_submodule_of_that_name():
    net = tiny_net(outputs=2)
    state = make_state(net)
    assert state.head is net[8]
    net[8] = nn.Linear(16, 3)  # replaced, e.g. by a new classifier: the state follows
    assert state.head is net[8] and state.head.out_features == 3
    assert [name for name, _ in state.backbone_parameters()] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"]


def test_init_state_builds_what_the_hyper_parameters_say():
    pretrained = tiny_net()
    with torch.no_grad():
        pretrained[1].running_var.fill_(2.0)  # "1" came with statistics; "4" as initialised
    model = tiny_net()
    model[8] = nn.Linear(16, 2)
    loop = Loop("l2sp", freeze=1, max_iter=2, learning_rate_init=0.1, backbone_lr_scale=0.5,
                lr_schedule="constant", warmup=0.25)
    generator = torch.Generator()
    state = loop.init_state(model, "8", pretrained, TINY_STAGES, device=torch.device("cpu"),
                            generator=generator, steps_per_epoch=4,
                            class_weight=torch.tensor([1.0, 2.0]))
    assert state.model is model and state.head is model[8] and state.generator is generator
    assert state.freeze == FreezePlan(stages=TINY_STAGES, n_frozen=1)
    assert state.fixed_statistics == frozenset({"1"})
    assert state.class_weight.tolist() == [1.0, 2.0]
    names = {id(p): name for name, p in model.named_parameters()}
    # Stage "0" never trains: not in the optimiser. L2-SP replaces weight decay.
    assert [(g["initial_lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
            for g in state.optimizer.param_groups] == [
        (0.1, 0.0, ["8.weight"]), (0.1, 0.0, ["8.bias"]), (0.05, 0.0, ["3.weight"]),
        (0.05, 0.0, ["1.weight", "1.bias", "3.bias", "4.weight", "4.bias"])]
    # 2 epochs of 4 steps, a quarter of them warming up.
    assert vars(state.scheduler.lr_lambdas[0]) == {"total_steps": 8, "warmup_steps": 2,
                                                    "decay": "constant"}
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    reference = dict(pretrained.named_parameters())
    assert sorted(state.anchor) == sorted(name for name, _ in state.backbone_parameters())
    assert all(torch.equal(value, reference[name]) for name, value in state.anchor.items())
    assert state.source is None and state.source_head is None


def test_init_state_for_learning_without_forgetting():
    pretrained = tiny_net()
    model = tiny_net()
    model[8] = nn.Linear(16, 2)
    state = Loop("lwf", freeze="all", learning_rate_init=1e-3).init_state(
        model, "8", pretrained, TINY_STAGES, device=torch.device("cpu"),
        generator=torch.Generator(), steps_per_epoch=4)
    # The teacher: a frozen eval-mode copy of the original network.
    assert state.source is not pretrained and not state.source.training
    assert not any(p.requires_grad for p in state.source.parameters())
    assert all(torch.equal(a, b) for a, b in zip(state.source.state_dict().values(),
                                                 pretrained.state_dict().values(), strict=True))
    # The source head trains (at the backbone's rate), from a copy of the original classifier.
    assert state.source_head is not pretrained[8] and state.source_head.out_features == 5
    assert torch.equal(state.source_head.weight, pretrained[8].weight)
    names = {id(p): name for name, p in model.named_parameters()}
    names.update({id(p): f"source.{name}" for name, p in state.source_head.named_parameters()})
    assert [(g["initial_lr"], [names[id(p)] for p in g["params"]])
            for g in state.optimizer.param_groups] == [
        (1e-3, ["8.weight"]), (1e-3, ["8.bias"]), (1e-4, ["source.weight"]),
        (1e-4, ["source.bias"])]
    assert state.anchor == {}


# ------------------------------------------------------------------ freezing


def test_freeze_plan_by_stage_count_and_gradual_unfreezing():
    plan = FreezePlan(stages=(("0", "1"), ("3", "4")), n_frozen=2, unfreeze_every=2)
    assert [plan.frozen_stages(epoch) for epoch in range(6)] == [2, 2, 1, 1, 0, 0]
    assert plan.is_frozen("1.weight", 3) and not plan.is_frozen("3.weight", 3)
    assert not plan.is_frozen("10.weight", 0)  # "1" is a module name, not a string prefix
    # What the optimiser must hold: parameters that train in some epoch of the fit.
    assert plan.ever_trained("0.weight", 5) and not plan.ever_trained("0.weight", 4)
    assert FreezePlan(stages=TINY_STAGES, n_frozen=3).frozen_stages(100) == 3


def test_make_freeze_plan_counts_declared_stages_and_reads_patterns():
    net = tiny_net()
    assert list_stages(net) == list(TINY_STAGES)
    assert make_freeze_plan("all", 2, net, "8", TINY_STAGES) == FreezePlan(
        stages=TINY_STAGES, n_frozen=4, unfreeze_every=2)
    assert make_freeze_plan(None, None, net, "8", TINY_STAGES).n_frozen == 0
    plan = make_freeze_plan(["3", "*.bias"], None, net, "8", TINY_STAGES)
    assert plan == FreezePlan(patterns=("3", "*.bias"))
    frozen = [name for name, _ in backbone_parameters(net, "8") if plan.is_frozen(name, 0)]
    assert frozen == ["0.bias", "1.bias", "3.weight", "3.bias", "4.bias"]
    assert make_freeze_plan("4", None, net, "8", TINY_STAGES).patterns == ("4",)


HINT = ("Patterns are fnmatch patterns over names from model.named_parameters() (the new "
        "classifier excluded); a module name freezes everything inside it.")


@pytest.mark.parametrize(("freeze", "unfreeze", "error", "message"), [
    (5, None, ValueError, "freeze=5, but this backbone has 4 stages: ['0', '1', '3', '4']. "
                          "Pass at most 4, or 'all'."),
    (None, 1, ValueError, "unfreeze_schedule=1 has nothing to unfreeze: freeze is None. "
                          "Set freeze to a stage count or 'all'."),
    (["0"], 1, ValueError, "unfreeze_schedule unfreezes stages, so freeze must be a stage "
                           "count or 'all', not the patterns ['0']."),
    ("3.weights", None, ValueError,
     "freeze pattern '3.weights' matches no backbone parameter. Close matches: "
     f"['3.weight', '4.weight', '1.weight', '0.weight', '3.bias']. {HINT}"),
    ("8", None, ValueError,  # the new classifier is not the backbone's to freeze
     f"freeze pattern '8' matches no backbone parameter. {HINT}"),
    ([3], None, TypeError, "freeze patterns must be strings; got 3."),
])
def test_make_freeze_plan_errors(freeze, unfreeze, error, message):
    with pytest.raises(error) as info:
        make_freeze_plan(freeze, unfreeze, tiny_net(), "8", TINY_STAGES)
    assert str(info.value) == message


# ------------------------------------------------------ optimiser, schedules


def test_make_optimizer_groups_decay_and_learning_rates():
    net = tiny_net(outputs=2)
    names = {id(p): name for name, p in net.named_parameters()}
    backbone = [p for _, p in backbone_parameters(net, "8")]
    optimizer = make_optimizer(list(net[8].parameters()), backbone, kind="adamw",
                               learning_rate=0.1, backbone_lr_scale=0.5, weight_decay=0.3)
    assert type(optimizer) is torch.optim.AdamW
    groups = [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
              for g in optimizer.param_groups]
    assert groups == [
        (0.1, 0.3, ["8.weight"]),                       # head matrix: decayed
        (0.1, 0.0, ["8.bias"]),                         # head bias: not decayed
        (0.05, 0.3, ["0.weight", "3.weight"]),          # backbone kernels
        (0.05, 0.0, ["0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"]),
    ]
    # Nothing of the backbone trains (a linear probe): its groups are left out.
    sgd = make_optimizer(list(net[8].parameters()), [], kind="sgd", learning_rate=0.05,
                         backbone_lr_scale=0.1, weight_decay=0.3)
    assert type(sgd) is torch.optim.SGD
    assert [(g["lr"], g["weight_decay"], g["momentum"], g["nesterov"])
            for g in sgd.param_groups] == [(0.05, 0.3, 0.9, True), (0.05, 0.0, 0.9, True)]


def test_warmup_schedule_values():
    cosine = WarmupSchedule(total_steps=10, warmup_steps=2, decay="cosine")
    assert [round(cosine(s), 4) for s in (0, 1, 2, 6, 10, 12)] == [
        0.3333, 0.6667, 1.0, 0.5, 0.0, 0.0]
    assert [WarmupSchedule(10, 3, "constant")(s) for s in (0, 2, 3, 9)] == [0.25, 0.75, 1.0, 1.0]
    assert WarmupSchedule(10, 0, "constant")(7) == 1.0
    assert pickle.loads(pickle.dumps(cosine))(6) == cosine(6)  # schedulers pickle


def learning_rates(optimizer, scheduler, steps: int) -> np.ndarray:
    """The learning rate of each group before each of ``steps`` optimiser steps."""
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def two_group_optimizer() -> torch.optim.Optimizer:
    head, backbone = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    return make_optimizer([head], [backbone], kind="adamw", learning_rate=0.1,
                          backbone_lr_scale=0.5, weight_decay=0.0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_make_scheduler_scales_every_group_by_the_warmup_schedule(schedule):
    optimizer = two_group_optimizer()
    scheduler = make_scheduler(optimizer, 10, schedule=schedule, warmup=0.2)
    rates = learning_rates(optimizer, scheduler, 10)
    factors = [WarmupSchedule(10, 2, schedule)(step) for step in range(10)]
    np.testing.assert_allclose(rates, np.outer(factors, [0.1, 0.05]), rtol=1e-12)
    assert rates[2, 0] == pytest.approx(0.1)  # the peak, after two warm-up steps


def test_make_scheduler_onecycle_rises_to_each_group_peak_then_anneals():
    optimizer = two_group_optimizer()
    rates = learning_rates(optimizer, make_scheduler(optimizer, 10, schedule="onecycle",
                                                     warmup=0.2), 10)
    np.testing.assert_allclose(rates[:, 1], 0.5 * rates[:, 0], rtol=1e-12)
    head = rates[:, 0]
    assert head[0] == pytest.approx(0.1 / 25)  # OneCycleLR starts at max_lr / 25
    peak = int(np.argmax(head))
    assert head[peak] == pytest.approx(0.1) and 1 <= peak <= 2
    assert np.all(np.diff(head[peak:]) < 0) and head[-1] < 1e-3


@pytest.mark.parametrize(("total_steps", "warmup"), [(4, 0.1), (10, 0.0), (5, 0.1)])
def test_make_scheduler_onecycle_with_less_than_one_warmup_step(total_steps, warmup):
    # A short fit: round(warmup * total_steps) is 0 steps of warm-up.
    optimizer = two_group_optimizer()
    scheduler = make_scheduler(optimizer, total_steps, schedule="onecycle", warmup=warmup)
    head = learning_rates(optimizer, scheduler, total_steps)[:, 0]
    assert head.max() == pytest.approx(0.1)
    assert head[-1] < head.max()


# ------------------------------------------------------------ regularisers


def test_l2sp_penalty_value_and_loss():
    net = tiny_net(outputs=2)
    anchor = {name: p.detach() - 1.0 for name, p in backbone_parameters(net, "8")}
    n_backbone = sum(a.numel() for a in anchor.values())
    state = make_state(net, anchor=anchor)
    # Every backbone parameter is 1 away from its anchor: alpha / 2 per element.
    expected = 0.2 / 2 * n_backbone + 0.5 / 2 * net[8].weight.pow(2).sum()
    torch.testing.assert_close(l2sp_penalty(state, 0.2, 0.5), expected)
    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([1])
    loop = Loop("l2sp", alpha=0.2, beta=0.5)
    torch.testing.assert_close(loop.get_loss(state, logits, y, training=True),
                               F.cross_entropy(logits, y) + expected)
    torch.testing.assert_close(loop.get_loss(state, logits, y, training=False),
                               F.cross_entropy(logits, y))
    # alpha=None is DEFAULT_ALPHA["l2sp"], 0.01.
    torch.testing.assert_close(Loop("l2sp", beta=0.5).get_loss(state, logits, y, training=True),
                               F.cross_entropy(logits, y) + l2sp_penalty(state, 0.01, 0.5))
    # Only parameters that train now, and have an anchor, are pulled back.
    net[0].weight.requires_grad_(False)
    del anchor["3.weight"]
    dropped = net[0].weight.numel() + net[3].weight.numel()
    torch.testing.assert_close(l2sp_penalty(state, 0.2, 0.5), expected - 0.1 * dropped)


def test_lwf_distillation_is_zero_for_the_original_network_and_alpha_weights_it():
    model = tiny_net()  # tiny_net() has the same weights every time: the source network
    model[8] = nn.Linear(16, 2)
    state = make_state(model, source=tiny_net().eval(), source_head=tiny_net()[8])
    remove = record_head_input(state)
    model.eval()
    images, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 0, 1])
    logits = model(images)
    assert state.penultimate.shape == (4, 16)
    # The source head on unchanged features reproduces the source outputs exactly.
    assert distillation_loss(state, images).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        state.source_head.weight.mul_(3.0)
    source = distillation_loss(state, images)
    assert source.item() > 1e-3
    assert distillation_loss(state, images, temperature=1.0).item() > source.item()
    torch.testing.assert_close(Loop("lwf", alpha=0.25).get_loss(state, logits, y, images,
                                                                  training=True),
                               0.25 * source + 0.75 * F.cross_entropy(logits, y))
    torch.testing.assert_close(Loop("lwf").get_loss(state, logits, y, images, training=True),
                               0.5 * source + 0.5 * F.cross_entropy(logits, y))
    recorded = state.penultimate
    remove()
    model(torch.randn(2, 3, SIZE, SIZE))
    assert state.penultimate is recorded  # no longer recording


def test_class_weighted_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    state = make_state(class_weight=torch.tensor([1.0, 4.0]))
    # Weighted mean: weights of the targets are 1, 4, 4.
    per_image = F.cross_entropy(logits, target, reduction="none")
    expected = (per_image[0] + 4 * per_image[1] + 4 * per_image[2]) / 9
    torch.testing.assert_close(Loop().get_loss(state, logits, target), expected)
    # The class weights apply out of training too; only the regulariser does not.
    torch.testing.assert_close(Loop("l2sp").get_loss(state, logits, target, training=False),
                               expected)
    assert not torch.isclose(Loop().get_loss(make_state(), logits, target), expected)


# ------------------------------------------------------------------ batches


@pytest.fixture
def png_files(tmp_path):
    """Nine of the tiny images as PNG files, and their integer labels."""
    X, y = make_images(9)
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return as_image_list(paths), (y == "b").astype(int)


CONFIG = Preprocessing(crop_size=SIZE, resize_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)


def epochs(images, labels, n_epochs=2, seed=7, **options) -> list[list[tuple]]:
    batches = ImageBatches(images, labels, range(len(labels)), CONFIG, 4,
                           generator=torch.Generator().manual_seed(seed), **options)
    return [list(batches) for _ in range(n_epochs)]


def test_image_batches_count_and_leave_out_a_final_single_image(png_files):
    images, labels = png_files
    shuffled = ImageBatches(images, labels, range(9), CONFIG, 4, shuffle=True,
                            generator=torch.Generator())
    assert len(shuffled) == 2 and [len(y) for _, y in shuffled] == [4, 4]
    ordered = ImageBatches(images, labels, range(9), CONFIG, 4)
    assert len(ordered) == 3 and [len(y) for _, y in ordered] == [4, 4, 1]
    assert len(ImageBatches(images, labels, range(6), CONFIG, 4, shuffle=True)) == 2


def test_image_batches_do_not_depend_on_decoding_threads(png_files):
    images, labels = png_files
    # Eight images per epoch, batches of 4: two or more workers decode in threads.
    options = dict(augment="standard", shuffle=True)
    inline = epochs(images, labels, num_workers=0, **options)
    threaded = epochs(images, labels, num_workers=2, **options)
    for first, second in zip(inline, threaded, strict=True):
        assert len(first) == len(second) == 2
        for (a, ya), (b, yb) in zip(first, second, strict=True):
            assert a.shape == (4, 3, SIZE, SIZE)
            assert torch.equal(a, b) and torch.equal(ya, yb)
    other_seed = epochs(images, labels, num_workers=2, seed=8, **options)
    assert not torch.equal(inline[0][0][0], other_seed[0][0][0])


def test_image_batches_augment_each_epoch_differently(png_files):
    images, labels = png_files
    clean = torch.cat([x for x, _ in epochs(images, labels, n_epochs=1)[0]])
    views = [torch.cat([x for x, _ in epoch])
             for epoch in epochs(images, labels, augment="flip", num_workers=2)]
    flipped = []
    for view in views:
        assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1))
                   for a, b in zip(view, clean, strict=True))
        flipped.append([not torch.equal(a, b) for a, b in zip(view, clean, strict=True)])
    assert 0 < sum(flipped[0]) < 9 and 0 < sum(flipped[1]) < 9
    assert flipped[0] != flipped[1]
    # Without augmentation every epoch gives the same images (kept in memory).
    again = epochs(images, labels)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(*again, strict=True))


def decode_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name.startswith("skt-decode")]


def test_abandoned_batches_stop_their_decoding_threads(png_files):
    images, labels = png_files
    batches = ImageBatches(images, labels, range(9), CONFIG, 2, augment="flip", shuffle=True,
                           num_workers=2, generator=torch.Generator().manual_seed(0))
    epoch = iter(batches)
    next(epoch)
    assert decode_threads()  # decoding ahead of the consumer
    epoch.close()
    assert decode_threads() == []


class Failing:
    """A stand-in trunk that fails on its second batch, as an interrupted forward pass would."""

    n_frozen = 1

    def __init__(self) -> None:
        self.calls = 0

    def features(self, images):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return images.clone()


def test_a_failing_trunk_stops_the_decoding_threads_even_if_its_error_is_kept(png_files,
                                                                              tmp_path):
    images, labels = png_files
    batches = ImageBatches(images, labels, range(9), CONFIG, 2, shuffle=True, num_workers=2,
                           generator=torch.Generator().manual_seed(0), store="disk",
                           folder=tmp_path / "store")
    batches.use_trunk(Failing(), torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt) as kept:  # the traceback holds the epoch's frames
        list(batches)
    assert kept.traceback and decode_threads() == []
    assert len(os.listdir(tmp_path / "store")) == 1  # the store's file, until close
    batches.close()
    assert os.listdir(tmp_path / "store") == []


def test_close_drops_the_kept_images(png_files):
    images, labels = png_files
    batches = ImageBatches(images, labels, range(9), CONFIG, 4)
    first = torch.cat([x for x, _ in batches])
    assert batches._cached is not None
    batches.close()
    assert batches._cached is None
    assert torch.equal(torch.cat([x for x, _ in batches]), first)  # prepared again


# ------------------------------------------------------------- checkpoints


class Counter(Callback):
    """Counts epochs; the count survives a checkpoint."""

    def __init__(self):
        self.count = 0

    def on_epoch_end(self, estimator, state):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_checkpoint_round_trip(tmp_path):
    state = make_state(source_head=nn.Linear(16, 5),
                       callbacks=[Counter(), ProgressBar(), Counter()])
    state.model(torch.randn(4, 3, SIZE, SIZE)).sum().backward()
    state.optimizer.step()  # momentum buffers to save
    state.scheduler.step()
    torch.randn(3, generator=state.generator)
    state.epoch, state.stopped = 3, True
    state.history = [{"epoch": e, "train_loss": 1.0 / e, "valid_score": None} for e in (1, 2, 3)]
    state.callbacks[0].count, state.callbacks[2].count = 3, 5
    path = tmp_path / "run.ckpt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        save_checkpoint(path, state, key="abc", seeds=[1, 2, 3, 4])
        expected_rng = torch.get_rng_state()
    assert os.listdir(tmp_path) == ["run.ckpt"]  # written atomically: no temporary left

    payload = read_checkpoint(path)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["key"] == "abc" and payload["seeds"] == [1, 2, 3, 4]
    # Callbacks by class name, counted; ProgressBar has no state.
    assert payload["callbacks"] == {"Counter": {"count": 3}, "ProgressBar": {},
                                    "Counter_2": {"count": 5}}

    fresh = make_state(tiny_net(outputs=2, seed=1), source_head=nn.Linear(16, 5),
                       callbacks=[Counter(), Counter(), EarlyStopping()])
    with torch.random.fork_rng(devices=[]):
        load_checkpoint(fresh, payload)
        assert torch.equal(torch.get_rng_state(), expected_rng)
    assert all(torch.equal(v, state.model.state_dict()[k])
               for k, v in fresh.model.state_dict().items())
    assert torch.equal(fresh.source_head.weight, state.source_head.weight)
    buffers = [fresh.optimizer.state[p]["momentum_buffer"] for p in fresh.model.parameters()]
    assert all(torch.equal(b, state.optimizer.state[p]["momentum_buffer"])
               for b, p in zip(buffers, state.model.parameters(), strict=True))
    assert fresh.scheduler.last_epoch == 1
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 3)
    assert torch.equal(fresh.generator.get_state(), state.generator.get_state())
    assert (fresh.epoch, fresh.stopped, fresh.history) == (3, True, state.history)
    # Matched by name: the second Counter is "Counter_2"; EarlyStopping had no entry.
    assert [fresh.callbacks[0].count, fresh.callbacks[1].count] == [3, 5]
    assert fresh.callbacks[2].best_epoch is None


def test_read_checkpoint_of_nothing_garbage_and_other_formats(tmp_path):
    path = tmp_path / "run.ckpt"
    assert read_checkpoint(path) is None
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    assert re.fullmatch(re.escape(f"checkpoint={str(path)!r} exists but cannot be read (")
                        + r".+" + re.escape("). Delete it to start afresh."),
                        str(info.value), flags=re.DOTALL)
    wrong = (f"checkpoint={str(path)!r} is not a FineTuneClassifier checkpoint of this "
             "version. Delete it or choose another path.")
    for payload in ({"format": CHECKPOINT_FORMAT - 1, "epoch": 1}, torch.zeros(2)):
        torch.save(payload, path)
        with pytest.raises(ValueError) as info:
            read_checkpoint(path)
        assert str(info.value) == wrong


def test_checkpoint_file_starts_with_its_format_and_a_checksum_of_the_rest(tmp_path):
    import hashlib

    path = tmp_path / "run.ckpt"
    save_checkpoint(path, make_state(), key="abc", seeds=[1, 2, 3, 4])
    header, _, body = path.read_bytes().partition(b"\n")
    magic, version, algorithm, digest = header.decode().split()
    assert (magic, version, algorithm) == ("skt-checkpoint", str(CHECKPOINT_FORMAT), "blake2b")
    assert digest == hashlib.blake2b(body, digest_size=32).hexdigest()
    assert torch.load(io.BytesIO(body), weights_only=True)["key"] == "abc"


def test_a_damaged_checkpoint_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, make_state(), key="abc", seeds=[1, 2, 3, 4])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the network's weights
    path.write_bytes(bytes(data))
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint={str(path)!r} is damaged: its content does not match the checksum "
        "written with it (a disk or copy error, or an edit). Nothing was loaded from it. "
        "Delete it to start afresh, or choose another path.")
    assert loaded == []


def test_checkpoints_of_other_formats_and_truncated_ones_are_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, make_state(), key="abc", seeds=[1, 2, 3, 4])
    data = path.read_bytes()
    wrong = (f"checkpoint={str(path)!r} is not a FineTuneClassifier checkpoint of this "
             "version. Delete it or choose another path.")
    header, _, body = data.partition(b"\n")
    older = header.replace(f" {CHECKPOINT_FORMAT} ".encode(), b" 2 ")
    other_digest = f"skt-checkpoint {CHECKPOINT_FORMAT} md5 0\n".encode()
    for content in (older + b"\n" + body, other_digest + body):
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            read_checkpoint(path)
        assert str(info.value) == wrong
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is damaged: its content does not match"):
        read_checkpoint(path)


def test_checkpoint_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_checkpoint("~/runs/run.ckpt", make_state(), key="abc", seeds=[1, 2, 3, 4])
    assert (tmp_path / "runs" / "run.ckpt").is_file()
    assert read_checkpoint("~/runs/run.ckpt")["key"] == "abc"
    assert read_checkpoint(tmp_path.joinpath("runs", "run.ckpt"))["key"] == "abc"


# --------------------------------------------------------------- callbacks


class Recorder(Callback):
    """Logs every event with ``state.epoch``; shows itself as the estimator's ``recorder_``."""

    def __init__(self):
        self.events = []
        self.losses = []

    def on_train_begin(self, estimator, state):
        estimator.recorder_ = self
        self.order = [type(callback).__name__ for callback in state.callbacks]
        self.batches_per_epoch = state.batches_per_epoch
        self.events.append(("on_train_begin", state.epoch))

    def on_epoch_begin(self, estimator, state):
        self.events.append(("on_epoch_begin", state.epoch))

    def on_batch_end(self, estimator, state, loss):
        self.events.append(("on_batch_end", state.epoch))
        self.losses.append(loss.item())

    def on_epoch_end(self, estimator, state):
        self.events.append(("on_epoch_end", state.epoch))

    def on_train_end(self, estimator, state):
        self.events.append(("on_train_end", state.epoch))

    def state_dict(self):
        return {"events": len(self.events)}


def expected_events(n_epochs: int, n_batches: int) -> list[tuple[str, int]]:
    events = [("on_train_begin", 0)]
    for epoch in range(n_epochs):
        events += [("on_epoch_begin", epoch), *[("on_batch_end", epoch)] * n_batches,
                   ("on_epoch_end", epoch + 1)]
    return [*events, ("on_train_end", n_epochs)]


def test_user_callback_sees_every_event_in_order(data):
    X, y = data
    clf = make_clf(max_iter=2, callbacks=[Recorder()]).fit(X, y)
    seen = clf.recorder_
    assert seen.batches_per_epoch == 4  # 32 images in batches of 8
    assert seen.events == expected_events(2, 4)
    # Batches of equal size: their mean loss is the epoch's.
    np.testing.assert_allclose(np.reshape(seen.losses, (2, 4)).mean(axis=1), clf.loss_curve_,
                               rtol=1e-6)


def test_user_callbacks_run_after_early_stopping_and_before_the_checkpoint(data, tmp_path,
                                                                          capsys):
    X, y = data
    path = tmp_path / "run.ckpt"
    clf = make_clf(max_iter=2, verbose=1, early_stopping=True, validation_fraction=0.25,
                   checkpoint=path, callbacks=[Recorder()]).fit(X, y)
    capsys.readouterr()
    assert clf.recorder_.order == ["ProgressBar", "EarlyStopping", "Recorder", "Checkpoint"]
    assert clf.recorder_.events == expected_events(2, 3)  # 24 training images
    saved = read_checkpoint(path)["callbacks"]
    # The last checkpoint holds what the user's callback did in the last epoch.
    assert saved["Recorder"] == {"events": len(clf.recorder_.events) - 1}
    assert saved["EarlyStopping"]["best_epoch"] == clf.best_iteration_


def test_each_fit_uses_fresh_copies_of_the_callbacks(data):
    X, y = data
    user = Recorder()
    callbacks = [user]
    clf = make_clf(max_iter=1, callbacks=callbacks).fit(X, y)
    first = clf.recorder_
    assert first is not user and user.events == [] and not hasattr(user, "order")
    assert clf.callbacks is callbacks and callbacks[0] is user and len(callbacks) == 1
    assert first.events == expected_events(1, 4)
    proba = clf.predict_proba(X)
    clf.fit(X, y)  # a refit starts from a fresh copy, not the previous fit's events
    assert clf.recorder_ is not first and clf.recorder_.events == first.events
    assert np.array_equal(clf.predict_proba(X), proba)
    cloned = clone(clf).fit(X, y)
    assert cloned.recorder_.events == first.events
    assert np.array_equal(cloned.predict_proba(X), proba)


class StopAfter(Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, estimator, state):
        if state.epoch == self.epochs:
            state.stopped = True


def test_a_callback_stops_training(data):
    X, y = data
    full = make_clf(max_iter=5).fit(X, y)
    stopped = make_clf(max_iter=5, callbacks=[StopAfter(2)]).fit(X, y)
    assert stopped.n_iter_ == 2 and [row["epoch"] for row in stopped.history_] == [1, 2]
    assert stopped.loss_curve_ == full.loss_curve_[:2]  # the same first two epochs


def test_non_callbacks_are_refused(data):
    X, y = data
    with pytest.raises(TypeError) as info:
        make_clf(callbacks=[Recorder(), "progress"]).fit(X, y)
    assert str(info.value) == ("callbacks holds 'progress', a str; pass instances of "
                               "skt.training.Callback subclasses.")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_one_bar_per_epoch_with_its_loss_on_a_terminal(data, capsys):
    X, y = data
    terminal = _Terminal()
    clf = make_clf(max_iter=3, callbacks=[ProgressBar(file=terminal)], early_stopping=True,
                   validation_fraction=0.25).fit(X, y)
    assert capsys.readouterr() == ("", "")
    bars = terminal.getvalue().rstrip("\n").split("\n")  # a closed bar ends its line
    assert len(bars) == 3
    for row, bar in zip(clf.history_, bars, strict=True):
        final = bar.split("\r")[-1]  # the bar as last drawn
        assert final.startswith(f"epoch {row['epoch']}/3: 100%")
        assert " 3/3 " in final  # 24 training images in batches of 8
        assert final.endswith(f"loss={row['train_loss']:.4f}, "
                              f"val_score={row['valid_score']:.4f}]")


def test_progress_off_a_terminal_is_one_line_per_epoch(data, capsys):
    X, y = data
    clf = make_clf(max_iter=3, callbacks=[ProgressBar()], early_stopping=True,
                   validation_fraction=0.25).fit(X, y)
    out, err = capsys.readouterr()  # pytest's stderr is not a terminal
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3
    for row, line in zip(clf.history_, lines, strict=True):
        assert re.fullmatch(rf"epoch {row['epoch']}/3: loss {row['train_loss']:.4f}, "
                            rf"val_score {row['valid_score']:.4f} \(\d+\.\d s\)", line), line


def test_history_has_one_row_per_epoch_and_what_callbacks_add(data):
    X, y = data

    class LearningRate(Callback):
        def on_epoch_end(self, estimator, state):
            state.history[-1]["lr"] = state.optimizer.param_groups[0]["lr"]

    clf = make_clf(max_iter=2, early_stopping=True, validation_fraction=0.25,
                   callbacks=[LearningRate()]).fit(X, y)
    assert [row["epoch"] for row in clf.history_] == [1, 2]
    assert [row["train_loss"] for row in clf.history_] == clf.loss_curve_
    assert [row["valid_score"] for row in clf.history_] == clf.validation_scores_
    # 2 epochs of 3 steps, one of warm-up; cosine decay to 0 at the end.
    schedule = WarmupSchedule(6, 1, "cosine")
    assert [row["lr"] for row in clf.history_] == pytest.approx(
        [0.01 * schedule(3), 0.0], abs=1e-12)
    clf.set_params(warm_start=True, max_iter=1).fit(X, y)
    assert [row["epoch"] for row in clf.history_] == [1, 2, 3] and clf.n_iter_ == 3
    assert [row["train_loss"] for row in clf.history_] == clf.loss_curve_


# ---------------------------------------------------------- early stopping


def test_early_stopping_waits_patience_epochs_and_restores_the_best():
    model = tiny_net(outputs=2)
    state = make_state(model)
    stopper = EarlyStopping(patience=2)
    stopper.on_train_begin(None, state)
    snapshots, stopped = [], []
    for score in (0.5, 0.9, 0.6, 0.6):
        with torch.no_grad():
            model[0].weight.add_(1.0)  # each epoch changes the network
        state.epoch += 1
        state.history.append({"epoch": state.epoch, "train_loss": 1.0, "valid_score": score})
        stopper.on_epoch_end(None, state)
        snapshots.append(weights_of(model))
        stopped.append(state.stopped)
    assert stopped == [False, False, False, True]
    assert (stopper.best_score, stopper.best_epoch) == (0.9, 2)
    saved = stopper.state_dict()
    assert saved["waited"] == 2 and torch.equal(saved["best_weights"]["0.weight"],
                                                snapshots[1]["0.weight"])
    stopper.on_train_end(None, state)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in weights_of(model).items())
    assert stopper.state_dict()["best_weights"] is None  # no copy kept after training

    # A copy resumes where the state says; without restore_best the weights stay.
    resumed = EarlyStopping(patience=2, restore_best=False)
    resumed.load_state_dict(saved)
    state.epoch = 4
    resumed.on_train_begin(None, state)  # epoch 4: resuming, nothing is reset
    assert (resumed.best_score, resumed.best_epoch) == (0.9, 2)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    resumed.on_train_end(None, state)
    assert not torch.equal(model[0].weight, snapshots[1]["0.weight"])
    state.epoch = 0
    resumed.on_train_begin(None, state)  # a fresh fit forgets the last one
    assert resumed.state_dict() == {"best_score": None, "best_epoch": None,
                                    "best_weights": None, "waited": 0}


def test_early_stopping_ignores_epochs_without_a_validation_score():
    state = make_state()
    stopper = EarlyStopping(patience=1)
    stopper.on_train_begin(None, state)
    before = weights_of(state.model)
    for epoch in (1, 2, 3):
        state.epoch = epoch
        state.history.append({"epoch": epoch, "train_loss": 1.0, "valid_score": None})
        stopper.on_epoch_end(None, state)
    with torch.no_grad():
        state.model[0].weight.add_(1.0)
    stopper.on_train_end(None, state)
    assert not state.stopped and stopper.best_epoch is None
    assert not torch.equal(state.model[0].weight, before["0.weight"])


class CrashAfterEpoch(Callback):
    """Raises as epoch ``epoch + 1`` begins, unless the fit resumed from a checkpoint.

    Shows the epoch the fit started from as the estimator's ``started_at_``.
    """

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_begin(self, estimator, state):
        estimator.started_at_ = state.epoch

    def on_epoch_begin(self, estimator, state):
        if state.epoch == self.epoch and estimator.started_at_ == 0:
            raise Crash


def test_early_stopping_resumes_its_state_from_a_checkpoint(data, tmp_path):
    X, y = data
    # Scripted scores 0.5, 0.9, 0.6, 0.6, 0.95: the best epoch (2) comes before the
    # crash, and patience 2 stops the fit after epoch 4.
    params = make_clf(max_iter=5, early_stopping=True, n_iter_no_change=2, augment="flip",
                      validation_fraction=0.25, callbacks=[CrashAfterEpoch(2)]).get_params()
    uninterrupted = Scripted(**{**params, "callbacks": None}).fit(X, y)
    assert uninterrupted.n_iter_ == 4 and uninterrupted.best_iteration_ == 2
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        Scripted(**{**params, "checkpoint": path}).fit(X, y)
    assert read_checkpoint(path)["epoch"] == 2
    resumed = Scripted(**{**params, "checkpoint": path}).fit(X, y)
    assert resumed.started_at_ == 2
    assert resumed.validation_scores_ == uninterrupted.validation_scores_ == [0.5, 0.9, 0.6, 0.6]
    assert resumed.best_iteration_ == 2 and resumed.best_validation_score_ == 0.9
    assert resumed.loss_curve_ == uninterrupted.loss_curve_
    expected = weights_of(uninterrupted.model_)
    assert all(torch.equal(v, expected[k]) for k, v in weights_of(resumed.model_).items())


def test_weight_average_is_the_mean_of_the_last_epochs_weights(data, tmp_path):
    from .test_finetune import Snapshots

    X, y = data
    clf = make_clf(max_iter=4, average_epochs=2, callbacks=[Snapshots()]).fit(X, y)
    last_two = clf.snapshots_[2:]
    for name, value in weights_of(clf.model_).items():
        if value.is_floating_point():
            expected = (last_two[0][name].double() + last_two[1][name].double()) / 2
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
        else:  # e.g. BatchNorm's num_batches_tracked: the last value
            assert torch.equal(value, last_two[1][name])
    assert not torch.equal(weights_of(clf.model_)["8.weight"], last_two[1]["8.weight"])
    # a resumed fit averages the same epochs
    params = dict(max_iter=4, average_epochs=2, checkpoint=tmp_path / "ckpt.pt")
    with pytest.raises(Crash):
        CrashAfter3(**make_clf(**params).get_params()).fit(X, y)
    resumed = make_clf(**params).fit(X, y)
    for name, value in weights_of(resumed.model_).items():
        torch.testing.assert_close(value, weights_of(clf.model_)[name], rtol=0, atol=0)


class CrashAfter3(FineTuneClassifier):
    """Dies as its fourth epoch begins, inside the averaged epochs."""

    def begin_epoch(self, state):
        if state.epoch == 3:
            raise Crash
        super().begin_epoch(state)
