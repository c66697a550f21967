"""The output shape of every layer of a network, from one forward pass."""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn
from torchvision.models import feature_extraction

from skt.backbones._layers import layer_names, tracer_kwargs
from skt.backbones._resolve import Backbone, resolve_backbone

__all__ = ["layer_shapes"]


def _shape(value: object, batched: bool = True) -> tuple[int, ...] | None:
    """One image's shape of a tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        shape = tuple(int(size) for size in value.shape)
        return shape[1:] if batched and shape else shape
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph once and keeps the shape of each node's result, not the result."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.batched: set[fx.Node] = set()

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        # only what depends on the image has a batch dimension to leave out
        if node.op == "placeholder" or any(arg in self.batched for arg in node.all_input_nodes):
            self.batched.add(node)
        self.shapes[node] = _shape(result, node in self.batched)
        return result


def _traced_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...] | None]:
    """Shapes of the graph nodes, by the names :func:`skt.list_layers` gives them.

    The tracer settings are those ``get_graph_node_names`` uses: torchvision's
    defaults added to skt's (:func:`skt.backbones.tracer_kwargs`), so the
    names match.
    """
    settings = feature_extraction._set_default_tracer_kwargs(tracer_kwargs())
    tracer = feature_extraction.NodePathTracer(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(model)
        recorder = _ShapeRecorder(fx.GraphModule(tracer.root, graph))
        recorder.run(x)
    return {name: recorder.shapes.get(node) for node, name in tracer.node_to_qualname.items()}


def _hooked_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...] | None]:
    """Output shapes of the submodules that run, by module name (the last call counts)."""
    shapes: dict[str, tuple[int, ...] | None] = {}

    def recorder(name: str):
        def hook(module, inputs, output):
            shapes[name] = _shape(output)
        return hook

    handles = [module.register_forward_hook(recorder(name))
               for name, module in model.named_modules() if name]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _last_node_shapes(names: list[str], shapes: dict[str, tuple[int, ...] | None]) -> dict:
    """Each name's shape; a module name that is not a node takes its last node's."""
    result = {}
    for position, name in enumerate(names):
        if name in shapes:
            result[name] = shapes[name]
            continue
        inside = [earlier for earlier in reversed(names[:position])
                  if earlier.startswith(name + ".") and earlier in shapes]
        result[name] = shapes[inside[0]] if inside else None
    return result


def _measure(resolved: Backbone, device: torch.device) -> dict[str, tuple[int, ...] | None]:
    model, size = resolved.model.to(device).eval(), resolved.preprocessing.crop_size
    names, traceable = layer_names(model)
    x = torch.zeros(1, 3, size, size, device=device)
    with torch.no_grad():
        shapes = _traced_shapes(model, x) if traceable else _hooked_shapes(model, x)
    return _last_node_shapes(names, shapes)


def layer_shapes(backbone: str | nn.Module, *,
                 image_size: int | None = None) -> dict[str, tuple[int, ...] | None]:
    """The output shape of every layer of ``backbone``, for one image.

    Shapes leave out the batch dimension: ``(C, H, W)`` for feature maps,
    ``(T, C)`` for tokens, ``(D,)`` for vectors. A layer whose output is not
    a tensor (a tuple, a size) gets None; a tensor that does not depend on the
    image (a parameter the graph reads, such as a class token) keeps its full
    shape.

    The network runs once on one blank image: an FX-traceable network is
    traced once and its graph run by a :class:`torch.fx.Interpreter` that
    keeps each node's shape; others run with forward
    hooks on their submodules, and a submodule that does not run gets None.
    The pass runs on PyTorch's ``meta`` device, which computes shapes and no
    values, in a fraction of a second; a network that cannot (an operation
    without a meta kernel, control flow on values) runs on the CPU, with
    random weights, instead.

    Parameters
    ----------
    backbone : str or nn.Module
        A name from :func:`skt.list_backbones`, or a module (not modified).
    image_size : int, optional
        Side of the square input; default the crop size of the backbone's
        default weights (224 for a user module).

    Returns
    -------
    dict
        ``{layer: shape}`` for the names of :func:`skt.list_layers`, in
        forward order; a module name that is not a graph node takes the shape
        of its last node.

    Raises
    ------
    ValueError
        The network cannot run on an image of this size.

    Examples
    --------
    >>> from skt.backbones import layer_shapes
    >>> shapes = layer_shapes("resnet18")
    >>> shapes["layer4"], shapes["avgpool"], shapes["flatten"], shapes["fc"]
    ((512, 7, 7), (512, 1, 1), (512,), (1000,))
    >>> layer_shapes("resnet18", image_size=64)["layer4"]
    (512, 2, 2)
    """
    meta = torch.device("meta")
    try:
        with meta:  # parameters without memory or initialisation
            resolved = resolve_backbone(backbone, weights=None, image_size=image_size)
    except Exception:  # a constructor that computes with tensors (RegNet's widths)
        resolved = resolve_backbone(backbone, weights=None, image_size=image_size)
    try:
        return _measure(resolved, meta)
    except Exception as exc:
        if not _needs_values(exc):
            raise _cannot_run(resolved, exc) from exc
    resolved = resolve_backbone(backbone, weights=None, image_size=image_size)
    try:
        return _measure(resolved, torch.device("cpu"))
    except Exception as exc:
        raise _cannot_run(resolved, exc) from exc


def _needs_values(exc: Exception) -> bool:
    """Whether ``exc`` says a pass failed on the meta device for want of values or kernels."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()


def _cannot_run(resolved: Backbone, exc: Exception) -> ValueError:
    size = resolved.preprocessing.crop_size
    # the first line: fx.Interpreter appends the node it was running and a pointer to tlparse
    message = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return ValueError(f"{resolved.name} cannot run on a {size} x {size} image "
                      f"({type(exc).__name__}: {message}); pass an image_size it accepts.")
