"""Helpers (no tests) for running SGLang's EPLB code on a CPU machine without a server.

``stubs_on_path()`` puts ``tests/sglang_stubs`` (the ``torchvision`` stand-in) first on
``sys.path`` for one test module and takes it away afterwards; ``subprocess_env()`` does the
same for child processes. ``fake_runtime(...)``
fills SGLang's process-wide runtime context (``get_exec().moe``, ``get_parallel()``,
``get_device()``, ``get_schedule()``) with the given values, as ``publish(server_args)`` would
after resolving a real model's ServerArgs, which needs the model's files.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

STUBS_DIR = Path(__file__).resolve().parent / "sglang_stubs"
REPO_ROOT = STUBS_DIR.parents[1]

MOE_DEFAULTS: dict[str, Any] = dict(
    enable_eplb=False,
    eplb_algorithm="auto",
    eplb_rebalance_num_iterations=1000,
    eplb_rebalance_layers_per_chunk=None,
    eplb_min_rebalancing_utilization_threshold=1.0,
    expert_distribution_recorder_mode=None,
    expert_distribution_recorder_buffer_size=1000,
    expert_balancedness_report_mode="off",
    ep_num_redundant_experts=0,
    ep_dispatch_algorithm=None,
    init_expert_location="trivial",
    ep_join_mode=None,
    moe_a2a_backend="none",
    deepep_mode="auto",
    elastic_ep_backend=None,
)


@contextlib.contextmanager
def stubs_on_path() -> Iterator[None]:
    """The torchvision stand-in importable inside the block (modules imported stay imported)."""
    added = str(STUBS_DIR) not in sys.path
    if added:
        sys.path.insert(0, str(STUBS_DIR))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(STUBS_DIR))


def import_sglang_or_skip() -> None:
    """Skip the calling test module cleanly where sglang is not installed."""
    import pytest

    pytest.importorskip("sglang", reason="sglang is not installed (bash scripts/install_sglang_cpu.sh)")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STUBS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# The head of a script for a fresh SGLang process: ``parse(argv)`` runs SGLang's own argparse
# and ``ServerArgs.from_cli_args`` -> (ServerArgs, "") or (None, argparse's error text).
SERVER_ARGS_PARSE = """
import argparse, contextlib, io, json, os, sys
from sglang.srt.server_args import ServerArgs

def parse(argv):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return ServerArgs.from_cli_args(parser.parse_args(["--model-path", "m", *argv])), ""
    except SystemExit:
        return None, err.getvalue()
"""


def run_sglang_script(body: str, *, timeout_s: float, **env: str) -> dict[str, Any]:
    """Run ``SERVER_ARGS_PARSE`` then ``body`` (indented text, dedented here) in a fresh
    Python with the plugin enabled (hooks apply once per process); ``body`` prints
    ``RESULT <json>``, returned parsed. Fails with the child's stderr."""
    import json
    import subprocess
    import textwrap

    script = SERVER_ARGS_PARSE + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
        env=subprocess_env(EPLB_PLUGIN_ENABLE="1", SGLANG_PLUGINS="eplb_plugin",
                           EPLB_TESTS_DIR=str(Path(__file__).resolve().parent), **env),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _cpu_device_module_shims() -> None:
    """SGLang calls these through ``torch.get_device_module()``; the CPU module lacks them."""
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    if not hasattr(torch.cpu, "is_current_stream_capturing"):
        torch.cpu.is_current_stream_capturing = lambda: False


def fake_runtime(*, ep_size: int, nnodes: int = 1, tp_rank: int = 0, chunked_prefill_size: int = 64,
                 tp_size: int | None = None, pp_size: int = 1, enable_two_batch_overlap: bool = False, **moe: Any):
    """Install SGLang runtime config for EPLB code on CPU; returns the ``moe`` namespace."""
    from sglang.srt import runtime_context as rc

    _cpu_device_module_shims()
    unknown = set(moe) - set(MOE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown moe fields {sorted(unknown)}")
    moe_ns = SimpleNamespace(**{**MOE_DEFAULTS, **moe})
    rc._CONTEXT._config_bags = {
        "exec": SimpleNamespace(moe=moe_ns, overlap=SimpleNamespace(enable_two_batch_overlap=enable_two_batch_overlap),
                                comm=SimpleNamespace(enable_symm_mem=False)),
        "device": SimpleNamespace(device="cpu"),
        "schedule": SimpleNamespace(chunked_prefill_size=chunked_prefill_size),
    }
    rc._CONTEXT.resources.expert_location_metadata = None
    rc._CONTEXT.resources.expert_distribution_recorder = None
    rc._PARALLEL._stamp.update(
        ep_size=ep_size, nnodes=nnodes, tp_size=ep_size if tp_size is None else tp_size, tp_rank=tp_rank,
        pp_size=pp_size, dwdp_size=1,
        elastic_ep_initial_size=None, ep_join_rank_offset=0,
    )
    with stubs_on_path():  # sglang.srt.layers.moe imports a multimodal config that wants torchvision
        from sglang.srt.layers.moe.utils import MoeA2ABackend

    rc.get_flags().moe.a2a_backend = MoeA2ABackend(moe_ns.moe_a2a_backend)  # as SGLang's flags resolve it
    return moe_ns


def fake_model_layout(monkeypatch: Any, *, num_layers: int, num_logical_experts: int, num_groups: int | None = None) -> None:
    """Make ``ModelConfigForExpertLocation.from_model_config`` answer for a model config."""
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation

    layout = ModelConfigForExpertLocation(num_layers=num_layers, num_logical_experts=num_logical_experts,
                                          num_groups=num_groups)
    monkeypatch.setattr(ModelConfigForExpertLocation, "from_model_config", staticmethod(lambda _cfg: layout))
