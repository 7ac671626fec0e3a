"""EPLBManager, the face of the package: a state machine that decides when to rebalance,
starts a planning job, and hands the plan to a mover.

Every rank calls ``on_forward_pass_end()`` after every forward pass. The manager is a
state machine driven from that call, so all collectives run on the serving thread, at pass
boundaries, in the same order on every rank:

1. IDLE: count passes. A rebalance triggers every ``--eplb-rebalance-num-iterations``
   passes, or (checked every ``check_every_passes``) after ``--eplb-rebalance-interval-s``
   seconds, or for the layers whose load drifted below ``--eplb-drift-threshold`` cosine
   similarity to the load last planned on (``triggers.py``). Time and drift verdicts are
   all-reduced (MAX), so ranks whose clocks differ still agree.
2. GATHER: the recorder's window (logical [L, E] and physical [L, P] counts) is summed over
   ranks. If the window's balancedness is already >= the
   ``--eplb-min-rebalancing-utilization-threshold``, the rebalance is skipped.
3. PLANNING: rank 0 runs the placement policy in a planning job (``planning.py``: a
   background thread), so serving never waits for the solver. While it runs, rank 0
   broadcasts a one-int status per pass.
4. When the plan is ready, rank 0 broadcasts the new map (and replica weights): every rank
   gets exactly the same plan (``targets.py`` turns it into the target placement). A failed
   (or timed-out) plan is broadcast as a failure and re-raised as RebalanceError on every
   rank's serving thread; the old placement stays. A timed-out plan cannot be interrupted:
   while it still runs, a rebalance that comes due is skipped (counted, with the reason)
   instead of starting another, so at most one plan runs and its late result is dropped.
5. MOVING: ``--eplb-rebalance-layers-per-chunk`` layers per pass (all at once by default)
   move through the mover (``movers.py``: blocking, or in the background with
   ``--eplb-non-blocking``). A layer's new map goes live only once its weights landed on
   every rank; a failed layer stays on the map its weights match, the error is re-raised,
   and serving continues.

``on_location_change(location)`` is called whenever any layer's map changes, so the host
rebuilds its dispatch tables; the recorder gets the new map too (a new map epoch).
"""

from eplb_plugin.manager.core import (
    DEFAULT_CHECK_EVERY_PASSES,
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_PLAN_TIMEOUT_S,
    EPLBManager,
    Phase,
)
from eplb_plugin.manager.records import RebalanceRecord, RebalanceTotals

# The face: what callers outside the package use. The seams (planning jobs, movers, the pure
# target logic, the collaborators' protocols) are imported from their submodules.
__all__ = [
    "DEFAULT_CHECK_EVERY_PASSES",
    "DEFAULT_HISTORY_LIMIT",
    "DEFAULT_PLAN_TIMEOUT_S",
    "EPLBManager",
    "Phase",
    "RebalanceRecord",
    "RebalanceTotals",
]
