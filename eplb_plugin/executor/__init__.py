"""Executor: plan and apply expert-weight moves between EP ranks (see transfer.py's design).

Public entry for one layer: ``move_experts``; for a whole rebalance, pipelined across
layers: ``move_layers``; non-blocking: ``AsyncExpertMover``. Between ranks of one host,
``PeerViews`` (peers.py) lets receivers pull experts with copy engines instead of NCCL. Schedules (``LayerMoveSchedule``)
are pure CPU and may be computed ahead, off the serving path.
"""

from eplb_plugin.executor.integrity import fingerprint, verify_slots
from eplb_plugin.executor.layers import move_layers
from eplb_plugin.executor.nonblocking import AsyncExpertMover, LayerMove
from eplb_plugin.executor.peers import PeerViews, SharedPeerViews
from eplb_plugin.executor.plan import (
    LayerMoveSchedule,
    LayerTransferPlan,
    LocalCopy,
    MoveSchedule,
    RankTransferPlan,
    Recv,
    Send,
    plan_layer_rounds,
    plan_layer_transfer,
    plan_transfers,
    schedule_layer_move,
)
from eplb_plugin.executor.transfer import LayerMoveError, MoveResult, move_experts, prepare_staging
from eplb_plugin.transports import TRANSPORTS, Transport

__all__ = [
    "AsyncExpertMover",
    "LayerMove",
    "LayerMoveError",
    "LayerMoveSchedule",
    "LayerTransferPlan",
    "LocalCopy",
    "MoveResult",
    "MoveSchedule",
    "PeerViews",
    "RankTransferPlan",
    "Recv",
    "Send",
    "SharedPeerViews",
    "TRANSPORTS",
    "Transport",
    "fingerprint",
    "move_experts",
    "move_layers",
    "plan_layer_rounds",
    "plan_layer_transfer",
    "plan_transfers",
    "prepare_staging",
    "schedule_layer_move",
    "verify_slots",
]
