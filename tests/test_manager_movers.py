"""The manager's movers (manager/movers.py) behind one Mover protocol, on one process."""

from __future__ import annotations

import time

import pytest
import torch

from eplb_plugin.args import EPLBArgs
from eplb_plugin.errors import ConfigError
from eplb_plugin.executor import LayerMoveError
from eplb_plugin.manager.movers import (
    BackgroundMover,
    BlockingMover,
    Mover,
    default_layers_mover,
    make_mover,
)

LIVE = torch.tensor([[0, 1, 2, 3, 0, 1]] * 3)
# Layer 0 swaps two slots (2 change), layer 1 stays, layer 2 gives two slots to expert 2 (2 change).
TARGET = torch.tensor([[1, 0, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 2]])
WAIT_S = 10.0  # the background mover's thread stages within this (CPU, tiny layers)


def weights_naming(phy2log: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer one float [P, 2] tensor whose row names the slot's expert and the layer."""
    return [[(row.to(torch.float32) * 10 + layer).view(-1, 1).repeat(1, 2)] for layer, row in enumerate(phy2log)]


def args(**kw) -> EPLBArgs:
    return EPLBArgs(**{"ep_size": 2, "enable_eplb": True, **kw}).resolve()


@pytest.mark.parametrize("non_blocking, kind", [(False, BlockingMover), (True, BackgroundMover)])
def test_either_mover_lands_every_layer_one_per_step_and_counts_the_slots(non_blocking, kind):
    weights = weights_naming(LIVE)
    mover = make_mover(args(eplb_non_blocking=non_blocking), group=None, expert_weights=weights,
                       layers_mover=default_layers_mover)
    assert isinstance(mover, kind) and isinstance(mover, Mover)
    assert mover.start([0, 2], live_map=LIVE, target_map=TARGET) == "local"  # one rank: no P2P backend
    landed: list[dict[int, list[int]]] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        step = mover.step(1)
        assert step.error is None and len(step.live) <= 1
        if step.live:
            landed.append({layer: row.tolist() for layer, row in step.live.items()})
        if step.done:
            break
        time.sleep(0.005)  # the background thread stages between pass boundaries
    mover.close()
    assert step.done and landed == [{0: TARGET[0].tolist()}, {2: TARGET[2].tolist()}]
    assert mover.slots_moved == 4 and mover.bytes_moved == 0  # local copies only
    assert all(torch.equal(got[0], want[0]) for got, want in zip(weights, weights_naming(TARGET)))


def test_a_failed_blocking_chunk_serves_the_layers_before_it_and_the_failed_layers_live_map():
    def failing(layers, group, **kwargs):
        raise LayerMoveError("injected", rank=0, layer=kwargs["layer_ids"][1], index=1, live_map=LIVE[2].clone(),
                             bytes_moved=123)

    mover = make_mover(args(), group=None, expert_weights=weights_naming(LIVE), layers_mover=failing)
    mover.start([0, 2], live_map=LIVE, target_map=TARGET)
    step = mover.step(None)
    assert step.done and isinstance(step.error, LayerMoveError) and step.failure == "moving layer 2 failed"
    assert {layer: row.tolist() for layer, row in step.live.items()} == {0: TARGET[0].tolist(), 2: LIVE[2].tolist()}
    assert (mover.slots_moved, mover.bytes_moved) == (2, 123)


@pytest.mark.parametrize("non_blocking", [False, True])
def test_a_transport_that_requires_pulls_is_refused_for_cpu_weights(non_blocking):
    with pytest.raises(ConfigError, match="--eplb-transport ipc pulls weights through CUDA IPC.*use nccl or auto"):
        make_mover(args(eplb_transport="ipc", eplb_non_blocking=non_blocking), group=None,
                   expert_weights=weights_naming(LIVE), layers_mover=default_layers_mover)
