"""Which positions of a sequence an intervention acts on (``positions=``; the rules are in the
package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mci_interp.models import HookContext

PositionRule = Literal["all", "prompt", "generated"] | slice | Sequence[int]


def _check_positions(positions: Any) -> None:
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(
                f"unknown positions {positions!r}; use 'all', 'prompt', 'generated', a slice or a "
                "list of ints"
            )
        return
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and (not isinstance(part, int) or isinstance(part, bool)):
                raise ValueError(f"positions slice {positions!r} must have int bounds")
        if positions.step is not None and positions.step <= 0:
            raise ValueError(f"positions slice {positions!r} needs a positive step")
        return
    if isinstance(positions, Sequence) and not isinstance(positions, (str, bytes)):
        if len(positions) == 0:
            raise ValueError("positions is an empty list; give at least one position or use 'all'")
        bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool)]
        if bad:
            raise ValueError(f"positions must be ints, got {bad[:3]!r}")
        return
    raise ValueError(
        f"positions={positions!r} is not understood; use 'all', 'prompt', 'generated', a slice or "
        "a list of ints"
    )


def _freeze_positions(positions: Any) -> Any:
    if isinstance(positions, (str, slice)):
        return positions
    if isinstance(positions, Sequence):
        return tuple(positions)
    return positions


def position_mask(
    positions: PositionRule, ctx: HookContext, n: int, *, device: torch.device | str | None = None
) -> Tensor | None:
    """Boolean ``[n]`` mask (on ``device``) of the current chunk's positions an intervention acts
    on; None = all."""
    if isinstance(positions, str) and positions == "all":
        return None
    if isinstance(positions, str):
        if ctx.prompt_len is None:  # a plain forward pass: everything is prompt
            return (
                None if positions == "prompt" else torch.zeros(n, dtype=torch.bool, device=device)
            )
        absolute = torch.arange(ctx.past_len, ctx.past_len + n, device=device)
        if positions == "prompt":
            return absolute < ctx.prompt_len
        return absolute >= ctx.prompt_len
    length = ctx.prompt_len if ctx.prompt_len is not None else ctx.past_len + n
    if isinstance(positions, slice):
        wanted = list(range(length)[positions])
    else:
        wanted = []
        for p in positions:
            q = p + length if p < 0 else p
            if not 0 <= q < length:
                raise ValueError(
                    f"position {p} is outside the prompt of length {length}; use positions within "
                    f"-{length}..{length - 1}"
                )
            wanted.append(q)
    flags = [False] * n
    for q in wanted:  # a few ints: built on the host, one small copy to the device
        if 0 <= q - ctx.past_len < n:
            flags[q - ctx.past_len] = True
    return torch.tensor(flags, dtype=torch.bool, device=device)
