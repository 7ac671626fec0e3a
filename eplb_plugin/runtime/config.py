"""What a runtime run needs: the model's MoE shape, the workload, the runs, the process layout.

One ``RuntimeConfig`` holds what every run of a launch shares (model, batch, device,
HTTP, verification); each ``RunSpec`` is one labelled run (its EPLB flags, workload and
pass count). ``--compare`` is two RunSpecs (EPLB off, then on) over the same processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.configs import get_preset
from eplb_plugin.errors import ConfigError
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

DISPATCH_COUNTS = ("global", "local")  # what minmax dispatch splits on (see RuntimeConfig)


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
        p = get_preset(name)
        shape = cls(
            num_layers=num_layers or p.num_layers,
            num_logical_experts=p.num_logical_experts,
            top_k=p.top_k,
            hidden_size=hidden_size or p.hidden_size,
            intermediate_size=intermediate_size or p.moe_intermediate_size,
            num_groups=p.num_groups if p.num_groups > 1 else None,
        )
        for key in ("num_layers", "hidden_size", "intermediate_size"):
            if getattr(shape, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1 (got {getattr(shape, key)})")
        return shape


@dataclass(frozen=True)
class WorkloadSpec:
    """kind: synthetic | trace | uniform; traces: files concatenated in order (trace)."""

    kind: str = "synthetic"
    traces: tuple[str, ...] = ()
    seed: int = 0
    zipf_s: float = DEFAULT_ZIPF_S
    drift_every_passes: int = DEFAULT_DRIFT_EVERY_PASSES

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
        return TraceWorkload(ids, weights, **common, tokens_per_pass=tokens_per_pass, source=", ".join(self.traces))


@dataclass(frozen=True)
class RunSpec:
    """One labelled run: resolved EPLB flags, workload, number of forward passes."""

    label: str
    eplb: EPLBArgs
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    num_passes: int = 100
    manager_factory: str | None = None  # "module:attr"; overrides RuntimeConfig.manager_factory

    def __post_init__(self) -> None:
        if self.num_passes < 1:
            raise ConfigError(f"--num-passes must be >= 1 (got {self.num_passes})")


@dataclass(frozen=True)
class RuntimeConfig:
    """Shared by every run of one launch.

    batch_tokens: global tokens per forward pass (split over the EP ranks).
    device: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank). dtype: a key of DTYPES.
    http_port: None = no HTTP server; 0 = a free port (printed); else that port.
    manager_factory: "module:attr" of the EPLB manager class (default: EPLBManager).
    capture_passes / capture_dir: each rank saves its final hidden states of those passes
    (tests compare them with the dense reference).
    result_path: where rank 0 writes the runs' results as JSON (the launcher reads it).
    threads_per_rank: torch intra-op threads per rank on CPU (default: cores / local ranks).
    cuda_graph: on CUDA, run each pass's MoE layers as one CUDA graph where the dispatch
    and exchange allow it (``runtime/graphs.py``); False: eager.
    exchange: how tokens reach their experts' ranks, "gather" or "alltoall" (see
    ``runtime/moe.py``); None: gather on CUDA, alltoall on CPU.
    dispatch_backend: ``ExpertDispatcher``'s backend: "auto" (the ``minmax`` dispatch's
    Triton kernels, ``kernels/minmax_triton.py``, on CUDA; torch ops on CPU), "triton" or
    "torch".
    dispatch_counts: what ``minmax`` splits on: "global" (the whole pass's per-expert
    counts, all-gathered per layer over the EP group) or "local" (each rank's own tokens).
    profile_passes / profile_dir: rank 0 runs those passes of each run under torch.profiler
    and writes ``<run>_profile.txt`` (ops by device and host time, and the pass's host and
    device totals) into profile_dir.
    """

    model: ModelShape
    batch_tokens: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    verify_weights: bool = True
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    progress: bool = True
    manager_factory: str | None = None
    capture_passes: tuple[int, ...] = ()
    capture_dir: str | None = None
    cuda_graph: bool = True
    exchange: str | None = None
    dispatch_backend: str = "auto"
    dispatch_counts: str = "global"
    profile_passes: tuple[int, ...] = ()
    profile_dir: str | None = None
    result_path: str | None = None
    dump_dir: str | None = None
    threads_per_rank: int | None = None
    ready_file: str | None = None  # rank 0 writes the HTTP URL here once serving (tests)
    timeout_s: float = 300.0  # process-group timeout: a pass's collectives wait this long for a peer
    stall_s: float = 30.0  # /health answers 503 "stalled" when no pass finished for this long

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} must be 'cpu' or 'cuda'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; choose one of {list(DTYPES)}")
        if self.exchange is not None and self.exchange not in EXCHANGES:
            raise ConfigError(f"--moe-exchange {self.exchange!r} must be one of {list(EXCHANGES)}")
        if self.dispatch_backend not in BACKENDS:
            raise ConfigError(f"--ep-dispatch-backend {self.dispatch_backend!r} must be one of {list(BACKENDS)}")
        if self.dispatch_counts not in DISPATCH_COUNTS:
            raise ConfigError(f"--ep-dispatch-counts {self.dispatch_counts!r} must be one of {list(DISPATCH_COUNTS)}")
        if self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens must be >= 1 (got {self.batch_tokens})")
        if not self.timeout_s > 0:
            raise ConfigError(f"--dist-timeout-s must be > 0 (got {self.timeout_s})")
        if not self.stall_s > 0:
            raise ConfigError(f"--health-stall-s must be > 0 (got {self.stall_s})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: object) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)
