"""Batch norm folded into the convolution before it, for the attacks' eval-mode steps.

In eval mode a batch norm is an affine map per channel, y = (z - mu) * s + beta with
s = gamma / sqrt(var + eps), so `bn(conv(x))` is one convolution with weight W * s and bias
(b - mu) * s + beta. A PGD step runs the model forward and backward to its input; folding drops
the batch norm's two kernels (forward and backward) at every conv-bn pair of every step.

`eval_view(model)` returns a view of `model` in which every conv -> bn pair (the conv's output
used by the batch norm alone) is one convolution, the folded weights computed from the model's
current parameters and running statistics. The view shares the model's modules and owns no
state: call it again after the model changed (the attacks call it once per attack, the
optimiser moves the weights between attacks). It is for input gradients only: the folded
weights are detached, so no gradient reaches the model's parameters through it. Its logits
equal the model's up to float rounding (a few ulps), so the adversarial examples found with it
can differ from those found on the unfolded model where a gradient component is near zero;
`attack.fold_batchnorm=false` / `eval.fold_batchnorm=false` turn it off. The folded weights are a
copy of the folded convolutions' weights (about the model's size in memory, e.g. 45 MB for ResNet-18);
`release(model)` frees them until the next `eval_view` (the attacks release them when they end).

A model that torch.fx cannot trace (data-dependent control flow), a model in train mode, a
compiled model, or one without foldable pairs is returned as it is.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import fx, nn


class _ConvBN(nn.Module):
    """One conv -> eval-mode bn pair as a single convolution. Holds the pair without registering
    them (the view owns no parameters); `refresh` recomputes the folded weight and bias."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.pair = (conv, bn)
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    @torch.no_grad()
    def refresh(self) -> None:
        conv, bn = self.pair
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        w = conv.weight
        self.weight = (w * scale.view(-1, *[1] * (w.dim() - 1)).to(w.dtype)).detach()
        self.bias = shift.to(w.dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.pair
        if bn.training:  # the view is made in eval mode; a model put back in train mode uses its batch statistics
            return bn(conv(x))
        return conv._conv_forward(x, self.weight, self.bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


class _View:
    def __init__(self, module: Optional[fx.GraphModule], units: list[_ConvBN], signature: tuple):
        self.module, self.units, self.signature = module, units, signature


def _signature(model: nn.Module) -> tuple:
    """Where the model's tensors live: a traced graph holds some of them (buffers read inside
    traced modules) by reference, so a model moved (`.to(...)` replaces buffers) needs a new view."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _build(model: nn.Module, signature: tuple) -> _View:
    """The folded graph of `model` (traced in its current, eval, mode); a view without a module where
    it cannot be traced or has nothing to fold."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception:  # any tracing failure (control flow on values, untraceable calls): no folding
        return _View(None, [], signature)
    module = fx.GraphModule(model, graph)  # shares the model's submodules, parameters and buffers
    named = dict(module.named_modules())
    units: list[_ConvBN] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        conv, bn = named.get(source.target), named.get(node.target)
        if not _foldable(conv, bn) or len(source.args) != 1 or source.kwargs:
            continue
        unit = _ConvBN(conv, bn)
        name = f"folded_{len(units)}"
        module.add_submodule(name, unit)
        with graph.inserting_after(node):
            fused = graph.call_module(name, (source.args[0],))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(source)
        units.append(unit)
    if not units:
        return _View(None, [], signature)
    graph.lint()
    module.recompile()
    return _View(module, units, signature)


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_view(model: nn.Module) -> nn.Module:
    """`model` with its conv -> bn pairs folded from the current weights (see the module doc), or
    `model` itself where nothing can be folded. The model must be in eval mode."""
    if model.training or hasattr(model, "_orig_mod"):  # train mode: batch statistics; compiled: leave it be
        return model
    signature = _signature(model)
    view = _VIEWS.get(model)
    if view is None or view.signature != signature:
        view = _VIEWS[model] = _build(model, signature)
    if view.module is None:
        return model
    for unit in view.units:
        unit.refresh()
    return view.module


def release(model: nn.Module) -> None:
    """Free the folded weights of `model`'s view (the next `eval_view` recomputes them, as it
    always does), so that they take no memory outside an attack."""
    view = _VIEWS.get(model)
    for unit in view.units if view is not None else ():
        unit.weight = unit.bias = None
