"""Every EPLB-related flag, in one frozen dataclass, with SGLang 0.5.23's names and defaults.

SGLang's flags keep their meaning (checked against ``sglang/srt/arg_groups/fields`` and
``parallel_hook.py`` of 0.5.23). The plugin adds what SGLang lacks: a time-based trigger, a
per-layer drift trigger (as xLLM has), the weight mover's memory budget and mode.

``add_eplb_args`` builds argparse options whose defaults are read from the dataclass
(``flagspec.py``, as for the runtime's configs), so parsing no arguments gives
``EPLBArgs()``; ``EPLBArgs.resolve`` applies SGLang's implied settings and rejects
contradictions with an error that names both flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from eplb_plugin.errors import ConfigError
from eplb_plugin.flagspec import add_flags, flag

RecorderMode = Literal["stat", "stat_approx", "per_pass", "per_token"]
DispatchAlgorithm = Literal["static", "random", "dynamic", "weighted", "minmax"]
BalancednessReportMode = Literal["off", "server_log", "prometheus", "both"]
Transport = Literal["nccl", "ipc", "auto"]  # how the executor moves weights between ranks of one host
# what minmax dispatch splits on: the whole pass's per-expert counts, or each rank's own tokens'
DispatchCounts = Literal["global", "local"]

RECORDER_MODES: tuple[str, ...] = get_args(RecorderMode)
DISPATCH_ALGORITHMS: tuple[str, ...] = get_args(DispatchAlgorithm)
REPORT_MODES: tuple[str, ...] = get_args(BalancednessReportMode)
TRANSPORT_NAMES: tuple[str, ...] = get_args(Transport)
DISPATCH_COUNTS: tuple[str, ...] = get_args(DispatchCounts)


def check_dispatch_counts(value: object, flag: str) -> str:
    """``value`` if it is one of ``DISPATCH_COUNTS``; ConfigError naming ``flag`` and the valid ones."""
    if value not in DISPATCH_COUNTS:
        raise ConfigError(f"{flag} {value!r} is not one of {list(DISPATCH_COUNTS)}")
    return str(value)
# Recorder modes whose dump carries ``logical_count``, the input a rebalance needs.
COUNTING_RECORDER_MODES = ("stat", "stat_approx")


MAX_MINMAX_STEPS = 64  # --eplb-dispatch-minmax-steps' bound: the kernels unroll the split's steps


def _whole(value: object) -> bool:
    """Whether ``value`` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(help_text: str, *, choices: tuple[str, ...] | None = None, sglang: bool = True, runtime: bool = True,
          **kw: Any):
    """An EPLBArgs flag (``flagspec.flag``). sglang: SGLang has this flag (the plugin adds it
    only where not); runtime: the project's runtime (``launch_server``) offers it too."""
    return flag(help_text, choices=choices, tags={"sglang": sglang, "runtime": runtime}, **kw)


@dataclass(frozen=True)
class EPLBArgs:
    """EPLB flags. Field ``x_y`` is the command-line flag ``--x-y``."""

    # SGLang's flags (0.5.23 names and defaults; --eplb-algorithm's default is the project's policy).
    ep_size: int = _flag("The expert parallelism size (EP ranks).", default=1)
    enable_eplb: bool = _flag("Enable EPLB: record loads and rebalance experts while serving.", default=False)
    eplb_algorithm: str = _flag(
        "Placement policy: eplb_plugin, deepseek, deepseek_hierarchical, ..., or auto (SGLang's choice: "
        "deepseek_hierarchical where the model's expert groups divide over the nodes, else deepseek). "
        "SGLang's default is auto; the runtime's is the project's policy.",
        default="eplb_plugin",
    )
    eplb_rebalance_num_iterations: int = _flag(
        "Forward passes between automatic rebalances.", default=1000
    )
    eplb_rebalance_layers_per_chunk: Optional[int] = _flag(
        "MoE layers whose new weights go live per forward pass (default: all at once).", default=None
    )
    eplb_min_rebalancing_utilization_threshold: float = _flag(
        "Rebalance only when the window's balancedness (mean/max GPU load) is below this; in [0, 1].",
        default=1.0,
    )
    expert_distribution_recorder_mode: Optional[RecorderMode] = _flag(
        "Mode of the expert distribution recorder.", choices=RECORDER_MODES, default=None
    )
    expert_distribution_recorder_buffer_size: Optional[int] = _flag(
        "Passes kept by the stat recorder's ring buffer; -1 keeps every pass until a dump (EPLB's window: "
        "until the next rebalance); per_pass and per_token keep every pass until a dump whatever the size "
        "(default: the rebalance interval).",
        default=None,
    )
    expert_balancedness_report_mode: BalancednessReportMode = _flag(
        "Where to report expert balancedness.", choices=REPORT_MODES, default="off"
    )
    ep_num_redundant_experts: int = _flag(
        "Redundant expert slots in expert parallel (physical = logical + redundant).", default=0
    )
    ep_dispatch_algorithm: Optional[DispatchAlgorithm] = _flag(
        "How a token picks among its expert's replicas.", choices=DISPATCH_ALGORITHMS, default=None
    )
    init_expert_location: str = _flag(
        "Initial placement: 'trivial', a .pt or .json file, or inline JSON holding "
        "physical_to_logical_map [L][P] or logical_count [L][E] / [B][L][E].",
        default="trivial",
    )
    nnodes: int = _flag("The number of nodes.", default=1)
    node_rank: int = _flag("The node rank.", default=0)
    dist_init_addr: Optional[str] = _flag(
        "host:port of the first node, for torch.distributed initialization.", default=None
    )
    # The plugin's own flags (SGLang has no equivalent).
    enable_expert_distribution_metrics: bool = _flag(
        "Export expert-load and rebalance metrics to Prometheus (implies the stat recorder).",
        default=False,
        sglang=False,
    )
    eplb_rebalance_interval_s: Optional[float] = _flag(
        "Also rebalance when this many seconds have passed since the last rebalance.",
        default=None,
        sglang=False,
    )
    eplb_drift_threshold: Optional[float] = _flag(
        "Rebalance the layers whose load vector's cosine similarity to the one last planned on "
        "fell below this, in (0, 1].",
        default=None,
        sglang=False,
    )
    eplb_drift_window_passes: Optional[int] = _flag(
        "A drift rebalance plans its layers on the window's last this many passes (the load since the "
        "drift), not the whole window; default: the passes between two drift checks.",
        default=None,
        sglang=False,
    )
    eplb_transfer_budget_mb: float = _flag(
        "Temporary memory the weight mover may use per rank, in MiB.", default=1024.0, sglang=False
    )
    eplb_non_blocking: bool = _flag(
        "Move weights in the background while serving; layers go live chunk by chunk.",
        default=False,
        sglang=False,
    )
    eplb_transport: Transport = _flag(
        "How ranks on one host move expert weights: nccl (P2P kernels), ipc (the receiver pulls "
        "with copy engines through CUDA IPC, taking no SMs from serving), auto (ipc where possible).",
        choices=TRANSPORT_NAMES,
        default="auto",
        sglang=False,
    )
    eplb_verify_weights: bool = _flag(
        "Fingerprint every moved slot after a move (cheap; on in tests).", default=False, sglang=False
    )
    eplb_rebalance_timeout_s: float = _flag(
        "How long a rebalance's waits for other ranks (agreements, transfers) may take, in "
        "seconds; past it the rebalance fails on every rank still answering and the old "
        "placement stays.",
        default=60.0,
        sglang=False,
    )
    eplb_move_budget_mb: Optional[float] = _flag(
        "At most this many MiB of expert weights move per rebalance on average (all ranks together): "
        "the planner spends them where the per-pass balance gains most per slot moved (policies with a "
        "move budget: eplb_plugin_perpass); unused budget carries over (--eplb-move-budget-carry); a budget per "
        "interval: a rebalance in between (drift, manual) takes the share of its passes. Default: no limit.",
        default=None,
        sglang=False,
    )
    eplb_move_budget_carry: int = _flag(
        "With --eplb-move-budget-mb: how many rebalances' unused budget is kept for later ones, so a "
        "shift in traffic can be followed in one rebalance while the average stays within the budget "
        "(one rebalance moves at most (1 + this) budgets); 0 makes the budget a hard per-rebalance cap.",
        default=3,
        sglang=False,
    )
    eplb_plan_in_process: bool = _flag(
        "Plan in a separate process (spawned at start-up) instead of a thread, so the solver "
        "never holds the serving process's GIL.",
        default=False,
        sglang=False,
    )
    eplb_dispatch_minmax_steps: Optional[int] = _flag(
        "--ep-dispatch-algorithm minmax: diffusion steps of the split per MoE layer and pass, 1 to "
        f"{MAX_MINMAX_STEPS} (default: 8 up to 8 EP ranks, 16 from 9 to 32, 8 past 32). A step costs about 0.3-0.5 "
        "us per layer on an H100 up to 32 GPUs and 0.6 us past 32; fewer steps leave the split further from its "
        "optimum.",
        default=None,
        sglang=False,
    )
    eplb_dispatch_counts: DispatchCounts = _flag(
        "SGLang with --ep-dispatch-algorithm minmax: split on the whole pass's per-expert counts (global: one "
        "all-gather of [E] counts per MoE layer over the MoE EP group, only where each rank routes its own "
        "tokens, i.e. with an all-to-all backend) or on each rank's own tokens (local). The runtime's "
        "equivalent is --ep-dispatch-counts.",
        choices=DISPATCH_COUNTS,
        default="local",
        sglang=False,
        runtime=False,
    )

    # ------------------------------------------------------------------ resolution

    def resolve(self) -> EPLBArgs:
        """Apply SGLang's implied settings and reject contradictions.

        ``--enable-eplb`` implies recorder mode ``stat`` and ``static`` dispatch and needs
        ``--ep-size`` > 1; a non-trivial ``--init-expert-location`` implies ``static``
        dispatch; metrics imply ``stat``; the buffer size follows the rebalance interval.
        """
        self.check_values()
        self._check_layout()
        self.policy()
        updates: dict[str, Any] = {}
        mode = self.expert_distribution_recorder_mode
        wants_stats = self.enable_expert_distribution_metrics or self.expert_balancedness_report_mode != "off"
        if mode is None and (self.enable_eplb or wants_stats):
            mode = updates["expert_distribution_recorder_mode"] = "stat"
        if self.enable_eplb:
            if self.ep_size <= 1:
                raise ConfigError(
                    f"--enable-eplb needs --ep-size > 1 (got --ep-size {self.ep_size}): "
                    "with one rank there is nothing to balance"
                )
            if mode not in COUNTING_RECORDER_MODES:
                raise ConfigError(
                    f"--enable-eplb needs --expert-distribution-recorder-mode in "
                    f"{COUNTING_RECORDER_MODES} (got {mode!r}): only they count loads per expert"
                )
        if self.ep_dispatch_algorithm is None and (
            self.enable_eplb or self.init_expert_location != "trivial"
        ):
            updates["ep_dispatch_algorithm"] = "static"
        if self.expert_distribution_recorder_buffer_size is None:
            updates["expert_distribution_recorder_buffer_size"] = self.eplb_rebalance_num_iterations
        return dataclasses.replace(self, **updates) if updates else self

    def check_values(self) -> None:
        """ConfigError naming the flag for a value out of its range, one flag at a time (the
        runtime's ``resolve`` and the SGLang adapter, whose own flags SGLang parses, both run it)."""
        positive = {
            "--ep-size": self.ep_size,
            "--eplb-rebalance-num-iterations": self.eplb_rebalance_num_iterations,
            "--nnodes": self.nnodes,
        }
        for option, value in positive.items():
            if value < 1:
                raise ConfigError(f"{option} must be >= 1 (got {value})")
        steps = self.eplb_dispatch_minmax_steps
        if steps is not None and not (_whole(steps) and 1 <= steps <= MAX_MINMAX_STEPS):
            raise ConfigError(f"--eplb-dispatch-minmax-steps must be an int in [1, {MAX_MINMAX_STEPS}] or unset "
                              f"(got {steps!r})")
        if self.eplb_rebalance_layers_per_chunk is not None and self.eplb_rebalance_layers_per_chunk < 1:
            raise ConfigError(
                f"--eplb-rebalance-layers-per-chunk must be >= 1 or unset (got {self.eplb_rebalance_layers_per_chunk})"
            )
        if not 0.0 <= self.eplb_min_rebalancing_utilization_threshold <= 1.0:
            raise ConfigError(
                "--eplb-min-rebalancing-utilization-threshold must be in [0, 1] "
                f"(got {self.eplb_min_rebalancing_utilization_threshold})"
            )
        size = self.expert_distribution_recorder_buffer_size
        if size is not None and size != -1 and size < 1:
            raise ConfigError(f"--expert-distribution-recorder-buffer-size must be >= 1 or -1 (got {size})")
        if self.ep_num_redundant_experts < 0:
            raise ConfigError(f"--ep-num-redundant-experts must be >= 0 (got {self.ep_num_redundant_experts})")
        if self.eplb_drift_threshold is not None and not 0.0 < self.eplb_drift_threshold <= 1.0:
            raise ConfigError(f"--eplb-drift-threshold must be in (0, 1] (got {self.eplb_drift_threshold})")
        passes = self.eplb_drift_window_passes
        if passes is not None and not (_whole(passes) and passes >= 1):
            raise ConfigError(f"--eplb-drift-window-passes must be an int >= 1 or unset (got {passes!r})")
        if passes is not None and self.eplb_drift_threshold is None:
            raise ConfigError("--eplb-drift-window-passes needs --eplb-drift-threshold (it sets what a drift "
                              "rebalance plans on)")
        amounts = {  # inf or NaN would reach the waits and the planner (inf MiB -> NaN slots)
            "--eplb-rebalance-interval-s": self.eplb_rebalance_interval_s,
            "--eplb-transfer-budget-mb": self.eplb_transfer_budget_mb,
            "--eplb-rebalance-timeout-s": self.eplb_rebalance_timeout_s,
            "--eplb-move-budget-mb": self.eplb_move_budget_mb,
        }
        for option, amount in amounts.items():
            number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
            if amount is not None and not (number and math.isfinite(amount) and amount > 0):
                raise ConfigError(f"{option} must be finite and > 0 (got {amount!r})")
        if not (_whole(self.eplb_move_budget_carry) and self.eplb_move_budget_carry >= 0):
            raise ConfigError(f"--eplb-move-budget-carry must be an int >= 0 (got {self.eplb_move_budget_carry!r})")

    def _check_layout(self) -> None:
        """The runtime's process layout and mode flags, which SGLang checks for itself."""
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ConfigError(f"--nnodes {self.nnodes} needs --dist-init-addr host:port of the first node")
        if self.nnodes > 1:
            dist_init_host_port(self.dist_init_addr)
        if self.ep_size % self.nnodes:
            raise ConfigError(f"--ep-size {self.ep_size} must be divisible by --nnodes {self.nnodes}")
        if self.eplb_non_blocking and not self.enable_eplb:
            raise ConfigError("--eplb-non-blocking needs --enable-eplb")

    def policy(self, num_groups: int | None = None) -> str:
        """The registered placement policy ``--eplb-algorithm`` names (``auto``: SGLang's choice
        for the model's ``num_groups`` expert groups and ``--nnodes``). ConfigError naming the
        flag and the known policies for an unknown name, and for ``--eplb-move-budget-mb``
        with a policy that takes no move budget."""
        from eplb_plugin.algorithms import POLICIES, check_move_budget, resolve_algorithm

        try:
            name = resolve_algorithm(self.eplb_algorithm, num_groups=num_groups, num_nodes=self.nnodes)
        except ConfigError as exc:
            raise ConfigError(f"--eplb-algorithm {self.eplb_algorithm!r} is not a known policy; "
                              f"known: auto, {', '.join(POLICIES)}") from exc
        if self.eplb_move_budget_mb is not None:
            check_move_budget(name, what="--eplb-move-budget-mb", who="--eplb-algorithm")
        return name

    @property
    def num_gpus_per_node(self) -> int:
        return self.ep_size // self.nnodes

    # ------------------------------------------------------------------ argparse

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> EPLBArgs:
        """Pick this dataclass's fields out of a parsed namespace (other keys ignored)."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> EPLBArgs:
        parser = argparse.ArgumentParser(description="EPLB flags")
        add_eplb_args(parser)
        return cls.from_namespace(parser.parse_args(argv))


def check_field_type(name: str, value: object, *, what: str) -> None:
    """ConfigError unless ``value`` has the type of EPLBArgs field ``name``: for settings that
    bypass argparse (``$EPLB_PLUGIN_CONFIG``'s JSON), where the string "false" is truthy. A
    bool must be a bool, a choice one of its names, a number an int or float (never a bool);
    None only where the field is optional. ``what``: the setting, as the message names it."""
    hint = get_type_hints(EPLBArgs)[name]
    kinds = get_args(hint) if get_origin(hint) is Union else (hint,)
    optional = type(None) in kinds
    (kind,) = (k for k in kinds if k is not type(None))
    if get_origin(kind) is Literal:
        ok, expected = isinstance(value, str) and value in get_args(kind), f"one of {list(get_args(kind))}"
    elif kind is bool:
        ok, expected = isinstance(value, bool), "a JSON bool (true or false)"
    elif kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif kind is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, kind), f"a {kind.__name__}"
    if (value is None and optional) or (value is not None and ok):
        return
    raise ConfigError(f"{what} must be {expected}{' or null' if optional else ''}, got {value!r}")


def add_eplb_args(
    parser: argparse.ArgumentParser,
    *,
    only_plugin_flags: bool = False,
    skip: tuple[str, ...] = (),
    unset_defaults: bool = False,
) -> argparse.ArgumentParser:
    """Add every EPLBArgs flag to ``parser``, defaults read from the dataclass.

    only_plugin_flags: add only the flags SGLang lacks (for extending SGLang's parser);
    otherwise (the runtime's parser) every flag the runtime offers. skip: field names not to
    add (a host parser that already has them). unset_defaults: a flag not given stays out of
    the namespace (``flagspec.add_flags``), so a host can tell which were given.
    """

    def offered(f: dataclasses.Field) -> bool:
        return f.name not in skip and (not f.metadata["sglang"] if only_plugin_flags else f.metadata["runtime"])

    add_flags(parser.add_argument_group("EPLB"), EPLBArgs, include=offered, unset_defaults=unset_defaults)
    return parser


def dist_init_host_port(addr: str | None) -> tuple[str, int]:
    """``--dist-init-addr host:port`` split into (host, port); ConfigError naming the flag
    where there is no host or the port is not in [1, 65535]."""
    host, _, port = (addr or "").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--dist-init-addr {addr!r} must be host:port with a port in [1, 65535]")
    return host, int(port)
