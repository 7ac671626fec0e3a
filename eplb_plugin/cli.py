"""The ``eplb`` command: plan, simulate, inspect.

Add a subcommand by writing ``_add_<name>(subparsers)`` and one line in ``SUBCOMMANDS``.
Help texts show every default (``HelpFormatter``), the policies with the host each suits
(``POLICY_HELP``) and the model presets.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from .algorithms import ALGORITHMS, AUTO, DEFAULT_ALGORITHM, POLICIES, SPLITS, plan
from .balance import placement_balancedness
from .cli_inputs import (
    check_output_file,
    check_slots,
    load_counts,
    non_negative_int,
    num_physical_from_args,
    positive_int,
)
from .dispatch_info import DISPATCH_INFO
from .errors import ConfigError, EPLBError, ExpertLocationFileError, PlacementError
from .location import ExpertLocation
from .location_files import load_placement, save_placement
from .placement_format import weights_sidecar


def redundant_memory_bytes(preset, *, num_physical: int, num_gpus: int) -> int:
    """GPU memory each rank spends on redundant experts over all MoE layers.

    preset: an ``eplb_plugin.configs.ModelPreset`` (num_layers, num_logical_experts, expert_bytes).
    """
    redundant_per_rank = (num_physical - preset.num_logical_experts) / num_gpus
    return int(redundant_per_rank * preset.num_layers * preset.expert_bytes)


PLACEMENT_SUFFIXES = (".json", ".pt")  # what --init-expert-location loads
MAX_SIZING_ROWS = 16  # --sizing plans once per row: more counts are thinned, evenly spaced


def _checked_out(text: str) -> Path:
    """``--out`` of ``plan``, checked before anything is planned: a .json or .pt name in a
    folder that exists and takes a file."""
    out = Path(text)
    check_output_file("--out", out, suffixes=PLACEMENT_SUFFIXES)
    return out


def _save_map(path: Path, phy2log: torch.Tensor, *, ep_size: int, num_logical_experts: int) -> None:
    """The map file (what stock SGLang loads) and its meta sidecar (EP size, shape)."""
    save_placement(path, phy2log, ep_size=ep_size, num_logical_experts=num_logical_experts)


def _check_preset_shape(preset, *, shape: tuple[int, ...], args) -> None:
    """ConfigError unless the counts are [preset's MoE layers, preset's experts]."""
    num_layers, num_logical = shape
    if (num_layers, num_logical) == (preset.num_layers, preset.num_logical_experts):
        return
    hint = ""
    if Path(args.counts).suffix == ".npz" and args.num_logical_experts is None \
            and num_layers == preset.num_layers and num_logical < preset.num_logical_experts:
        hint = (f" (a .npz's experts are its largest id + 1: give --num-logical-experts "
                f"{preset.num_logical_experts} if its last experts got no tokens)")
    raise ConfigError(f"--preset {preset.name} has {preset.num_layers} MoE layers x {preset.num_logical_experts} "
                      f"experts, but {args.counts} holds counts of {num_layers} layers x {num_logical} experts{hint}; "
                      "give the preset of the model the counts come from")


def _cmd_plan(args) -> int:
    preset = None
    if args.preset:
        from .configs import get_preset

        preset = get_preset(args.preset)  # an unknown name fails here, before the solver runs
    out = _checked_out(args.out)
    # [L, E], or [B, L, E] with --pass-tokens or from a file of passes (per-pass policies plan on the passes)
    passes = load_counts(args.counts, pass_tokens=args.pass_tokens, num_logical=args.num_logical_experts,
                         keep_passes=True)
    counts = passes.sum(0) if passes.ndim == 3 else passes
    num_logical = counts.shape[1]
    if preset is not None:
        _check_preset_shape(preset, shape=counts.shape, args=args)
    if args.gpu_memory_budget_gib is not None:
        num_physical = _slots_for_budget(args, preset, num_logical)
    else:
        num_physical = num_physical_from_args(args, num_logical)
        check_slots(args, num_physical=num_physical, num_logical=num_logical)
    if args.sizing:
        _print_sizing(args, passes, num_logical, num_physical)
    placement = plan(passes, num_physical_experts=num_physical, num_gpus=args.ep_size, num_nodes=args.nodes,
                     num_groups=args.groups, algorithm=args.algorithm, split=args.split, dispatch=args.dispatch)
    c = torch.from_numpy(counts)
    trivial = ExpertLocation.trivial(num_layers=counts.shape[0], num_logical_experts=num_logical,
                                     num_physical_experts=num_physical, ep_size=args.ep_size).physical_to_logical_map
    phy2log, weights = placement.physical_to_logical_map, placement.replica_weights
    before = placement_balancedness(c, trivial, args.ep_size)
    after = placement_balancedness(c, phy2log, args.ep_size)
    print(f"balancedness before (trivial): {before:.4f}")
    print(f"balancedness after, equal split: {after:.4f}")
    if weights is not None:
        print(f"balancedness after, replica weights: {placement_balancedness(c, phy2log, args.ep_size, weights):.4f}")
    if placement.cross_node_share is not None:
        print(f"cross-node traffic share: {placement.cross_node_share:.3f}")
    if args.algorithm in POLICIES and POLICIES.get(args.algorithm).for_dispatch:
        print(f"planned per pass for {args.dispatch} dispatch (--dispatch: the host's --ep-dispatch-algorithm)")
    print(f"solver: {1e3 * placement.solver_seconds:.1f} ms")
    if preset is not None:
        mem = redundant_memory_bytes(preset, num_physical=num_physical, num_gpus=args.ep_size)
        print(f"redundant experts per rank ({args.preset}): {mem / 2**30:.2f} GiB")
    try:
        _save_map(out, phy2log, ep_size=args.ep_size, num_logical_experts=num_logical)
        if weights is not None:
            weights_sidecar(out).write_text(json.dumps(
                {"replica_weights": weights.tolist(), "physical_to_logical_map": phy2log.tolist()}))
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be written ({exc.strerror or exc})") from exc
    print(f"wrote {out}" + (f" and {weights_sidecar(out)} (replica weights: stock SGLang ignores this file and "
                            "splits equally; plan with --split equal for it)" if weights is not None else ""))
    return 0


def _slots_for_budget(args, preset, num_logical: int) -> int:
    """P for ``--gpu-memory-budget-gib``: the most redundant experts whose weights fit it on
    every GPU (the preset gives one expert's bytes), at most every GPU holding every expert
    (more buys no balance); says so and plans with the fewest that divide over the GPUs (none
    where the experts divide) when even one redundant expert per GPU does not fit."""
    from .algorithms.sizing import max_redundant_for_memory, max_useful_redundant, redundant_per_gpu

    if preset is None:
        raise ConfigError("--gpu-memory-budget-gib needs --preset: the preset gives one expert's size")
    if args.redundant or args.num_physical_experts is not None:
        raise ConfigError("give --gpu-memory-budget-gib or --redundant / --num-physical-experts, not both")
    budget_gib = args.gpu_memory_budget_gib
    if not budget_gib >= 0:
        raise ConfigError(f"--gpu-memory-budget-gib must be >= 0 (got {budget_gib})")
    one = preset.expert_bytes * preset.num_layers  # one redundant slot per GPU, every MoE layer
    gpus = args.ep_size
    redundant = max_redundant_for_memory(budget_gib * 2**30, expert_bytes=preset.expert_bytes,
                                         num_layers=preset.num_layers, num_logical=num_logical, num_gpus=gpus)
    per_gpu = redundant_per_gpu(num_logical, redundant, gpus)
    flag = f"--gpu-memory-budget-gib {budget_gib}"
    each = f"{one / 2**30:.2f} GiB each"
    if budget_gib * 2**30 < one:  # not one redundant expert per GPU: the fewest that divide over the GPUs
        fewest = "no redundant experts" if redundant == 0 else \
            f"{redundant} redundant experts, the fewest that divide {num_logical} experts over {gpus} GPUs " \
            f"({per_gpu} on the fullest GPU, over the budget)"
        print(f"{flag}: below one redundant expert per GPU ({one / 2**30:.2f} GiB over the {preset.num_layers} MoE "
              f"layers of {preset.name}); planning with {fewest}")
    elif redundant == max_useful_redundant(num_logical, gpus):
        more = " (the budget holds more)" if budget_gib * 2**30 >= (per_gpu + 1) * one else ""
        print(f"{flag}: {redundant} redundant experts ({per_gpu} per GPU, {each}): every GPU holds all "
              f"{num_logical} experts, the most that buy balance{more}")
    else:
        print(f"{flag}: {redundant} redundant experts ({per_gpu} per GPU, {each})")
    return num_logical + redundant


def _sizing_choices(num_logical: int, num_gpus: int, top: int) -> list[int]:
    """The redundant counts ``--sizing`` scores: one more per GPU each row up to ``top``, or
    ``MAX_SIZING_ROWS`` of them evenly spaced (the first and the last kept)."""
    from .algorithms.sizing import redundant_choices

    choices = redundant_choices(num_logical, num_gpus, top)
    if len(choices) <= MAX_SIZING_ROWS:
        return choices
    picks = np.linspace(0, len(choices) - 1, MAX_SIZING_ROWS).round().astype(int)
    return [choices[i] for i in sorted(set(picks.tolist()))]


def _print_sizing(args, passes, num_logical: int, num_physical: int) -> None:
    """Expected realized balance against redundant slots, up to the planned count (at least
    four per GPU when no budget caps it)."""
    from .algorithms.sizing import redundancy_curve

    top = num_physical - num_logical
    if args.gpu_memory_budget_gib is None:
        top = max(top, 4 * args.ep_size)
    choices = _sizing_choices(num_logical, args.ep_size, top)  # never empty: the planned count divides
    curve = redundancy_curve(passes, num_gpus=args.ep_size, redundant=choices, dispatch=args.dispatch,
                             algorithm=args.algorithm, num_nodes=args.nodes, num_groups=args.groups)
    where = "held-out passes (planned on the first half, scored on the second)" if curve[0].held_out else \
        "in sample (an upper bound: give per-pass counts, e.g. a .npz with --pass-tokens, for held-out figures)"
    print(f"expected balancedness per pass under {args.dispatch} dispatch, {where}:")
    print("  redundant  per GPU  balancedness")
    for point in curve:
        print(f"  {point.redundant:>9}  {point.per_gpu:>7}  {point.balancedness:.4f}")


def _cmd_inspect(args) -> int:
    counts = torch.from_numpy(load_counts(args.counts, num_logical=args.num_logical_experts))
    # The loaders' validation: shape against the counts, ids, replicas, EP size (and what
    # the file's meta sidecar says it was made for), replica weights. Their errors name
    # --init-expert-location, the flag they serve; here the file is inspect's argument.
    try:
        location = load_placement(args.placement, ep_size=args.ep_size, num_layers=counts.shape[0],
                                  num_logical_experts=counts.shape[1])
    except ExpertLocationFileError as exc:
        where = exc.source + (f", key {exc.key!r}" if exc.key else "")
        raise PlacementError(f"placement {where}: {exc.problem}") from exc
    phy2log, weights = location.physical_to_logical_map, location.replica_weights
    print(f"balancedness, equal split: {placement_balancedness(counts, phy2log, args.ep_size):.4f}")
    if weights is not None:
        print(f"balancedness, replica weights: {placement_balancedness(counts, phy2log, args.ep_size, weights):.4f}")
    share = counts.sum(0) / counts.sum().clamp_min(1)
    top = torch.topk(share, min(args.top, share.numel()))
    print("hottest experts (share of tokens, all layers): " +
          ", ".join(f"{int(i)}: {float(v):.3f}" for v, i in zip(top.values, top.indices)))
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has one) and keeps the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if shown and not action.required and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


EPILOG_WIDTH = 96  # characters per line of the policy and preset lists

# Which host each placement policy suits (``eplb <cmd> --help`` lists them; ``Policy.suits``).
POLICY_HELP = {AUTO: "SGLang's choice (its --eplb-algorithm default): deepseek_hierarchical where --groups divide "
                    "over --nodes, else deepseek", **{p.name: p.suits for p in POLICIES.entries()}}


# simulate plans on one node, without expert groups, with an equal split (``evaluate.simulate``
# takes no nodes, groups or split): the policies whose help names those flags, as simulate plans them.
SIMULATE_POLICY_HELP = {
    **POLICY_HELP,
    AUTO: "SGLang's choice (its --eplb-algorithm default); simulate plans on one node without expert groups, "
          "where SGLang picks deepseek",
    "eplb_plugin": "the project's policy: balanced replicas, few moves when replanning; simulate plans it with an "
                   "equal split on one node; for SGLang with the plugin and for the reference runtime",
    "eplb_plugin_equal": "the earlier spelling of eplb_plugin with an equal split",
    "deepseek_hierarchical": "DeepSeek's hierarchical recipe, for stock SGLang on several nodes; simulate plans "
                             "on one node without expert groups, where it packs no groups per node",
}


def _policy_epilog(*, presets: bool, policy_help: dict[str, str] = POLICY_HELP) -> str:
    """The placement policies (--algorithm) with the host each suits (``policy_help``), and
    with ``presets`` the model presets (--preset)."""
    from .configs import PRESET_NAMES

    lines = ["placement policies (--algorithm):"]
    for name in (AUTO, *ALGORITHMS):
        lines += textwrap.wrap(policy_help.get(name, ""), EPILOG_WIDTH, initial_indent=f"  {name:<22} ",
                               subsequent_indent=" " * 25)
    if presets:
        lines += ["", *textwrap.wrap("model presets (--preset): " + ", ".join(PRESET_NAMES), EPILOG_WIDTH)]
    return "\n".join(lines)


def _num_logical_flag(p) -> None:
    p.add_argument("--num-logical-experts", type=positive_int, default=None,
                   help="logical experts E (default: the counts' width; a per-token .npz's is its largest "
                        "expert id + 1, so give it when the highest-numbered experts got no tokens)")


def _common(p) -> None:
    p.add_argument("--ep-size", type=positive_int, required=True, help="number of GPUs (EP ranks)")
    p.add_argument("--redundant", type=non_negative_int, default=0, help="redundant experts (P = E + redundant)")
    p.add_argument("--num-physical-experts", type=positive_int, default=None, help="P, overrides --redundant")
    _num_logical_flag(p)
    p.add_argument("--algorithm", default=DEFAULT_ALGORITHM, choices=[AUTO, *ALGORITHMS],
                   help="placement policy (see the list below)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="counts -> placement file for --init-expert-location",
                       formatter_class=HelpFormatter, epilog=_policy_epilog(presets=True))
    p.add_argument("counts", help="SGLang stat dump .pt, JSON with logical_count/counts, or per-token .npz")
    _common(p)
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes the EP ranks span (node-aware placement when > 1)")
    p.add_argument("--groups", type=positive_int, default=None, help="expert groups of group-limited routing (DeepSeek-V3: 8)")
    p.add_argument("--preset", default=None,
                   help="model preset for the memory estimate (listed below); the counts must have its shape")
    p.add_argument("--split", default="equal", choices=SPLITS,
                   help="how the host splits an expert's tokens over its replicas: equal (stock SGLang; "
                        "static, random, dynamic and minmax dispatch) or weighted (the runtime's weighted dispatch)")
    p.add_argument("--out", required=True, help=".json or .pt; with --split weighted, weights go to <out>.weights.json")
    p.add_argument("--gpu-memory-budget-gib", type=float, default=None,
                   help="GPU memory each rank may spend on redundant experts; with --preset, plans with the most "
                        "redundant experts that fit (instead of --redundant), at most every GPU holding every "
                        "expert (more buys no balance)")
    p.add_argument("--sizing", action="store_true",
                   help="also print the expected per-pass balancedness for each count of redundant experts "
                        f"(at most {MAX_SIZING_ROWS} rows, evenly spaced)")
    p.add_argument("--dispatch", default="static", choices=list(DISPATCH_INFO.names()),
                   help="the host's --ep-dispatch-algorithm: what a per-pass policy plans for (minmax splits "
                        "each pass, the others spread evenly) and what --sizing scores under")
    p.add_argument("--pass-tokens", type=positive_int, default=None,
                   help="for a per-token .npz: cut it into passes of this many tokens (tokens past the last "
                        "whole pass are left out); per-pass policies then plan on the passes and --sizing "
                        "scores held-out passes")
    p.set_defaults(func=_cmd_plan)


def _add_simulate(sub) -> None:
    from .cli_simulate import add_simulate

    add_simulate(sub, _common, HelpFormatter)
    sub.choices["simulate"].epilog = _policy_epilog(presets=False, policy_help=SIMULATE_POLICY_HELP)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="balancedness and hottest experts of a placement on counts",
                       formatter_class=HelpFormatter)
    p.add_argument("placement", help="placement file (.json or .pt with physical_to_logical_map), e.g. from eplb plan")
    p.add_argument("counts", help="SGLang stat dump .pt, JSON with logical_count/counts, or per-token .npz")
    p.add_argument("--ep-size", type=positive_int, required=True, help="number of GPUs (EP ranks) the placement is for")
    _num_logical_flag(p)
    p.add_argument("--top", type=positive_int, default=8, help="hottest experts to list")
    p.set_defaults(func=_cmd_inspect)


SUBCOMMANDS = {"plan": _add_plan, "simulate": _add_simulate, "inspect": _add_inspect}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="eplb", description="Plan, simulate and inspect expert placements for EPLB.", formatter_class=HelpFormatter,
        epilog="`eplb <command> --help` shows each command's options and defaults; plan and simulate also list "
               "the placement policies, and plan the model presets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # refused by the subcommand's parser, so usage and error name `eplb <command>`
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except EPLBError as exc:  # ConfigError, CountsError, PlacementError...
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
