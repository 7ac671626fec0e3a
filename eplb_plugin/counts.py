"""The one check of token counts' values (a leaf module: ``ExpertLocation``'s counts
validation and the placement policies' ``plan`` both call it; each keeps its own shape rules),
and of routed ids (the dispatcher's logical ids, the recorder's slot ids, traces' ids)."""

from __future__ import annotations

import torch

from eplb_plugin.errors import CountsError, UsageError


def checked_count_values(count: torch.Tensor, *, source: str | None = None) -> torch.Tensor:
    """Real, finite, non-negative counts -> float64 on CPU, shape kept.

    Raises CountsError naming ``source`` (when given) and, for a negative count, its index.
    """
    prefix = f"{source}: " if source else ""
    if count.dtype == torch.bool or count.is_complex():
        raise CountsError(f"{prefix}logical_count has dtype {count.dtype}; expected real numbers")
    count = count.detach().to(torch.float64).cpu()
    if not torch.isfinite(count).all():
        raise CountsError(f"{prefix}logical_count holds NaN or infinite values")
    if (count < 0).any():
        where = tuple(int(i) for i in (count < 0).nonzero()[0])
        index = "".join(f"[{i}]" for i in where)
        raise CountsError(f"{prefix}logical_count{index} = {float(count[where])} is negative")
    return count


def bucket_passes(rows: torch.Tensor, max_passes: int) -> torch.Tensor:
    """[n, ...] per-pass rows -> at most ``max_passes`` rows, consecutive passes summed into
    equal buckets (``rows`` itself when it has no more)."""
    if rows.shape[0] <= max_passes:
        return rows
    bucket = torch.arange(rows.shape[0]) * max_passes // rows.shape[0]
    return torch.zeros(max_passes, *rows.shape[1:], dtype=rows.dtype).index_add_(0, bucket, rows)


PADDING_ID = -1  # SGLang's topk_ids mark "no expert" with -1; no other negative id is one


def check_routed_ids(ids: torch.Tensor, upper: int, *, what: str, layer: int) -> None:
    """UsageError naming the first of ``ids`` outside [``PADDING_ID``, ``upper``) at ``layer``;
    ``what`` names the ids ("logical expert", "slot"). Reads values on the host, so CUDA
    tensors are not checked (a read would sync inside a captured graph)."""
    if ids.device.type != "cpu" or not ids.numel():
        return
    bad = (ids < PADDING_ID) | (ids >= upper)
    if bool(bad.any()):
        raise UsageError(f"topk_ids holds {what} id {int(ids[bad][0])} at layer {layer}; expected {what} ids in "
                         f"[{PADDING_ID}, {upper}) ({PADDING_ID} = padding)")


def trace_id_problem(smallest: int, largest: int, num_logical: int | None) -> str | None:
    """What is wrong with a trace whose ids run from ``smallest`` to ``largest`` (None: nothing),
    naming the offending id: one below ``PADDING_ID``, else one at or past ``num_logical``."""
    if smallest < PADDING_ID:
        return f"expert id {smallest} is below {PADDING_ID} ({PADDING_ID} marks padding; expert ids are >= 0)"
    if num_logical is not None and largest >= num_logical:
        return f"expert id {largest} is outside [0, {num_logical})"
    return None
