"""Capture a pass's MoE layers as one CUDA graph, as serving engines run decode.

Without a graph the reference runtime is host-bound on GPUs: each layer launches ~60
kernels, and a pass of 26 DeepSeek-V2-Lite layers spends ~35 ms of host time on them
against ~21 ms of GPU time (2 x H200, 1024 tokens per rank; see the profiles written by
``benchmarks/bench_end_to_end.py --profile-passes``). The step time then measures Python,
not the GPUs' load, which EPLB changes. The MoE forward has fixed shapes (all-gather
dispatch, no host reads) and the static, weighted and dynamic dispatchers are device ops on
tables, so the whole pass can be captured:

- the pass's inputs are copied into static buffers, the graph is replayed, and the
  outputs are read from its static outputs;
- weights are moved in place by the executor (addresses unchanged), and a new map's
  dispatch tables are copied into the captured ones (``ExpertDispatcher.update_``), so
  rebalances keep the graph valid; only a change of table shapes captures again (on every
  rank at the same pass: the capture runs collectives);
- the recorder's count kernels are captured (the recorder counts while a capture is
  under way) and add to its per-pass buffer on each replay, as in SGLang;
- capture is agreed on by every rank (a MAX all-reduce of a failure flag): if any rank
  cannot capture, every rank runs eagerly, so the collectives stay matched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from eplb_plugin.comm import all_reduce_host

logger = logging.getLogger(__name__)

WARMUP_PASSES = 2  # eager passes on a side stream before capture (allocator, cuBLAS, NCCL)
Layers = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class PassGraph:
    """One captured pass: ``replay(h, ids, weights) -> (h_out, received)``.

    layers: the eager pass body, ``(h [t, H], ids [L, t, k], weights [L, t, k]) ->
    (h_out [t, H], received [L, S])``; it must not read device values on the host.
    """

    def __init__(self, layers: Layers, inputs: tuple[torch.Tensor, ...]):
        self.static_inputs = tuple(t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_PASSES):
                layers(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = layers(*self.static_inputs)

    def replay(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for dst, src in zip(self.static_inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.outputs


def capture_agreed(layers: Layers, inputs: tuple[torch.Tensor, ...], *, group: Any) -> PassGraph | None:
    """Capture on every rank of ``group``, or on none (collective): None if any rank failed."""
    graph: PassGraph | None = None
    try:
        graph = PassGraph(layers, inputs)
    except Exception as exc:  # e.g. an op that reads a device value on the host
        logger.warning("CUDA graph capture failed, running eagerly: %s: %s", type(exc).__name__, exc)
    if all_reduce_host(torch.tensor([0 if graph is not None else 1]), group, op="max")[0] > 0:
        graph = None
    return graph
