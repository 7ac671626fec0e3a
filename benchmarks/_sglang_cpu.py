"""SGLang's EPLB modules on a CPU machine, for the benchmarks that run them: SGLang imports
``torchvision``, which ``scripts/install_sglang_cpu.sh`` does not install beside the CPU
torch; ``tests/sglang_stubs`` holds the stand-in the tests use (README: installing with SGLang)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SGLANG_STUBS = Path(__file__).resolve().parents[1] / "tests" / "sglang_stubs"


def use_sglang_stubs() -> None:
    """Put the torchvision stand-in on ``sys.path`` where torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None and str(SGLANG_STUBS) not in sys.path:
        sys.path.insert(0, str(SGLANG_STUBS))
