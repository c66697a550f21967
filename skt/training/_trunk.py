"""The frozen trunk of a network, computed once per image and view.

With the first ``k`` stages frozen (their weights fixed and their BatchNorm
layers in eval mode), what those stages output depends on the input image
alone. :func:`split_network` cuts the network's graph after them into a
*trunk* and the *rest*; :class:`TrunkStore` keeps the trunk's output for each
training image and augmentation view, so each optimisation step runs only
the rest, forward and backward.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torchvision.models.feature_extraction import NodePathTracer

from skt.backbones import tracer_kwargs

__all__ = ["MEMORY_BYTES", "Trunk", "TrunkStore", "split_network"]

MEMORY_BYTES = 4 << 30
"""With ``frozen_cache="auto"``, trunk outputs are kept in memory up to this
many bytes, and in a temporary file beyond."""


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _split_graph(model: nn.Module, frozen: list[str]) -> fx.GraphModule | None:
    """``model``'s graph in two partitions, ``submod_0`` (frozen) and ``submod_1``.

    The trunk holds the nodes that run inside a frozen stage, and the glue
    code of ``forward`` they read (an activation between the stem and the
    first block, say); everything else, including what follows the last
    frozen stage, is the rest.
    """
    tracer = NodePathTracer(**tracer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(model)

    def in_frozen_stage(node: fx.Node) -> bool:
        if node.op == "get_attr":
            return _inside(str(node.target), frozen)
        return node.op not in ("placeholder", "output") and _inside(
            tracer.node_to_qualname.get(node, ""), frozen)

    trunk: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "placeholder" or in_frozen_stage(node) or any(
                user in trunk for user in node.users):
            trunk.add(node)
    if all(node in trunk for node in graph.nodes if node.op not in ("output", "placeholder")):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return split_module(fx.GraphModule(tracer.root, graph), model,
                            lambda node: 0 if node in trunk else 1)


class _Part:
    """One partition of a split graph, called with one tensor.

    ``split_module`` passes the parameters a partition reads directly (a
    class token, a layer scale) as extra inputs; they are read from the
    network at every call, so the partition always sees the trained values.
    """

    def __init__(self, module: nn.Module, network: nn.Module, attributes: list[str]) -> None:
        self.module = module
        self.network = network
        self.attributes = attributes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = [functools.reduce(getattr, name.split("."), self.network)
                  for name in self.attributes]
        return self.module(x, *values)


def _parts(split: fx.GraphModule, network: nn.Module) -> tuple[_Part, _Part] | None:
    """Trunk and rest, when each reads one tensor (and parameters) and the trunk returns one."""
    calls = {node.target: node for node in split.graph.nodes if node.op == "call_module"}
    if set(calls) != {"submod_0", "submod_1"}:
        return None
    (output,) = [node for node in split.submod_0.graph.nodes if node.op == "output"]
    if not isinstance(output.args[0], fx.Node):
        return None
    parts = []
    for name, first in (("submod_0", "placeholder"), ("submod_1", "call_module")):
        args = calls[name].args
        if not args or args[0].op != first or any(arg.op != "get_attr" for arg in args[1:]):
            return None
        parts.append(_Part(getattr(split, name), network, [arg.target for arg in args[1:]]))
    return parts[0], parts[1]


@dataclass(eq=False)
class Trunk:
    """A network cut after its first ``n_frozen`` stages.

    ``trunk`` and the two graphs of the rest share the network's modules and
    parameters: training the rest trains the network. ``modules`` names
    every module the trunk calls; the training loop keeps them in eval mode,
    including those between frozen stages that hold no parameters (a
    dropout), so that the trunk is a fixed function of its input. The rest is traced in
    both modes, since tracing fixes Python branches on ``self.training``
    (stochastic depth, for one); :meth:`rest` runs the graph of the mode the
    network is in.
    """

    n_frozen: int
    trunk: _Part
    rest_train: _Part
    rest_eval: _Part
    modules: frozenset[str] = frozenset()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's output for a batch: no gradients, frozen stages in eval mode."""
        with torch.no_grad():
            return self.trunk(images)

    def rest(self, features: torch.Tensor, training: bool) -> torch.Tensor:
        """The network's output from the trunk's."""
        return (self.rest_train if training else self.rest_eval)(features)


def split_network(model: nn.Module, stages: tuple[tuple[str, ...], ...],
                  n_frozen: int) -> Trunk | None:
    """Cut ``model`` after its first ``n_frozen`` ``stages``; None if its graph does not allow it.

    The cut needs an FX-traceable network whose later stages read one tensor
    of the frozen ones and nothing else (not the input image, not a second
    intermediate). Module modes are left as they were.
    """
    if n_frozen < 1:
        return None
    frozen = [prefix for stage in stages[:n_frozen] for prefix in stage]
    modes = {module: module.training for module in model.modules()}
    parts = []
    try:
        for training in (False, True):
            model.train(training)
            split = _split_graph(model, frozen)
            part = None if split is None else _parts(split, model)
            if part is None:
                return None
            parts.append(part)
    except Exception:  # FX cannot trace data-dependent control flow
        return None
    finally:
        for module, mode in modes.items():
            module.training = mode
    (trunk, rest_eval), (_, rest_train) = parts
    called = {id(module) for name, module in trunk.module.named_modules() if name}
    return Trunk(n_frozen, trunk, rest_train, rest_eval,
                 frozenset(name for name, module in model.named_modules() if id(module) in called))


def _temporary_folder(folder: str | os.PathLike | None) -> tempfile.TemporaryDirectory:
    """A new temporary folder in ``folder`` (created if needed) for a store's file."""
    try:
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="skt-trunk-", dir=folder)
    except OSError as exc:
        raise _cannot_create(folder, exc) from exc


def _cannot_create(folder: str | os.PathLike | None, exc: OSError) -> OSError:
    where = tempfile.gettempdir() if folder is None else os.fspath(folder)
    return OSError(exc.errno, f"Cannot create the frozen stages' file in {where} "
                              f"({exc.strerror or exc}).")


class TrunkStore:
    """Trunk outputs of ``n`` items under up to ``n_views`` views each, filled as they come.

    Four-dimensional outputs ``(C, H, W)`` are stored as ``(H, W, C)`` so
    that a gathered batch is already channels-last. The storage is one
    tensor per view in memory, each allocated when its view is first put,
    or one file in ``folder`` (removed by :meth:`close`, also when an
    error ends the fit); pages never written take no room. With ``"auto"``,
    a folder where no file can be created means memory instead, after a
    warning naming it; with ``"disk"``, an ``OSError`` naming it.

    Parameters
    ----------
    n : int
        Items (images).
    n_views : int
        Views per item (1, 2 or 8; see :func:`skt.images.view_count`).
    location : {"memory", "disk", "auto"}
        ``"auto"`` keeps in memory what is at most :data:`MEMORY_BYTES` once
        ``max_filled`` views per item are stored.
    max_filled : int
        Views per item that can be filled in the whole fit (the number of
        epochs, at most ``n_views``).
    folder : str or path, optional
        Where the file goes (default: the system's temporary folder).
    """

    def __init__(self, n: int, n_views: int, location: str = "auto", max_filled: int = 1,
                 folder: str | os.PathLike | None = None) -> None:
        self.n = n
        self.n_views = n_views
        self.location = location
        self.max_filled = max(1, min(max_filled, n_views))
        self.folder = folder
        self.filled = np.zeros((n, n_views), dtype=bool)
        self._data: list[torch.Tensor | None] | None = None
        self._file: np.memmap | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._channels_last = False

    @property
    def on_disk(self) -> bool:
        """Whether the outputs live in a file (once the first one is stored)."""
        return self._file is not None

    def _allocate(self, sample: torch.Tensor) -> None:
        self._channels_last = sample.ndim == 3
        shape = tuple(sample.permute(1, 2, 0).shape if self._channels_last else sample.shape)
        per_item = int(np.prod(shape)) * 4
        disk = self.location == "disk" or (
            self.location == "auto" and self.n * self.max_filled * per_item > MEMORY_BYTES)
        self._shape = shape
        if not disk:
            self._data = [None] * self.n_views
            return
        try:
            self._open_file((self.n, self.n_views, *shape))
        except OSError as exc:
            if self.location == "disk":
                raise
            warnings.warn(f"{exc.strerror} Keeping the frozen stages' outputs in memory "
                          f"instead ({self.n * self.max_filled * per_item / 2**30:.1f} GiB).",
                          RuntimeWarning, stacklevel=2)
            self._data = [None] * self.n_views

    def _open_file(self, shape: tuple[int, ...]) -> None:
        self._tmp = _temporary_folder(self.folder)
        try:
            self._file = np.lib.format.open_memmap(os.path.join(self._tmp.name, "trunk.npy"),
                                                   mode="w+", dtype=np.float32, shape=shape)
        except OSError as exc:  # a full disk, say: leave no empty folder behind
            self.close()
            raise _cannot_create(self.folder, exc) from exc

    @staticmethod
    def check_folder(folder: str | os.PathLike | None) -> None:
        """Raise ``OSError`` naming ``folder`` when a store cannot create its file there.

        Creates ``folder`` if needed, as a store would.
        """
        _temporary_folder(folder).cleanup()

    def put(self, items: np.ndarray, views: np.ndarray, features: torch.Tensor) -> None:
        """Store ``features[i]``, the output for item ``items[i]`` under view ``views[i]``."""
        features = features.detach().float().cpu()
        if self._data is None and self._file is None:
            self._allocate(features[0])
        if self._channels_last:
            features = features.permute(0, 2, 3, 1)
        if self._file is not None:
            self._file[items, views] = features.numpy()
        else:
            for view in np.unique(views):
                if self._data[view] is None:
                    self._data[view] = torch.empty((self.n, *self._shape), dtype=torch.float32)
                rows = views == view
                self._data[view][torch.as_tensor(items[rows])] = features[torch.as_tensor(rows)]
        self.filled[items, views] = True

    def get(self, items: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """The stored outputs of ``items`` under ``views``: a batch, channels-last when 4-D."""
        if self._file is not None:
            batch = torch.from_numpy(np.ascontiguousarray(self._file[items, views]))
        else:
            batch = torch.empty((len(items), *self._shape), dtype=torch.float32)
            for view in np.unique(views):
                rows = views == view
                batch[torch.as_tensor(rows)] = self._data[view][torch.as_tensor(items[rows])]
        return batch.permute(0, 3, 1, 2) if self._channels_last else batch

    def close(self) -> None:
        """Free the memory, or remove the file."""
        self._data = None
        self._file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
