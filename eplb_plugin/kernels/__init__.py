"""Counting kernels for the recorder: Triton on CUDA, a torch path on CPU, torch references.

Importing this package does not import triton; the Triton kernels load on first use.
"""

from eplb_plugin.kernels._launch import BACKENDS, Backend, launch_geometry, triton_available
from eplb_plugin.kernels.count import count_reference, count_topk, count_topk_torch
from eplb_plugin.kernels.fused import map_and_count, map_and_count_reference, map_reference

__all__ = [
    "BACKENDS",
    "Backend",
    "count_reference",
    "count_topk",
    "count_topk_torch",
    "launch_geometry",
    "map_and_count",
    "map_and_count_reference",
    "map_reference",
    "triton_available",
]
