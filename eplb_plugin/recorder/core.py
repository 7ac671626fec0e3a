"""ExpertDistributionRecorder: SGLang 0.5.23's recorder surface over on-device counts.

Every hook adds to one preallocated ``[L, P]`` int32 device buffer (``pass_counts``) with a
Triton kernel on CUDA (torch path on CPU): no host sync, no allocation on the Triton path,
safe under CUDA-graph capture (hooks also count while a graph is being captured, and the
captured kernels keep counting on replay). Only tokens of recorded forward passes count:
hooks outside ``with_forward_pass`` (SGLang's graph capture and its eager warm-ups call the
model directly) count nothing, and the buffer is zeroed when a recorded pass starts (as
SGLang's gatherers reset) and when it ends, after the mode took the pass's counts. The map each pass ran under is kept as a map
epoch, so counts recorded across a rebalance go to the right logical experts.

Two consumers read the counts, independently: the user's dump session (``start_record`` /
``stop_record`` / ``dump_record``, SGLang's endpoints) and, once a manager called
``keep_window_for_eplb()``, the stat window EPLB rebalances on. The EPLB window records
every pass whatever the session does: stopping, starting or dumping a session never empties
or pauses it (else a user's stop would silently stop every automatic rebalance). Without a
bound (``buffer_size`` -1) it is emptied at each rebalance (``eplb_window_gathered``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from eplb_plugin.counts import check_routed_ids
from eplb_plugin.errors import ConfigError, CountsError, PlacementError, UsageError
from eplb_plugin.kernels import count_topk
from eplb_plugin.recorder.modes import MODES, RecorderMode, StatMode
from eplb_plugin.recorder.spec import MapEpochs, RecorderSpec
from eplb_plugin.recorder.window import UNBOUNDED

DEFAULT_BUFFER_SIZE_PASSES = 1000  # SGLang's default rebalance interval, in passes
DEFAULT_MAX_TOKENS_PER_PASS = 8192  # per_token: tokens one pass may record per layer
DEFAULT_TOP_K = 8  # per_token: ids per token kept (DeepSeek-V3's top-k, as SGLang)

CountSource = Literal["auto", "select_experts", "dispatch"]
OutputMode = Literal["file", "object"]


class ExpertDistributionRecorder:
    """Records which physical slots each MoE layer's tokens go to, per forward pass.

    mode: "stat" | "stat_approx" | "per_pass" | "per_token" (SGLang's meanings).
    physical_to_logical_map: [L, P] int, logical expert of each slot (live map; copied).
    num_logical_experts: E.
    buffer_size: passes the stat window keeps; -1 = without bound (per_pass and per_token
        keep every pass until the dump, as SGLang does).
    device: where counts live (default: the map's device).
    rank, ep_size: this rank and the EP size (slots are rank-major, P / ep_size per rank).
    decay: if set (0 <= decay < 1), stat modes keep ``logical_count_ema`` [L, E] float32,
        ``ema = decay * ema + (1 - decay) * pass_logical_count``.
    group: process group summed over by stat dumps (None or one rank: no communication).
    count_source: which hooks count: "select_experts" (``on_select_experts``) or "dispatch"
        (DeepEP receive counts / ``masked_m``); "auto" = the mode's own (``RecorderMode.count_source``:
        dispatch for stat_approx).
    backend: kernel backend, "auto" | "triton" | "torch".
    """

    def __init__(
        self,
        mode: str,
        *,
        physical_to_logical_map: torch.Tensor,
        num_logical_experts: int,
        buffer_size: int = DEFAULT_BUFFER_SIZE_PASSES,
        device: torch.device | str | None = None,
        rank: int = 0,
        ep_size: int = 1,
        decay: float | None = None,
        group: Any = None,
        dump_dir: str | os.PathLike | None = None,
        count_source: CountSource = "auto",
        backend: str = "auto",
        max_tokens_per_pass: int = DEFAULT_MAX_TOKENS_PER_PASS,
        top_k: int = DEFAULT_TOP_K,
    ):
        if mode not in MODES:
            raise ConfigError(f"recorder mode={mode!r} is not one of {MODES.names()}")
        mode_type = MODES.get(mode)
        if buffer_size != UNBOUNDED and buffer_size < 1:
            raise ConfigError(f"buffer_size={buffer_size} must be >= 1 or -1 (without bound)")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay} must be in [0, 1) or None")
        if count_source not in ("auto", "select_experts", "dispatch"):
            raise ConfigError(f"count_source={count_source!r} is not one of ('auto', 'select_experts', 'dispatch')")
        self._check_map(physical_to_logical_map, num_logical_experts, expected_shape=None)
        num_layers, num_physical = physical_to_logical_map.shape
        if ep_size < 1 or num_physical % ep_size or not 0 <= rank < ep_size:
            raise ConfigError(f"ep_size={ep_size} must divide num_physical_experts={num_physical} and 0 <= rank={rank} < ep_size")
        self.mode = mode
        self.num_layers, self.num_physical_experts = num_layers, num_physical
        self.num_logical_experts = num_logical_experts
        self.buffer_size, self.rank, self.ep_size = buffer_size, rank, ep_size
        self.decay, self.group, self.dump_dir, self.backend = decay, group, dump_dir, backend
        self.max_tokens_per_pass, self.top_k = max_tokens_per_pass, top_k
        self.device = torch.device(device) if device is not None else physical_to_logical_map.device
        source = mode_type.count_source if count_source == "auto" else count_source
        self._count_dispatch = source == "dispatch"
        self._mode_type = mode_type
        self.spec = RecorderSpec(
            num_layers=num_layers, num_physical_experts=num_physical, num_logical_experts=num_logical_experts,
            buffer_size=buffer_size, device=self.device, rank=rank, ep_size=ep_size, decay=decay, group=group,
            dump_dir=dump_dir, max_tokens_per_pass=max_tokens_per_pass, top_k=top_k,
        )
        self.maps = MapEpochs(physical_to_logical_map.to(self.device, copy=True))
        self.pass_counts = torch.zeros((num_layers, num_physical), dtype=torch.int32, device=self.device)
        # The user's dump session; None until a session needs it.
        self._mode: RecorderMode | None = mode_type(self.spec, self.maps)
        self._eplb_window: StatMode | None = None  # the window EPLB rebalances on (keep_window_for_eplb)
        self._recording = False  # the user's session records
        self._in_pass = False  # inside a recorded forward pass
        self._disabled = False
        self._layer: int | None = None
        # The layer whose slots a dispatcher's kernel adds as it maps them (select_counts_buffer
        # handed out the buffer for it): the next on_select_experts, if for that layer, counts nothing.
        self._counted_layer: int | None = None
        self._is_cuda = self.device.type == "cuda"

    @classmethod
    def from_metadata(cls, metadata: Any, rank: int, *, mode: str, **kwargs: Any) -> ExpertDistributionRecorder:
        """Build from an SGLang ``ExpertLocationMetadata`` (its map, E and ep_size)."""
        return cls(
            mode,
            physical_to_logical_map=metadata.physical_to_logical_map,
            num_logical_experts=metadata.num_logical_experts,
            rank=rank,
            ep_size=metadata.ep_size,
            **kwargs,
        )

    # ------------------------------------------------------------------ maps
    def _check_map(self, new_map: torch.Tensor, num_logical: int, expected_shape: Sequence[int] | None) -> None:
        if not isinstance(new_map, torch.Tensor) or new_map.dim() != 2 or new_map.dtype.is_floating_point:
            raise PlacementError("physical_to_logical_map must be an [L, P] integer tensor")
        if expected_shape is not None and tuple(new_map.shape) != tuple(expected_shape):
            raise PlacementError(f"physical_to_logical_map has shape {tuple(new_map.shape)}, expected {tuple(expected_shape)}")
        # Values are checked only on CPU maps: checking a device map would sync the host.
        if new_map.device.type == "cpu" and new_map.numel() and (new_map.min() < 0 or new_map.max() >= num_logical):
            raise PlacementError(f"physical_to_logical_map holds experts outside [0, {num_logical})")

    @property
    def physical_to_logical_map(self) -> torch.Tensor:
        """The live map, [L, P] on the recorder's device."""
        return self.maps.live

    @property
    def map_epoch(self) -> int:
        return self.maps.epoch

    @property
    def maps_by_epoch(self) -> dict[int, torch.Tensor]:
        return self.maps.by_epoch

    def set_physical_to_logical_map(self, new_map: torch.Tensor) -> None:
        """Start a new map epoch (call at a pass boundary, after a rebalance). The map is copied."""
        self._check_map(new_map, self.num_logical_experts, (self.num_layers, self.num_physical_experts))
        self.maps.advance(new_map.to(self.device, copy=True))
        self._prune_maps()

    def _prune_maps(self) -> None:
        """Keep the live map and those some held pass (session or EPLB window) was recorded under."""
        keep: set[int] = set()
        for mode in (self._mode, self._eplb_window):
            if mode is not None:
                keep |= mode.referenced_epochs()
        self.maps.keep_only(keep)

    # ------------------------------------------------------------- contexts
    @contextlib.contextmanager
    def _setting(self, name: str, value: Any) -> Iterator[None]:
        """Attribute ``name`` holds ``value`` inside the block, its previous value after."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)

    def with_current_layer(self, layer_idx: int) -> contextlib.AbstractContextManager[None]:
        return self._setting("_layer", layer_idx)

    @contextlib.contextmanager
    def with_debug_name(self, debug_name: str) -> Iterator[None]:
        yield

    def disable_this_region(self) -> contextlib.AbstractContextManager[None]:
        return self._setting("_disabled", True)

    @contextlib.contextmanager
    def counts_discarded(self) -> Iterator[None]:
        """The hooks run inside the block (kernels compile, a CUDA graph captures them), but
        what they count there is dropped at its end: passes run to warm up or capture a
        graph are not traffic."""
        saved = self.pass_counts.clone()
        try:
            yield
        finally:
            self.pass_counts.copy_(saved)

    @contextlib.contextmanager
    def with_forward_pass(
        self, forward_pass_id: int, forward_batch: Any = None, *, num_tokens: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """One forward pass; at its end the pass's counts go to the recording session's mode
        and to the EPLB window, if any."""
        outputs: dict[str, Any] = {}
        recording = self.recording  # the user's session or EPLB's window
        session = self._recording
        self._counted_layer = None  # a count handed out for another pass's hook is not this pass's
        if recording:
            self.pass_counts.zero_()  # nothing counted before the pass is the pass's
        if session:
            self._session().on_pass_start(forward_batch)
        try:
            with self._setting("_in_pass", recording):
                yield outputs
        finally:
            self._counted_layer = None
            session = session and self._recording
            if session:
                if num_tokens is not None:
                    self._session().set_num_tokens(num_tokens)
                self._session().on_pass_end(forward_pass_id, self.pass_counts, self.map_epoch)
            if self._eplb_window is not None:
                self._eplb_window.on_pass_end(forward_pass_id, self.pass_counts, self.map_epoch)
            if session or self._eplb_window is not None:
                self.pass_counts.zero_()

    # ---------------------------------------------------------------- hooks
    def _active_layer(self, layer_idx: int | None) -> int | None:
        """The layer to count into, or None when this hook should do nothing."""
        if self._disabled:
            return None
        if not ((self.recording and self._in_pass) or (self._is_cuda and torch.cuda.is_current_stream_capturing())):
            return None  # warm-ups and other calls outside a recorded pass are not traffic
        layer = self._layer if layer_idx is None else layer_idx
        if layer is None:
            raise ConfigError("recorder hook called outside with_current_layer(...) and without layer_idx")
        self._check_layer(layer)
        return layer

    def _check_layer(self, layer: Any) -> None:
        """Raise UsageError unless ``layer`` is an int (not a bool) in [0, L) (a Python check:
        no tensor is read, so it runs on every device)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise UsageError(f"layer_idx={layer!r} is outside [0, num_layers={self.num_layers}); expected an int layer index")

    def on_select_experts(self, topk_ids: torch.Tensor, *, layer_idx: int | None = None) -> None:
        """topk_ids: [T, k] int32/int64 physical slot ids after dispatch; -1 = padding. Where
        ``select_counts_buffer`` handed out this layer since the last hook, the dispatcher's
        kernel added them to it as it mapped them (the runtime's and SGLang's mapping alike),
        so only the mode sees them.

        Raises UsageError for a layer outside [0, L) and, on CPU tensors only (reading a CUDA
        tensor would sync the host inside a captured graph), for a slot id outside [-1, P)."""
        noted, self._counted_layer = self._counted_layer, None
        layer = self._active_layer(layer_idx)
        if layer is None:
            return
        if not isinstance(topk_ids, torch.Tensor):
            raise UsageError(f"topk_ids must be a torch.Tensor of slot ids (got {type(topk_ids).__name__})")
        check_routed_ids(topk_ids, self.num_physical_experts, what="slot", layer=layer)  # CPU tensors only
        if not self._count_dispatch and noted != layer:
            count_topk(topk_ids, self.pass_counts, layer, backend=self.backend)
        if self._mode is not None:
            self._mode.on_topk(layer, topk_ids)

    def _add_local_counts(self, layer: int, local_counts: torch.Tensor) -> None:
        """Add [P / ep_size] counts to this rank's slots of ``layer``. UsageError for another
        length; CountsError for a negative count, on CPU tensors only (no host sync)."""
        per_rank = self.num_physical_experts // self.ep_size
        if tuple(local_counts.shape) != (per_rank,):
            raise UsageError(
                f"dispatch hook got {local_counts.shape[0] if local_counts.dim() else 0} counts (shape "
                f"{list(local_counts.shape)}) for layer {layer}; expected one per local slot: {per_rank} local slots "
                "(P / ep_size)"
            )
        if local_counts.device.type == "cpu" and per_rank and bool((local_counts < 0).any()):
            raise CountsError(f"dispatch hook got negative count {int(local_counts.min())} for layer {layer}")
        start = self.rank * per_rank
        self.pass_counts[layer, start : start + per_rank].add_(local_counts.to(self.device, non_blocking=True))

    def on_deepep_dispatch_normal(
        self,
        local_physical_count_of_layer: list[int],
        num_tokens_per_rank: Any = None,
        num_tokens_per_rdma_rank: Any = None,
        num_tokens_per_expert: Any = None,
        *,
        layer_idx: int | None = None,
    ) -> None:
        """DeepEP normal dispatch: ``num_recv_tokens_per_expert_list`` (host list, one count per
        local slot, each padded up to the expert alignment, hence approximate)."""
        layer = self._active_layer(layer_idx)
        if layer is None or not self._count_dispatch:
            return
        counts = torch.tensor(local_physical_count_of_layer, dtype=torch.int32)
        self._add_local_counts(layer, counts.pin_memory() if self._is_cuda else counts)

    def on_deepep_dispatch_low_latency(
        self, local_physical_count_of_layer: torch.Tensor, *, layer_idx: int | None = None
    ) -> None:
        """DeepEP low-latency dispatch (or the runtime's dispatcher): ``masked_m`` [P / ep_size]
        int, tokens received per local slot, on the device."""
        layer = self._active_layer(layer_idx)
        if layer is None or not self._count_dispatch:
            return
        self._add_local_counts(layer, local_physical_count_of_layer)

    on_dispatch_receive_counts = on_deepep_dispatch_low_latency

    def select_counts_buffer(self, layer_idx: int | None = None) -> torch.Tensor | None:
        """The [L, P] int32 buffer a dispatcher that counts in its own kernel adds this layer's
        slots to (row ``layer_idx``, default the current layer), or None when the hook would
        not count them: recording off, outside a recorded pass, counts taken from the
        dispatcher's receive counts (stat_approx), or ``layer_idx`` not the current layer
        (the hook would count another row). Handing it out notes the layer: its next
        ``on_select_experts`` counts nothing (the modes' per-slot counts are the same; per_token
        still keeps the ids). Under CUDA-graph capture the graph holds the dispatcher's count,
        not the hook's, and replays that."""
        layer = self._active_layer(layer_idx)
        if layer is None or self._count_dispatch or (self._layer is not None and layer != self._layer):
            return None
        self._counted_layer = layer
        return self.pass_counts

    def get_current_pass_count_buffer(self, layer_idx: int) -> torch.Tensor | None:
        """This pass's [P] int32 counts of one layer while recording, else None (SGLang's API).
        UsageError for a layer outside [0, L)."""
        self._check_layer(layer_idx)
        return self.pass_counts[layer_idx] if self.recording else None

    # --------------------------------------------------------------- control
    def _session(self) -> RecorderMode:
        """The user's session mode, built on first use once the EPLB window took the first one."""
        if self._mode is None:
            self._mode = self._mode_type(self.spec, self.maps)
        return self._mode

    def _reset(self) -> None:
        """Forget the user's session (the EPLB window keeps every pass it holds)."""
        if self._eplb_window is None:
            self.pass_counts.zero_()  # with an EPLB window every pass end zeroes it already
        self._session().reset()
        self._prune_maps()

    def keep_window_for_eplb(self) -> None:
        """From now on every pass goes into a stat window of its own that EPLB rebalances on
        (``logical_count_window`` / ``physical_count_window`` read it), whatever the user's
        session does. The manager calls it once at start-up; calling it again does nothing.

        Stat modes only (ConfigError otherwise). The session's window becomes EPLB's when it
        holds nothing, so no second ring buffer is allocated unless a user session records.
        """
        if self._eplb_window is not None:
            return
        if not isinstance(self._mode, StatMode) or not self._mode_type.feeds_rebalancing:
            feeding = [name for name in MODES if MODES.get(name).feeds_rebalancing]
            raise ConfigError(
                f"EPLB rebalances on a stat window, but the recorder mode is {self.mode!r}: "
                f"set --expert-distribution-recorder-mode {' or '.join(feeding)}"
            )
        if self._recording or self._mode.window.num_passes:
            self._eplb_window = StatMode(self.spec, self.maps)  # the session keeps what it recorded
        else:
            self._eplb_window, self._mode = self._mode, None

    def eplb_window_gathered(self) -> None:
        """The manager read the EPLB window for a rebalance. A window without bound
        (``buffer_size`` -1) starts again empty, as SGLang's recorder does when its
        EPLBManager dumps it at each rebalance, so it holds the passes since the last
        rebalance instead of the whole run; a bounded window keeps sliding."""
        if self._eplb_window is not None and self.buffer_size == UNBOUNDED:
            self._eplb_window.reset()
            self._prune_maps()

    def start_record(self) -> None:
        """Start the user's session, forgetting what it recorded before (never the EPLB window)."""
        self._reset()
        self._recording = True

    def stop_record(self) -> None:
        """Stop the user's session (what it recorded stays until the next dump or start). The
        EPLB window, if any, keeps recording."""
        self._recording = False

    def dump_record(self, output_mode: OutputMode = "file", *, name: str | None = None) -> Any:
        """Dump in SGLang's format and reset. Stat modes: every rank must call it (all-reduce).

        output_mode "file": returns the written Path (None on ranks that do not write);
        "object": returns the dict. name: file name inside the dump directory. A dump that
        cannot be written raises OSError (stat modes: on every rank) and resets nothing.
        """
        if output_mode not in ("file", "object"):
            raise ConfigError(f"output_mode={output_mode!r} is not one of ('file', 'object')")
        output = self._session().dump(output_mode, name)
        self._reset()
        return output

    @property
    def recording(self) -> bool:
        """Whether the hooks count: the user's session records or EPLB keeps a window (SGLang's
        dispatchers read this to decide whether to call the hooks)."""
        return self._recording or self._eplb_window is not None

    @property
    def session_recording(self) -> bool:
        """Whether the user's session records (between start_record and stop_record)."""
        return self._recording

    # ------------------------------------------------------- window (manager)
    def _window(self) -> Any:
        """The mode holding the window EPLB reads: its own once kept, else the session's."""
        return self._eplb_window if self._eplb_window is not None else self._session()

    def logical_count_window(self) -> torch.Tensor:
        """Stat modes: [L, E] int64 on the device, the window summed, each pass by its own map."""
        return self._window().logical_count_window()

    def logical_count_passes(self) -> torch.Tensor:
        """Stat modes: [n, L, E] on the device, the window's passes (oldest first), each by its own map."""
        window = self._window()
        if not isinstance(window, StatMode):
            return window.logical_count_window()  # raises: not a stat mode
        return window.logical_count_passes()

    def physical_count_window(self) -> torch.Tensor:
        """Stat modes: [L, P] int64 on the device, the window summed per slot."""
        return self._window().physical_count_window()

    @property
    def logical_count_ema(self) -> torch.Tensor | None:
        """[L, E] float32 exponentially decayed per-pass logical counts (None without ``decay``)."""
        window = self._window()
        return window.ema if isinstance(window, StatMode) else None

    def physical_count_passes(self) -> torch.Tensor:
        """Stat modes: [n, L, P] int64 on the device, the window's passes, oldest first."""
        window = self._window()
        if not isinstance(window, StatMode):
            return window.physical_count_window()  # raises: not a stat mode
        return window.window.physical_rows()

    @property
    def num_passes_in_window(self) -> int:
        window = self._window()
        return window.window.num_passes if isinstance(window, StatMode) else len(window.records)

