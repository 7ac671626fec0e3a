"""The package imports cheaply and its presets match the published model configs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from eplb_plugin.configs import PRESET_NAMES, get_preset
from eplb_plugin.errors import ConfigError

BLOCK_HEAVY = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'triton', 'sglang', 'deep_ep'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import torch
import eplb_plugin, eplb_plugin.args, eplb_plugin.location, eplb_plugin.dispatch, eplb_plugin.configs
assert not torch.cuda.is_initialized(), 'a GPU was touched at import'
print('ok')
"""


def test_import_needs_no_triton_sglang_or_deep_ep_and_touches_no_gpu():
    out = subprocess.run([sys.executable, "-c", BLOCK_HEAVY], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "name, layers, experts, top_k, hidden, inter",
    [
        ("deepseek-v3", 58, 256, 8, 7168, 2048),
        ("deepseek-v2-lite", 26, 64, 6, 2048, 1408),
        ("kimi-k2-thinking", 60, 384, 8, 7168, 2048),
        ("qwen3-235b-a22b", 94, 128, 8, 4096, 1536),
        ("qwen3-vl-235b-a22b", 94, 128, 8, 4096, 1536),
        ("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
        ("mixtral-8x7b", 32, 8, 2, 4096, 14336),
    ],
)
def test_presets_hold_the_published_moe_shapes(name, layers, experts, top_k, hidden, inter):
    p = get_preset(name)
    assert (p.num_layers, p.num_logical_experts, p.top_k, p.hidden_size, p.moe_intermediate_size) == (
        layers, experts, top_k, hidden, inter)


def test_deepseek_v3_expert_is_88_mb_in_bf16():
    p = get_preset("deepseek-v3")
    assert p.expert_bytes * 2 // p.dtype_bytes == 3 * 7168 * 2048 * 2


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("gpt-5")
    assert "tiny" in PRESET_NAMES


REPO = Path(__file__).resolve().parents[1]


def test_readme_installs_from_the_clone_never_from_a_package_index():
    """eplb-plugin is not on a package index: no README command installs it by name."""
    readme = (REPO / "README.md").read_text()
    assert not re.search(r"pip install\s+['\"]?eplb[-_]plugin\b", readme)
    assert "pip install -e ." in readme and "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_sglang_cpu_install_puts_sglang_after_the_modules_it_needs():
    """scripts/install_sglang_cpu.sh removes an earlier sglang, installs the modules, then sglang
    with --no-deps last, so pip's resolver never reports sglang's CUDA pins as conflicts."""
    script = (REPO / "scripts" / "install_sglang_cpu.sh").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith("python -m pip install")]
    assert len(commands) == 2
    modules, sglang = commands
    assert "sglang" not in modules and sglang.endswith('--no-deps "sglang==0.5.23"')
    assert script.index("pip uninstall -q -y sglang") < script.index(modules) < script.index("transformers==")
