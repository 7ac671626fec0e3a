"""Executor: plan and apply expert-weight moves between EP ranks (see transfer.py's design).

Public entry for one layer: ``move_experts``; for a whole rebalance, pipelined across
layers: ``move_layers``; non-blocking: ``AsyncExpertMover``. Between ranks of one host,
``PeerViews`` (peers.py) lets receivers pull experts with copy engines instead of NCCL. Schedules (``LayerMoveSchedule``)
are pure CPU and may be computed ahead, off the serving path.
"""

from eplb_plugin.executor.contract import LayerMoveError
from eplb_plugin.executor.integrity import fingerprint
from eplb_plugin.executor.layers import move_layers
from eplb_plugin.executor.nonblocking import AsyncExpertMover, LayerMove
from eplb_plugin.executor.peers import PeerViews
from eplb_plugin.executor.rounds import LayerMoveSchedule
from eplb_plugin.executor.transfer import move_experts

# The face: what callers outside the package use. Plans, staging, integrity checks and the
# peer-view internals are imported from their submodules.
__all__ = [
    "AsyncExpertMover",
    "LayerMove",
    "LayerMoveError",
    "LayerMoveSchedule",
    "PeerViews",
    "fingerprint",
    "move_experts",
    "move_layers",
]
