"""Fused operations over a model's state: one flat buffer per dtype, finiteness, loading by copy.

A site hand-over touches every tensor of the model two or three times (load the global weights,
check the result, add it to the round's sum). Done tensor by tensor in Python, that is a few
hundred small operations per site, whose fixed cost dominates the arithmetic for a small model.
Here each is one fused operation (or one per dtype):

- :class:`FlatLayout` places every floating tensor of a state in one flat buffer per dtype, built
  once per round; ``gather`` copies a state into it with one ``torch._foreach_copy_``;
- :func:`all_finite` decides finiteness with one reduction; only when it fails does
  :func:`first_nonfinite` look tensor by tensor, to name the culprit;
- :func:`load_by_copy` puts a state into a module with one ``torch._foreach_copy_`` into its live
  tensors, where ``load_state_dict`` would be exactly that copy (no hooks, no custom loading), and
  calls ``load_state_dict`` otherwise;
- :func:`add_scaled` adds a site's flat state (float32, float16, integers), times its weight, to the float64 sum; on a
  CPU a mixed-dtype ``add_`` would first copy the whole operand to float64, so it casts block by
  block through one reused buffer instead (the cast stays in cache);
- :func:`divide_into` is the final division of a float64 sum into a tensor of the model's dtype.
  On a CPU a mixed-dtype ``torch.div(acc, w, out=x)`` first makes a float64 result the size of the
  whole tensor, then copies it (for a 2M-value convolution, a fresh 16 MB allocation whose page
  faults cost more than the arithmetic); it divides block by block through one reused buffer
  instead, which allocates nothing and stays in cache, with the same result bit for bit. On a GPU
  the kernel casts in registers, and the whole tensor is one operation.

Buffers live on the device of the state they are built for: a model on a GPU is accumulated on
that GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "BLOCK",
    "FlatLayout",
    "add_scaled",
    "all_finite",
    "block_buffer",
    "divide_into",
    "first_nonfinite",
    "load_by_copy",
    "loads_by_copy",
]

State = Mapping[str, Tensor]

BLOCK = 1 << 15
"""Elements per block of a CPU cast between dtypes (256 KiB of float64: in cache, allocated once)."""


class FlatLayout:
    """Where each tensor of a state lives in one flat buffer per dtype.

    Example:
        >>> state = {"w": torch.tensor([[1.0, 2.0]]), "n": torch.tensor(3), "b": torch.tensor([4.0])}
        >>> layout = FlatLayout(state)
        >>> buffers = layout.buffers()
        >>> layout.gather(state, layout.views(buffers))
        >>> buffers[torch.float32].tolist(), buffers[torch.int64].tolist()
        ([1.0, 2.0, 4.0], [3])
    """

    def __init__(self, reference: State) -> None:
        self.keys = tuple(reference)
        self.shapes = {k: tuple(v.shape) for k, v in reference.items()}
        self.signature = [(v.shape, v.dtype) for v in reference.values()]
        self.groups: dict[torch.dtype, tuple[str, ...]] = {}
        for key, value in reference.items():
            self.groups[value.dtype] = (*self.groups.get(value.dtype, ()), key)

    def matches(self, state: State) -> bool:
        """Whether ``state`` has this layout's keys, in order, with the same shapes and dtypes."""
        return tuple(state) == self.keys and [(v.shape, v.dtype) for v in state.values()] == self.signature

    def numel(self, dtype: torch.dtype) -> int:
        return sum(math.prod(self.shapes[k]) for k in self.groups[dtype])

    def buffers(self, dtype: torch.dtype | None = None) -> dict[torch.dtype, Tensor]:
        """One zeroed flat CPU buffer per dtype group, of ``dtype`` (default: the group's own)."""
        return {d: torch.zeros(self.numel(d), dtype=dtype or d) for d in self.groups}

    def views(self, buffers: Mapping[torch.dtype, Tensor]) -> dict[str, Tensor]:
        """Each key's tensor as a view into its group's flat buffer (the groups in ``buffers``)."""
        out: dict[str, Tensor] = {}
        for dtype, flat in buffers.items():
            keys = self.groups[dtype]
            sizes = [math.prod(self.shapes[k]) for k in keys]
            for key, part in zip(keys, flat.split(sizes), strict=True):
                shape = self.shapes[key]
                out[key] = part if len(shape) == 1 else part.view(shape)  # a split is already 1-D
        return out

    def gather(self, state: State, views: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into ``views`` (one fused copy per dtype group)."""
        for keys in self.groups.values():
            torch._foreach_copy_([views[k] for k in keys], [state[k].detach() for k in keys])


def block_buffer(like: Tensor, dtype: torch.dtype = torch.float64) -> Tensor | None:
    """The reusable cast buffer of :func:`divide_into` for tensors on ``like``'s device:
    :data:`BLOCK` elements of ``dtype`` on a CPU, ``None`` elsewhere (not needed)."""
    return torch.empty(BLOCK, dtype=dtype, device=like.device) if like.device.type == "cpu" else None


def divide_into(src: Tensor, divisor: float, out: Tensor, block: Tensor | None = None) -> Tensor:
    """``out = src / divisor``, computed in ``src``'s dtype and rounded once to ``out``'s (what
    ``(src / divisor).to(out.dtype)`` gives, bit for bit), block by block through ``block`` (of
    ``src``'s dtype) when there is one and the dtypes differ.

    Example:
        >>> total, block = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.empty(2, dtype=torch.float64)
        >>> divide_into(total, 4.0, torch.empty(3), block)
        tensor([0.2500, 0.5000, 1.0000])
    """
    src, flat_out = src.reshape(-1), out.view(-1)
    if block is None or src.dtype == out.dtype:
        torch.div(src, divisor, out=flat_out)
        return out
    size = block.numel()
    for start in range(0, src.numel(), size):
        stop = min(src.numel(), start + size)
        part = block[: stop - start]
        torch.div(src[start:stop], divisor, out=part)
        flat_out[start:stop].copy_(part)
    return out


def add_scaled(
    acc: Tensor, src: Tensor, alpha: float, block: Tensor | None = None, *, overwrite: bool = False
) -> Tensor:
    """``acc += alpha * src`` (``acc = alpha * src`` with ``overwrite``), computed in ``acc``'s dtype:
    what ``acc.add_(src.to(acc.dtype), alpha=alpha)`` gives, bit for bit, block by block through
    ``block`` (of ``acc``'s dtype) when there is one and the dtypes differ. Both are flat.

    Example:
        >>> acc, block = torch.ones(3, dtype=torch.float64), torch.empty(2, dtype=torch.float64)
        >>> add_scaled(acc, torch.tensor([1.0, 2.0, 3.0]), 0.5, block).tolist()
        [1.5, 2.0, 2.5]
        >>> add_scaled(acc, torch.tensor([1.0, 2.0, 3.0]), 2.0, block, overwrite=True).tolist()
        [2.0, 4.0, 6.0]
    """
    if block is None or src.dtype == acc.dtype:
        if overwrite:  # not ``torch.mul(src, alpha, out=acc)``: that computes in src's dtype
            return acc.copy_(src).mul_(alpha)
        return acc.add_(src, alpha=alpha)
    size = block.numel()
    for start in range(0, src.numel(), size):
        stop = min(src.numel(), start + size)
        part = block[: stop - start]
        part.copy_(src[start:stop])
        if overwrite:
            torch.mul(part, alpha, out=acc[start:stop])
        else:
            acc[start:stop].add_(part, alpha=alpha)
    return acc


def flat_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """The one flat tensor that ``tensors`` tile, in order, as contiguous views of one storage
    (what :meth:`FlatLayout.views` makes); ``None`` when they do not.

    Example:
        >>> flat = torch.arange(5.0)
        >>> a, b = flat.split([2, 3])
        >>> flat_span([a, b.view(3, 1)]).tolist(), flat_span([b, a])
        ([0.0, 1.0, 2.0, 3.0, 4.0], None)
    """
    if not tensors:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for tensor in tensors:
        if (
            tensor.dtype != first.dtype
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != offset
        ):
            return None
        offset += tensor.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def all_finite(flat: Tensor) -> bool:
    """Whether every value of ``flat`` is finite, by one reduction (a sum propagates NaN and Inf).

    A sum of finite values can still overflow to Inf: a ``False`` is therefore confirmed by
    :func:`first_nonfinite` before it is acted on.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if flat.numel() == 0:
        return True
    # half precision is summed in float32, whose range a half state's sum does not leave
    total = flat.sum(dtype=torch.float32) if flat.is_floating_point() and flat.element_size() < 4 else flat.sum()
    return bool(torch.isfinite(total))


def first_nonfinite(state: State) -> str | None:
    """The first floating tensor of ``state`` holding NaN or Inf (``None`` if none does).

    One fused norm over all tensors decides; tensor by tensor only when it finds something.

    Example:
        >>> first_nonfinite({"a": torch.ones(2), "b": torch.tensor([float("inf")]), "n": torch.tensor(1)})
        'b'
    """
    floats = [(k, v.detach()) for k, v in state.items() if v.is_floating_point()]
    if not floats:
        return None
    norms = torch._foreach_norm([v for _, v in floats])
    if bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all()):
        return None
    for key, value in floats:  # the norm overflowed, or a tensor is not finite: find which
        if not bool(torch.isfinite(value).all()):
            return key
    return None


def loads_by_copy(module: nn.Module) -> bool:
    """Whether ``module.load_state_dict(state)`` is exactly a copy of each tensor: no load hooks,
    no extra state, and no custom ``_load_from_state_dict`` outside ``torch.nn`` on a module that
    owns tensors of the state."""
    for sub in module.modules():
        if sub._load_state_dict_pre_hooks or sub._load_state_dict_post_hooks:
            return False
        if type(sub).set_extra_state is not nn.Module.set_extra_state:
            return False
        loader = type(sub)._load_from_state_dict
        owns = bool(sub._parameters) or any(n not in sub._non_persistent_buffers_set for n in sub._buffers)
        if owns and loader is not nn.Module._load_from_state_dict and not loader.__module__.startswith("torch.nn."):
            return False
    return True


def load_by_copy(module: nn.Module, live: Mapping[str, Tensor] | None, state: State) -> None:
    """Put ``state`` into ``module``: one fused copy into ``live`` (its ``state_dict(keep_vars=True)``,
    where :func:`loads_by_copy` holds) when keys and shapes match, else ``module.load_state_dict``."""
    if live is None or live.keys() != state.keys() or any(live[k].shape != v.shape for k, v in state.items()):
        module.load_state_dict(state)
        return
    targets = list(live.values())
    with torch.no_grad():
        torch._foreach_copy_(targets, [state[k] for k in live])
