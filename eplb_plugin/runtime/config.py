"""What a runtime run needs: the model's MoE shape, the workload, the runs, the process layout.

One ``RuntimeConfig`` holds what every run of a launch shares (model, batch, device,
HTTP, verification); each ``RunSpec`` is one labelled run (its EPLB flags, workload and
pass count). ``--compare`` is two RunSpecs (EPLB off, then on) over the same processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from eplb_plugin.args import DISPATCH_COUNTS, EPLBArgs, check_dispatch_counts
from eplb_plugin.configs import get_preset
from eplb_plugin.errors import ConfigError
from eplb_plugin.flagspec import flag
from eplb_plugin.kernels import BACKENDS
from eplb_plugin.runtime.moe import EXCHANGES
from eplb_plugin.runtime.workload import (
    DEFAULT_DRIFT_EVERY_PASSES,
    DEFAULT_ZIPF_S,
    WORKLOAD_KINDS,
    SyntheticWorkload,
    TraceWorkload,
    UniformWorkload,
    Workload,
    load_traces,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEVICES = ("cpu", "cuda")
DEFAULT_NUM_PASSES = 300
MAX_PORT = 65535


@dataclass(frozen=True)
class ModelShape:
    """The MoE part of a model: L layers of E experts, top-k routing, FFN sizes H and I."""

    num_layers: int
    num_logical_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_groups: int | None = None

    @classmethod
    def from_preset(
        cls, name: str, *, num_layers: int | None = None, hidden_size: int | None = None,
        intermediate_size: int | None = None,
    ) -> ModelShape:
        """A preset from ``eplb_plugin.configs`` with optional size overrides."""
        overrides = {"--num-layers": num_layers, "--hidden-size": hidden_size,
                     "--moe-intermediate-size": intermediate_size}
        for option, value in overrides.items():
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be >= 1 (got {value})")
        p = get_preset(name)
        shape = cls(
            num_layers=p.num_layers if num_layers is None else num_layers,
            num_logical_experts=p.num_logical_experts,
            top_k=p.top_k,
            hidden_size=p.hidden_size if hidden_size is None else hidden_size,
            intermediate_size=p.moe_intermediate_size if intermediate_size is None else intermediate_size,
            num_groups=p.num_groups if p.num_groups > 1 else None,
        )
        return shape


@dataclass(frozen=True)
class WorkloadSpec:
    """The routing a run serves (each field is a flag: ``flagspec.py``)."""

    kind: str = flag("synthetic (skewed, drifting), trace (replay --trace files), uniform (perfect balance).",
                     name="--workload", choices=WORKLOAD_KINDS, default="synthetic")
    traces: tuple[str, ...] = flag(
        "Per-token .npz (topk_ids [T, L, k]) or SGLang per_token dump .pt; repeatable, concatenated; "
        "needs --workload trace.",
        name="--trace", repeat=True, metavar="PATH", default=(),
    )
    seed: int = flag("Seed of the synthetic workload, activations and weights.", default=0)
    zipf_s: float = flag("Synthetic skew: expert popularity ~ 1/rank^s.", default=DEFAULT_ZIPF_S)
    drift_every_passes: int = flag("Synthetic drift: the hot experts change every this many passes.",
                                   default=DEFAULT_DRIFT_EVERY_PASSES)

    def __post_init__(self) -> None:
        if self.traces and self.kind != "trace":
            raise ConfigError(f"--trace is given but --workload is {self.kind}, which would ignore it; "
                              "add --workload trace to replay it")
        if self.kind == "trace" and not self.traces:
            raise ConfigError("--workload trace needs at least one --trace PATH")

    def build(self, model: ModelShape, tokens_per_pass: int) -> Workload:
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError(f"--workload {self.kind!r} is unknown; choose one of {list(WORKLOAD_KINDS)}")
        common = dict(num_layers=model.num_layers, num_logical_experts=model.num_logical_experts)
        if self.kind == "synthetic":
            return SyntheticWorkload(
                **common, top_k=model.top_k, tokens_per_pass=tokens_per_pass, seed=self.seed,
                zipf_s=self.zipf_s, drift_every_passes=self.drift_every_passes,
            )
        if self.kind == "uniform":
            return UniformWorkload(**common, top_k=model.top_k, tokens_per_pass=tokens_per_pass)
        ids, weights = load_traces(self.traces)
        return TraceWorkload(ids, weights, **common, tokens_per_pass=tokens_per_pass,
                             source="--trace " + ", ".join(self.traces))


@dataclass(frozen=True)
class RunSpec:
    """One labelled run: resolved EPLB flags, workload, number of forward passes."""

    label: str
    eplb: EPLBArgs
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    num_passes: int = flag("Forward passes per run.", default=DEFAULT_NUM_PASSES)
    manager_factory: str | None = None  # "module:attr"; overrides RuntimeConfig.manager_factory

    def __post_init__(self) -> None:
        if self.num_passes < 1:
            raise ConfigError(f"--num-passes must be >= 1 (got {self.num_passes})")


@dataclass(frozen=True)
class RuntimeConfig:
    """Shared by every run of one launch. Every field but ``model`` (``--model-preset`` and
    its overrides) is a flag whose default and help are the field's (``flagspec.py``)."""

    model: ModelShape
    batch_tokens: int = flag("Global tokens per forward pass (split over the EP ranks).", default=512)
    device: str = flag("cpu (gloo) or cuda (NCCL, a GPU per rank).", choices=DEVICES, default="cpu")
    dtype: str | None = flag("Weight dtype (default: float32 on cpu, bfloat16 on cuda).", choices=tuple(DTYPES),
                             default=None)
    seed: int = flag("Seed of the synthetic workload, activations and weights.", default=0)
    verify_weights: bool = flag("At the end, check every slot's weights against its expert's fingerprint.",
                                default=True)
    http_host: str = flag("HTTP host (localhost unless told otherwise).", name="--host", default="127.0.0.1")
    http_port: int | None = flag("HTTP port on rank 0 (0: a free port, printed; default: no HTTP).", name="--port",
                                 default=None)
    progress: bool = flag("Show the progress bar.", default=True)
    manager_factory: str | None = flag("module:attr of the EPLB manager class (default: EPLBManager).",
                                       default=None)
    capture_passes: tuple[int, ...] = flag(
        "Each rank saves its final hidden states of these passes into --capture-dir (tests compare them "
        "with the dense reference).", hidden=True, metavar="PASS", default=(),
    )
    capture_dir: str | None = flag("Where --capture-passes' hidden states go.", hidden=True, default=None)
    cuda_graph: bool = flag(
        "On CUDA, run passes eagerly (default: each pass's MoE layers as one CUDA graph where the dispatch and "
        "exchange allow it, runtime/graphs.py).", name="--disable-cuda-graph", negate=True, default=True,
    )
    exchange: str | None = flag(
        "How tokens reach their experts' ranks (runtime/moe.py; default: gather on cuda, alltoall on cpu).",
        name="--moe-exchange", choices=EXCHANGES, default=None,
    )
    dispatch_backend: str = flag(
        "minmax dispatch as Triton kernels (kernels/minmax_triton.py; auto: on CUDA), or as torch ops.",
        name="--ep-dispatch-backend", choices=BACKENDS, default="auto",
    )
    dispatch_counts: str = flag(
        "minmax dispatch: split on the whole pass's per-expert counts (global: one small all-gather per layer) "
        "or on each rank's own tokens (local).", name="--ep-dispatch-counts", choices=DISPATCH_COUNTS,
        default="global",
    )
    profile_passes: tuple[int, ...] = flag(
        "Rank 0 runs these passes of each run under torch.profiler and writes <run>_profile.txt (ops by device "
        "and host time, the pass's totals) into --profile-dir.", metavar="PASS", default=(),
    )
    profile_dir: str | None = flag("Where --profile-passes' tables go.", default=None)
    result_path: str | None = flag("Where rank 0 writes the runs' results as JSON (the launcher reads it).",
                                   hidden=True, default=None)
    dump_dir: str | None = flag(
        "Where the recorder's dumps go (default: $SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR, else the system temp dir).",
        name="--expert-distribution-recorder-dir", default=None,
    )
    threads_per_rank: int | None = flag("CPU threads per rank, >= 1 (default: cores / local ranks).", default=None)
    ready_file: str | None = flag("Rank 0 writes the HTTP URL here once serving, and each rank its pid (tests).",
                                  hidden=True, default=None)
    timeout_s: float = flag(
        "How long a pass's collectives wait for a peer before the ranks stop, naming the rank that stopped "
        "answering (a rebalance's waits: --eplb-rebalance-timeout-s).", name="--dist-timeout-s", default=300.0,
    )
    stall_s: float = flag("/health answers 503 'stalled' when no pass finished for this many seconds.",
                          name="--health-stall-s", default=30.0)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} must be 'cpu' or 'cuda'")
        if self.dtype is None:  # the device's default
            object.__setattr__(self, "dtype", "bfloat16" if self.device == "cuda" else "float32")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; choose one of {list(DTYPES)}")
        if self.exchange is not None and self.exchange not in EXCHANGES:
            raise ConfigError(f"--moe-exchange {self.exchange!r} must be one of {list(EXCHANGES)}")
        if self.dispatch_backend not in BACKENDS:
            raise ConfigError(f"--ep-dispatch-backend {self.dispatch_backend!r} must be one of {list(BACKENDS)}")
        check_dispatch_counts(self.dispatch_counts, "--ep-dispatch-counts")
        if self.http_port is not None and not 0 <= self.http_port <= MAX_PORT:
            raise ConfigError(f"--port {self.http_port} must be in [0, {MAX_PORT}] (0: a free port)")
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise ConfigError(f"--threads-per-rank must be >= 1 (got {self.threads_per_rank})")
        if self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens must be >= 1 (got {self.batch_tokens})")
        if not self.timeout_s > 0:
            raise ConfigError(f"--dist-timeout-s must be > 0 (got {self.timeout_s})")
        if not self.stall_s > 0:
            raise ConfigError(f"--health-stall-s must be > 0 (got {self.stall_s})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "float32"]

    def replace(self, **changes: object) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)
