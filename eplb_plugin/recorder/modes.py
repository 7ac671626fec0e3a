"""One class per recorder mode, registered under SGLang's mode names in ``MODES``.

A mode receives each recorded pass's ``[L, P]`` int32 device counts at the pass boundary
(``on_pass_end``), keeps what its mode keeps, and builds the dump (the ``RecorderMode``
protocol). Each states its facts: whether its window feeds rebalancing, whether its hooks
only count (so a pass can run as a CUDA graph), and where its counts come from. ``stat`` and
``stat_approx`` differ only in the last. A mode reads the recorder's ``RecorderSpec`` and
``MapEpochs`` (``spec.py``), never the recorder.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.distributed as dist

from eplb_plugin.balance import balancedness, gpu_loads
from eplb_plugin.errors import ConfigError, EPLBError
from eplb_plugin.recorder import dump as dump_io
from eplb_plugin.recorder.spec import MapEpochs, RecorderSpec
from eplb_plugin.recorder.window import CountWindow, physical_to_logical
from eplb_plugin.registry import Registry

# Which hooks count a mode's slots: the router's choices after dispatch (``on_select_experts``)
# or the dispatcher's per-slot receive counts (DeepEP's, or the runtime's).
CountSource = Literal["select_experts", "dispatch"]
GATHERER_KEY = "primary"  # SGLang's single-pass gatherer key, kept in per-pass records


def _all_reduce(tensor: torch.Tensor, group: Any) -> None:
    """Sum over the group in place; returns early with no group or one rank."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _wait_for_device(device: torch.device) -> None:
    if device.type == "cuda":
        # Dumps read records copied with non_blocking=True at pass ends; wait for those
        # copies once here (an operator action), never per pass.
        torch.cuda.synchronize(device)


class RecorderMode(Protocol):
    """What the recorder asks of a mode. feeds_rebalancing: its window holds per-pass counts
    a rebalance plans from; graph_safe: its hooks only count on the device (a pass can run
    as a CUDA graph); count_source: where its counts come from by default; token_rows: it
    keeps each pass's token rows (sized by the most tokens a pass can hold)."""

    name: ClassVar[str]
    feeds_rebalancing: ClassVar[bool]
    graph_safe: ClassVar[bool]
    count_source: ClassVar[CountSource]
    token_rows: ClassVar[bool]

    def __init__(self, spec: RecorderSpec, maps: MapEpochs) -> None: ...
    def on_pass_start(self, forward_batch: Any) -> None: ...
    def on_topk(self, layer: int, topk_ids: torch.Tensor) -> None: ...
    def set_num_tokens(self, num_tokens: int) -> None: ...
    def on_pass_end(self, forward_pass_id: int, pass_counts: torch.Tensor, epoch: int) -> None: ...
    def referenced_epochs(self) -> set[int]: ...
    def reset(self) -> None: ...
    def logical_count_window(self) -> torch.Tensor: ...
    def physical_count_window(self) -> torch.Tensor: ...
    def dump(self, output_mode: str, name: str | None) -> Any: ...


MODES: Registry[type[RecorderMode]] = Registry("recorder mode")


class _Mode:
    """What the modes share: the recorder's spec and maps, the default facts, and hooks that
    do nothing unless a mode overrides them."""

    feeds_rebalancing: ClassVar[bool] = False
    graph_safe: ClassVar[bool] = True
    count_source: ClassVar[CountSource] = "select_experts"
    token_rows: ClassVar[bool] = False

    def __init__(self, spec: RecorderSpec, maps: MapEpochs):
        self._spec, self._maps = spec, maps

    def on_pass_start(self, forward_batch: Any) -> None:
        pass

    def on_topk(self, layer: int, topk_ids: torch.Tensor) -> None:
        pass

    def set_num_tokens(self, num_tokens: int) -> None:
        pass


@MODES.register
class StatMode(_Mode):
    """``stat`` / ``stat_approx``: ring buffer of per-pass counts with map epochs, optional EMA.

    Dump (rank 0 writes): ``{"rank", "logical_count": int32 [B, L, E] (oldest pass first,
    summed over ranks, each pass mapped by the map live when it ran),
    "average_utilization_rate_over_window": float | None}``. The utilization is the mean over
    held passes of per-pass balancedness (``eplb_plugin.balance``) of the rank-summed GPU loads;
    None when ``ep_size == 1`` or no pass is held (SGLang gives None when it does not track it).
    """

    name: ClassVar[str] = "stat"
    feeds_rebalancing: ClassVar[bool] = True

    def __init__(self, spec: RecorderSpec, maps: MapEpochs):
        super().__init__(spec, maps)
        self.window = CountWindow(spec.buffer_size, spec.num_layers, spec.num_physical_experts, spec.device)
        self.ema: torch.Tensor | None = None
        if spec.decay is not None:
            self.ema = torch.zeros((spec.num_layers, spec.num_logical_experts), dtype=torch.float32, device=spec.device)

    def on_pass_end(self, forward_pass_id: int, pass_counts: torch.Tensor, epoch: int) -> None:
        self.window.append(pass_counts, epoch)
        if self.ema is not None:
            decay = self._spec.decay
            assert decay is not None  # ema exists only with a decay
            logical = physical_to_logical(pass_counts, self._maps.live, self._spec.num_logical_experts)
            self.ema.mul_(decay).add_(logical, alpha=1.0 - decay)

    def referenced_epochs(self) -> set[int]:
        return self.window.referenced_epochs()

    def reset(self) -> None:
        self.window.reset()
        if self.ema is not None:
            self.ema.zero_()

    def logical_count_window(self) -> torch.Tensor:
        return self.window.logical_sum(self._maps.by_epoch, self._spec.num_logical_experts)

    def physical_count_window(self) -> torch.Tensor:
        return self.window.physical_sum()

    def logical_count_passes(self) -> torch.Tensor:
        return self.window.logical_rows(self._maps.by_epoch, self._spec.num_logical_experts)

    def dump(self, output_mode: str, name: str | None) -> Any:
        rec = self._spec
        logical = self.window.logical_rows(self._maps.by_epoch, rec.num_logical_experts)
        _all_reduce(logical, rec.group)
        utilization = None
        if rec.ep_size > 1 and self.window.num_passes > 0:
            loads = gpu_loads(self.window.physical_rows(), rec.ep_size)  # [n, L, ep] float64
            _all_reduce(loads, rec.group)
            utilization = balancedness(loads)
        output = {
            "rank": rec.rank,
            "logical_count": logical.to(device="cpu", dtype=torch.int32),
            "average_utilization_rate_over_window": utilization,
        }
        if output_mode == "object":
            return output
        path, refused = None, None
        if rec.rank == 0:
            try:
                path = dump_io.write_dump(output, dump_io.default_name(None) if name is None else name, rec.dump_dir)
            except (OSError, EPLBError) as exc:  # an unwritable directory, a bad name
                refused = exc
        # Every rank learns whether rank 0 wrote: a refused dump raises on every rank, so no
        # rank resets its window while another keeps it (their next all-reduce would differ).
        failed = torch.tensor([refused is not None], dtype=torch.int32, device=rec.device)
        _all_reduce(failed, rec.group)
        if refused is not None:
            raise refused
        if failed.item():
            raise OSError("rank 0 could not write the stat dump (its reply says why); this rank kept its window")
        return path


@MODES.register
class StatApproxMode(StatMode):
    """``stat_approx``: ``stat`` whose counts come from the dispatcher's per-slot receive
    counts (DeepEP's ``num_recv_tokens_per_expert_list`` / ``masked_m``, or the runtime's)."""

    name: ClassVar[str] = "stat_approx"
    count_source: ClassVar[CountSource] = "dispatch"


@MODES.register
class PerPassMode(_Mode):
    """``per_pass``: every recorded pass's ``[L, P]`` counts, copied to host memory without
    blocking at the pass's end (as SGLang's detail accumulator keeps them on the host).

    Keeps every recorded pass until the dump (SGLang's detail accumulator keeps them all;
    ``buffer_size`` bounds only the stat window): ``L * P * 4`` bytes of host memory each,
    none of the device's.
    Dump (every rank writes): ``{"records": [{"forward_pass_id", "rank",
    "gatherer_key", "global_physical_count": int32 [L, P], "physical_to_logical_map_epoch"}],
    "last_physical_to_logical_map": [L, P], "physical_to_logical_map_by_epoch": {epoch: [L, P]}}``
    (the last two keys beyond SGLang's let a reader map each record with its own map).
    """

    name: ClassVar[str] = "per_pass"

    def __init__(self, spec: RecorderSpec, maps: MapEpochs):
        super().__init__(spec, maps)
        self.records: list[dict[str, Any]] = []

    def _record(self, forward_pass_id: int, counts: torch.Tensor, epoch: int) -> dict[str, Any]:
        """One pass's record; ``counts`` is kept as given (a copy of the pass's buffer)."""
        return {
            "forward_pass_id": forward_pass_id,
            "rank": self._spec.rank,
            "gatherer_key": GATHERER_KEY,
            "global_physical_count": counts,
            "physical_to_logical_map_epoch": epoch,
        }

    def on_pass_end(self, forward_pass_id: int, pass_counts: torch.Tensor, epoch: int) -> None:
        self.records.append(self._record(forward_pass_id, _to_host(pass_counts), epoch))

    def referenced_epochs(self) -> set[int]:
        return {r["physical_to_logical_map_epoch"] for r in self.records}

    def reset(self) -> None:
        self.records.clear()

    def logical_count_window(self) -> torch.Tensor:
        raise ConfigError(f"logical_count_window needs recorder mode 'stat' or 'stat_approx' (got {self.name!r})")

    physical_count_window = logical_count_window

    def dump(self, output_mode: str, name: str | None) -> Any:
        rec, maps = self._spec, self._maps
        _wait_for_device(rec.device)
        records = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in self.records]
        output = {
            "records": records,
            "last_physical_to_logical_map": maps.live.cpu(),
            "physical_to_logical_map_by_epoch": {
                e: maps.by_epoch[e].cpu() for e in sorted(self.referenced_epochs() | {maps.epoch})
            },
        }
        if output_mode == "object":
            return output
        return dump_io.write_dump(output, dump_io.default_name(rec.rank) if name is None else name, rec.dump_dir)


@MODES.register
class PerTokenMode(PerPassMode):
    """``per_token``: per_pass plus each pass's physical ``topk_ids`` per layer.

    Device memory is bounded: one ``[L, max_tokens_per_pass, top_k]`` int32 buffer (-1 =
    no id), reused every pass; each recorded pass is copied to host memory without blocking
    (``[L, T, top_k]`` int32 per record, every record kept until the dump). Under CUDA
    graphs the pass's token count comes from ``forward_batch.input_ids`` or ``num_tokens``.
    Records also carry SGLang's ``input_ids``, ``positions``, ``extend_seq_lens`` and
    ``forward_mode`` keys (ids and positions as host tensors, not lists: no host sync).
    """

    name: ClassVar[str] = "per_token"
    graph_safe: ClassVar[bool] = False  # each pass's ids are also copied to the host
    token_rows: ClassVar[bool] = True

    def __init__(self, spec: RecorderSpec, maps: MapEpochs):
        super().__init__(spec, maps)
        self.topk_ids_of_layer = torch.full(
            (spec.num_layers, spec.max_tokens_per_pass, spec.top_k), -1, dtype=torch.int32, device=spec.device
        )
        self._tokens = 0
        self._metadata: dict[str, Any] = {}

    def on_pass_start(self, forward_batch: Any) -> None:
        self._tokens = 0
        self._metadata = {}
        input_ids = getattr(forward_batch, "input_ids", None)
        if isinstance(input_ids, torch.Tensor):
            self._tokens = input_ids.shape[0]
            self._metadata["input_ids"] = _to_host(input_ids)
            positions = getattr(forward_batch, "positions", None)
            if isinstance(positions, torch.Tensor):
                self._metadata["positions"] = _to_host(positions)
        # SGLang's per_token record keys: host values its scheduler already holds.
        if forward_batch is not None:
            self._metadata["extend_seq_lens"] = getattr(forward_batch, "extend_seq_lens_cpu", None)
            mode = getattr(forward_batch, "forward_mode", None)
            self._metadata["forward_mode"] = getattr(mode, "value", mode)

    def on_topk(self, layer: int, topk_ids: torch.Tensor) -> None:
        tokens, top_k = topk_ids.shape
        if tokens > self.topk_ids_of_layer.shape[1] or top_k > self.topk_ids_of_layer.shape[2]:
            raise ConfigError(
                f"per_token recorder got topk_ids {tuple(topk_ids.shape)} but holds at most "
                f"max_tokens_per_pass={self.topk_ids_of_layer.shape[1]} x top_k={self.topk_ids_of_layer.shape[2]}; "
                "raise max_tokens_per_pass / top_k"
            )
        self.topk_ids_of_layer[layer, :tokens, :top_k].copy_(topk_ids)
        self._tokens = max(self._tokens, tokens)

    def set_num_tokens(self, num_tokens: int) -> None:
        self._tokens = num_tokens

    def on_pass_end(self, forward_pass_id: int, pass_counts: torch.Tensor, epoch: int) -> None:
        record = self._record(forward_pass_id, _to_host(pass_counts), epoch)
        record["topk_ids_of_layer"] = _to_host(self.topk_ids_of_layer[:, : self._tokens])
        record.update(self._metadata)
        self.records.append(record)
        self.topk_ids_of_layer[:, : self._tokens].fill_(-1)
        self._tokens = 0


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy; from CUDA, into pinned memory without blocking (valid after a sync)."""
    if not t.is_cuda:
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

