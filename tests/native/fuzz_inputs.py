"""What the boundary fuzzer draws: sizes, tensors in every layout torch can make, bad variants.

`Draw` reads its choices from atheris' FuzzedDataProvider, or from a seeded `random.Random`
where atheris is not installed. Its first option is always the plain, valid one, and an exhausted
input keeps choosing it, so that mutations of the input reach the bad variants one at a time.
"""

from __future__ import annotations

import random

import torch


class Draw:
    """The fuzzer's choices, from a FuzzedDataProvider or a `random.Random`."""

    def __init__(self, source):
        self._source = source

    def int(self, lo: int, hi: int) -> int:
        if isinstance(self._source, random.Random):
            return self._source.randint(lo, hi)
        return self._source.ConsumeIntInRange(lo, hi)

    def odds(self, n: int) -> bool:
        """True about once in ``n`` draws."""
        return self.int(0, n - 1) == n - 1

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.int(0, 2 ** 31 - 1))


# Values of an int argument that the boundary must refuse (or, for 2**63 and up, not overflow on).
BAD_INTS = [-1, 0, -(1 << 63), (1 << 63) - 1, 1 << 63, 1 << 70, (1 << 20) + 1, 1 << 40]
# Things that are not tensors, in place of one.
NOT_TENSORS = [[[0.0, 1.0]], 3.0, "tensor", object()]   # (None is "absent" for optional arguments)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in memory starting one byte past an element boundary (torch.frombuffer allows it)."""
    if t.element_size() == 1 or t.numel() == 0:
        return t
    raw = bytearray(t.numel() * t.element_size() + 1)
    out = torch.frombuffer(raw, dtype=t.dtype, offset=1, count=t.numel()).view(t.shape)
    out.copy_(t)
    return out


# The kinds of `relayout`: same values in other layouts, then one with other values, then refused.
SAME, TRANSPOSED, STRIDED, OFFSET, EXPANDED, MISALIGNED, META, NOT_TENSOR = range(8)
CONTIGUOUS_KINDS = {SAME, OFFSET}                                      # accepted where contiguous is required
COPIED_KINDS = {SAME, TRANSPOSED, STRIDED, OFFSET, EXPANDED, MISALIGNED}  # accepted where the engine copies


def relayout(draw: Draw, t: torch.Tensor, *, bad: int = 12):
    """``(t in a layout the draw picks, its kind)``; about once in ``bad`` draws a refused kind.

    Same values: contiguous, transposed storage, a strided slice of a larger tensor, a storage
    offset. Other values (the oracle reads what is passed): expanded from index 0 of a dim
    (stride 0). Misaligned: copied or refused. Refused everywhere: on the meta device, not a tensor.
    """
    kind = draw.int(SAME, EXPANDED) if not draw.odds(bad) else draw.int(MISALIGNED, NOT_TENSOR)
    if t.numel() == 0 and kind < META:   # no elements: every layout is the same one
        return t, SAME
    if kind == TRANSPOSED and t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1:
        return t.transpose(0, 1).contiguous().transpose(0, 1), kind
    if kind == STRIDED and t.numel() > 1:
        big = torch.zeros([2 * n + 1 for n in t.shape], dtype=t.dtype)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view, kind
    if kind == OFFSET:
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        view = flat[3:].view(t.shape)
        view.copy_(t)
        return view, kind
    if kind == EXPANDED and t.dim() >= 1:
        sizes = [d for d in range(t.dim()) if t.shape[d] > 1]
        if sizes:
            dim = draw.pick(sizes)
            return t.narrow(dim, 0, 1).expand(t.shape), kind
    if kind == MISALIGNED and t.numel() > 0 and t.element_size() > 1:
        return misaligned(t), kind
    if kind == META:
        return t.to("meta"), kind
    if kind == NOT_TENSOR:
        return draw.pick(NOT_TENSORS), kind
    return t, SAME


def redtype(draw: Draw, t, plain: torch.dtype, others, *, bad: int = 10):
    """``(t in plain dtype or, about once in bad draws, in one of others, whether it is plain)``."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not draw.odds(bad):
        return (t.to(plain) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t), True
    return t.to(draw.pick(others)), False


def reshape_bad(draw: Draw, t):
    """A tensor of a wrong shape for ``t``: a dim more, a dim less, one size off by one."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return t
    choice = draw.int(0, 2)
    if choice == 0:
        return t.unsqueeze(-1)
    if choice == 1 and t.dim() >= 1:
        return torch.zeros(t.shape[:-1], dtype=t.dtype)
    shape = list(t.shape) or [1]
    shape[draw.int(0, len(shape) - 1)] += 1
    return torch.zeros(shape, dtype=t.dtype)


def routing(draw: Draw, T: int, k: int, E: int, g: torch.Generator):
    """``(ids [T, k], weights [T, k], valid)``: distinct experts per row, the skip sentinel E
    anywhere, positive and negative weights; about once in 8 draws one bad id (out of range or
    repeated) or a non-finite weight."""
    rows = []
    for _ in range(T):
        row = torch.randperm(E, generator=g)[:k].tolist()
        row += [E] * (k - len(row))
        rows.append([E if draw.odds(5) else e for e in row])
    ids = torch.tensor(rows, dtype=torch.long).reshape(T, k)
    w = torch.rand(T, k, generator=g) * 2 - 0.5
    if not (T and draw.odds(8)):
        return ids, w, True
    t, j = draw.int(0, T - 1), draw.int(0, k - 1)
    choice = draw.int(0, 2)
    if choice == 0:
        ids[t, j] = draw.pick([E + 1, -1, 1 << 40, -(1 << 62)])
    elif choice == 1 and k > 1:
        ids[t, (j + 1) % k] = ids[t, j] = min(int(ids[t, j]), E - 1)
    else:
        w[t, j] = draw.pick([float("nan"), float("inf"), -float("inf")])
    return ids, w, False
