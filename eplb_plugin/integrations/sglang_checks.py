"""Start-up checks of the SGLang adapter: what would otherwise fail at the first forward pass.

SGLang builds the recorder (``ExpertDistributionRecorder.init_new``) and the manager
(``EPLBManager(...)``) in ``ModelRunner.initialize()``, before the model is loaded. Every
check that needs only flags and the process layout runs there, so a launch the plugin
cannot serve stops at start-up with a ``ConfigError`` naming the flag and the fix, instead
of raising inside ``on_forward_pass_end`` (which kills SGLang's scheduler). The weights
exist only after ``load_model()``: ``check_movable_weights`` runs when the adapter first
sees them, and a failure there disables rebalancing (the server keeps serving).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from eplb_plugin.errors import ConfigError
from eplb_plugin.integrations.sglang_common import DISPATCH_FLAG, is_plugin_dispatch
from eplb_plugin.recorder.modes import MODES

# the recorder modes the manager can plan from
COUNTING_MODES = tuple(name for name in MODES.names() if MODES.get(name).feeds_rebalancing)
# SGLang's DeepGEMM mega gate maps ids itself, with the even spread for any name but static.
MEGA_GATE_ENV = "SGLANG_OPT_DEEPGEMM_MEGA_GATE"


def check_algorithm(eplb_algorithm: str, ep_dispatch_algorithm: str | None) -> str:
    """The policy the manager will plan with; ConfigError for a name SGLang knows and the
    plugin's manager does not (``elasticity_aware``, ``deepseek_vec_hierarchical``)."""
    from eplb_plugin.algorithms import ALGORITHMS, resolve_algorithm

    try:
        return resolve_algorithm(eplb_algorithm)
    except ConfigError as exc:
        known = ", ".join(("auto", *ALGORITHMS))
        raise ConfigError(
            f"--eplb-algorithm {eplb_algorithm!r} is not a policy the eplb_plugin manager plans with "
            f"(it replaces SGLang's EPLBManager); use one of: {known}, or turn the plugin off "
            f"(EPLB_PLUGIN_ENABLE=0) to keep SGLang's own manager"
        ) from exc


def sglang_auto_algorithm(num_groups: int | None, num_nodes: int) -> str:
    """The policy SGLang's ``--eplb-algorithm auto`` stands for: SGLang's ``compute_algorithm``
    asked (deepseek_hierarchical where the model's expert groups divide over the nodes, else
    deepseek, in 0.5.23), so ``auto`` keeps SGLang's meaning under the plugin."""
    from sglang.srt.eplb.eplb_algorithms import compute_algorithm

    return compute_algorithm("auto", num_groups, num_nodes).name


def check_recorder_mode(mode: str | None) -> None:
    """``--enable-eplb`` plans from summed counts: only the stat modes keep them."""
    if mode is not None and mode not in COUNTING_MODES:
        raise ConfigError(
            f"--enable-eplb with --expert-distribution-recorder-mode {mode}: the manager plans from "
            f"the counts of a stat window, which only {COUNTING_MODES} keep; drop the flag (SGLang "
            "then records in stat mode) or record per_pass / per_token without --enable-eplb"
        )


def check_count_source(mode: str | None, moe_a2a_backend: str | None) -> None:
    """``stat_approx`` counts the all-to-all dispatcher's receive counts; without an
    all-to-all backend no hook delivers them and nothing would ever be counted."""
    if mode in MODES.names() and MODES.get(mode).count_source == "dispatch" and moe_a2a_backend in (None, "none"):
        raise ConfigError(
            "--expert-distribution-recorder-mode stat_approx counts the tokens an all-to-all backend "
            "dispatches, but --moe-a2a-backend is 'none' (nothing would be counted and no rebalance "
            "would run; SGLang refuses it too); use --expert-distribution-recorder-mode stat, or set "
            "--moe-a2a-backend deepep"
        )


def check_dispatch_algorithm(name: str | None, environ: Mapping[str, str]) -> None:
    """Start-up refusal of a plugin dispatch that a SGLang fast path would bypass."""
    if is_plugin_dispatch(name) and environ.get(MEGA_GATE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"{DISPATCH_FLAG} {name} with {MEGA_GATE_ENV}=1: SGLang's mega gate maps expert ids "
            f"itself (an even spread for any algorithm but static) and would bypass {name}; unset "
            f"{MEGA_GATE_ENV} or choose one of SGLang's algorithms"
        )


def check_parallel_layout(*, world_size: int, ep_size: int, pp_size: int) -> None:
    """The plugin moves weights over SGLang's default group: one EP rank per process."""
    if pp_size > 1:
        raise ConfigError(
            f"--pp-size {pp_size}: the eplb_plugin manager does not support pipeline parallelism "
            "(each stage holds other layers); use --pp-size 1 or turn the plugin off"
        )
    if world_size != ep_size:
        raise ConfigError(
            f"the eplb_plugin manager moves expert weights over SGLang's default process group "
            f"({world_size} ranks), but --ep-size is {ep_size}; set --ep-size equal to --tp-size "
            f"({world_size}) or turn the plugin off"
        )


def check_movable_weights(weights_of_layer: Mapping[int, Sequence[torch.Tensor]], *, num_local_slots: int) -> None:
    """Every routed-expert tensor must be one the mover can write in place: contiguous, with
    dim 0 = this rank's slots. (Layers of different dtypes or shapes are fine: the adapter
    moves each run of like layers in its own call.)"""
    for layer, weights in sorted(weights_of_layer.items()):
        for i, t in enumerate(weights):
            if t.dim() < 1 or t.shape[0] != num_local_slots or not t.is_contiguous():
                raise ConfigError(
                    f"the model's routed_experts_weights_of_layer[{layer}][{i}] has shape "
                    f"{tuple(t.shape)} (contiguous={t.is_contiguous()}): EPLB moves experts in place "
                    f"and needs contiguous tensors with dim 0 = {num_local_slots} local slots; "
                    "rebalancing is off for this server"
                )


def parallel_sizes() -> tuple[int, int]:
    """(world size of the default group, pipeline-parallel size) of this SGLang process."""
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    pp_size = _stamped(parallel, "pp_size", 1)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), pp_size
    return _stamped(parallel, "tp_size", 1) * pp_size, pp_size


def _stamped(parallel: Any, name: str, default: int) -> int:
    """A size from SGLang's parallel context; ``default`` where this launch did not set it."""
    try:
        value = getattr(parallel, name)
    except (AttributeError, ValueError):  # SGLang raises ValueError for an unpublished context
        return default
    return default if value is None else int(value)
