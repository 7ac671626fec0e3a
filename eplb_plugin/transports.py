"""How ranks on one host move expert weights (``--eplb-transport``): the registered
transports and what each promises (a leaf module: the manager reads it without importing
the executor, and ``executor/peers.py`` acts on it; the flag's ``Literal`` in ``args.py`` is
tested against it)."""

from __future__ import annotations

from dataclasses import dataclass

from eplb_plugin.registry import Registry


@dataclass(frozen=True)
class Transport:
    """A way to move expert weights between same-host ranks.

    pulls: receivers read their peers' slots with copy engines through CUDA IPC
        (``peers.PeerViews``) where every rank can; the others travel by P2P (NCCL on GPU).
    requires_pulls: pulls or nothing: where they are impossible (weights off CUDA, a handle
        that does not open) the move is refused with a ConfigError instead of falling back
        to P2P.
    """

    name: str
    pulls: bool
    requires_pulls: bool = False


TRANSPORTS: Registry[Transport] = Registry("--eplb-transport")
NCCL = TRANSPORTS.register(Transport("nccl", pulls=False))
IPC = TRANSPORTS.register(Transport("ipc", pulls=True, requires_pulls=True))
AUTO = TRANSPORTS.register(Transport("auto", pulls=True))
