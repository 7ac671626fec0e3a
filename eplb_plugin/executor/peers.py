"""One-sided pulls: a rank reads the experts it receives straight from its peers' slots.

Why: NCCL's P2P kernels run on SMs and take HBM bandwidth from the forward passes that run
beside a non-blocking move; on one node a GPU's copy engines can read a peer's memory over
NVLink without any SM. ``PeerViews`` holds, for every weight tensor of every layer, where
each peer's copy of it lives in this process's address space (CUDA IPC), so a receiver can
``cudaMemcpyAsync`` a run of the peer's slots into its staging rows. The sender does
nothing for those experts: only receivers act.

- ``PeerViews.exchange(tensors, group)``: collective, once per set of weight tensors (their
  addresses never change: moves are in place). Every rank shares an IPC handle of the
  allocation holding each tensor (and the tensor's offset in it) with its hostname; each
  rank opens its same-host peers' handles (each allocation once per process; they stay open
  for the process's life, as the weights do). Peers on other hosts, or every peer if any
  rank could not open a handle (the ranks agree), are reached through NCCL as before.
- ``SharedPeerViews``: the same pulls between CPU processes whose weights live in shared
  memory (tests; the gloo executor path exercises the pull logic with it).

Safety: a pull reads slots of the sender's last committed map, like a send. Where a round
reads a slot that an earlier round of the same layer wrote (on any rank), the receiver
cannot know from its own stream that the peer's commit ran: ``stage_round`` then posts a
barrier (a one-element all-reduce ordered after this rank's commits) before pulling. The
first round of every call (or mover run) posts one too, for the commits of the call before,
which may still be queued on a peer's stream. A peer writes the slots read by a round only
when it commits that round or a later one, which happens after the round's vote, and every
receiver's vote follows its pulls.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb_plugin.comm import all_reduce_host, group_info
from eplb_plugin.errors import ConfigError, TransferError
from eplb_plugin.executor.plan import LayerTransferPlan
from eplb_plugin.transports import TRANSPORTS, Transport

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the (unified) addresses
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):
    # Bytes, not c_char: a c_char array reads back only up to its first zero byte.
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


def _find_cudart() -> ctypes.CDLL:
    """The CUDA runtime torch loaded (one runtime per process), else one found by name."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    except OSError:
        paths = []
    for name in paths + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise TransferError("no CUDA runtime library (libcudart) could be loaded for the IPC transport")


class _Cuda:
    """The few CUDA runtime and driver calls the pulls need, through ctypes."""

    def __init__(self):
        self.rt = _find_cudart()
        # The copies are queued by the mover's thread beside a serving thread: through PyDLL
        # they keep the GIL (a cudaMemcpyAsync returns at once) instead of giving it up and
        # waiting to take it back from the serving thread after every call.
        self.queue = ctypes.PyDLL(self.rt._name)
        self.drv = ctypes.CDLL("libcuda.so.1")
        self.rt.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        self.rt.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        self.queue.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                               ctypes.c_void_p]
        self.rt.cudaGetErrorString.restype = ctypes.c_char_p
        self.drv.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                     ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self.opened: dict[bytes, int] = {}  # handle -> base address in this process

    def check(self, err: int, what: str) -> None:
        if err:
            self.rt.cudaGetLastError()  # clear it: torch would report it at its next launch
            raise TransferError(f"{what} failed: CUDA error {err} ({self.rt.cudaGetErrorString(err).decode()})")

    def allocation(self, address: int) -> tuple[int, int]:
        """(base, size) of the allocation holding a device address (driver API)."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        err = self.drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address))
        if err:
            raise TransferError(f"cuMemGetAddressRange failed: CUDA driver error {err}")
        return base.value, size.value

    def handle(self, base: int) -> bytes:
        h = _IpcHandle()
        self.check(self.rt.cudaIpcGetMemHandle(ctypes.byref(h), ctypes.c_void_p(base)), "cudaIpcGetMemHandle")
        return bytes(h.reserved)

    def open(self, handle: bytes) -> int:
        """This process's address of a peer's allocation (opened once per process)."""
        if handle not in self.opened:
            ptr = ctypes.c_void_p()
            h = _IpcHandle()
            h.reserved = (ctypes.c_ubyte * 64).from_buffer_copy(handle)
            self.check(self.rt.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, _IPC_LAZY_ENABLE_PEER_ACCESS),
                       "cudaIpcOpenMemHandle")
            self.opened[handle] = ptr.value
        return self.opened[handle]

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.queue.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, _MEMCPY_DEFAULT,
                                           ctypes.c_void_p(stream)), "cudaMemcpyAsync")


_CUDA: _Cuda | None = None


def _cuda() -> _Cuda:
    global _CUDA
    if _CUDA is None:
        _CUDA = _Cuda()
    return _CUDA


def _slot_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size() if t.shape[0] else 0


@dataclass
class PeerViews:
    """Where each same-host peer's copy of each weight tensor lives, for pulls (see module).

    ``index`` maps this rank's tensors (by address) to their position in the exchanged list;
    ``addresses[peer][i]`` is the peer's tensor i in this process (CUDA IPC); ``peers`` are
    the group ranks reached by pulls (mirrored: if r pulls from q then q pulls from r);
    ``active`` is the same on every rank: whether any rank pulls (rounds that need a
    barrier post it on every rank then, see ``needs_barrier``); ``reason``: why not, if not."""

    peers: frozenset[int]
    active: bool
    index: dict[int, int]
    addresses: dict[int, list[int]]
    slot_bytes: list[int]
    reason: str = ""

    @classmethod
    def exchange(cls, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup) -> PeerViews:
        """Collective over group: every rank passes its tensors in the same order (e.g. each
        layer's w13, w2, scales), each contiguous [num_local_slots, ...] of the same per-slot
        shape and dtype on every rank. Returns views with no pull peers when IPC is not
        possible (CPU tensors, no CUDA IPC, one rank per host, any rank failing to open)."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        mine: list[tuple | None] = []
        error = None
        cuda = all(t.is_cuda for t in tensors) and bool(tensors)
        try:
            for t in tensors:
                if not t.is_contiguous():
                    raise ConfigError(f"tensor of shape {tuple(t.shape)} is not contiguous")
                if not cuda:
                    mine.append(None)
                    continue
                base, _ = _cuda().allocation(t.data_ptr())
                mine.append((_cuda().handle(base), t.data_ptr() - base))
        except Exception as exc:  # reported to every rank below (no rank may skip the collective)
            error, mine = f"rank {rank}: {type(exc).__name__}: {exc}", []
        shapes = [(tuple(t.shape), str(t.dtype)) for t in tensors]
        info = (socket.gethostname(), error, shapes, mine)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, info, group=group)
        for r, (_, _, other, _) in enumerate(gathered):
            if other != shapes:
                raise ConfigError(f"rank {r} passed weight tensors of other shapes or dtypes than rank {rank}; "
                                  f"every rank passes its tensors of the same layers in the same order")
        host = gathered[rank][0]
        same = [r for r in range(world) if r != rank and gathered[r][0] == host]
        addresses: dict[int, list[int]] = {}
        hosts = [g[0] for g in gathered]
        why = "" if cuda else "the weights are not on CUDA devices"
        why = why or "; ".join(g[1] for g in gathered if g[1])
        why = why or ("" if len(set(hosts)) < world else "no two ranks share a host")
        if not why:
            try:
                with torch.cuda.device(tensors[0].device):
                    for r in same:
                        addresses[r] = [_cuda().open(h) + off for h, off in gathered[r][3]]
            except Exception as exc:
                why, addresses = f"rank {rank}: {type(exc).__name__}: {exc}", {}
        # Pull only if every rank could open its same-host peers' memory (mirrored sets).
        reasons: list = [None] * world
        dist.all_gather_object(reasons, why, group=group)
        why = next((w for w in reasons if w), "")
        peers = frozenset() if why else frozenset(same)
        return cls(peers=peers, active=not why, index={t.data_ptr(): i for i, t in enumerate(tensors)},
                   addresses=addresses if peers else {}, slot_bytes=[_slot_bytes(t) for t in tensors], reason=why)

    def positions(self, weights: Sequence[torch.Tensor]) -> list[int]:
        """Positions of one layer's tensors in the exchanged list; TransferError if absent."""
        try:
            return [self.index[t.data_ptr()] for t in weights]
        except KeyError:
            raise TransferError("a weight tensor of this move was not in PeerViews.exchange; exchange "
                                "every tensor moved (its address is the key)") from None

    def pull(self, dst: torch.Tensor, peer: int, position: int, src_slot: int, n: int) -> None:
        """Copy the peer's slots [src_slot, src_slot + n) of tensor ``position`` into dst (n
        contiguous rows of this rank's staging), on the current stream, by a copy engine."""
        per = self.slot_bytes[position]
        _cuda().copy(dst.data_ptr(), self.addresses[peer][position] + src_slot * per, n * per,
                     torch.cuda.current_stream(dst.device).cuda_stream)


class SharedPeerViews(PeerViews):
    """Pulls between CPU processes: ``tensors_by_rank[r]`` is rank r's list of weight tensors
    (the same order as this rank's), in shared memory so that every process sees them."""

    def __init__(self, rank: int, tensors_by_rank: Sequence[Sequence[torch.Tensor]]):
        mine = tensors_by_rank[rank]
        peers = frozenset(r for r in range(len(tensors_by_rank)) if r != rank)
        super().__init__(peers=peers, active=bool(peers),
                         index={t.data_ptr(): i for i, t in enumerate(mine)}, addresses={},
                         slot_bytes=[_slot_bytes(t) for t in mine])
        self.tensors = tensors_by_rank

    def pull(self, dst: torch.Tensor, peer: int, position: int, src_slot: int, n: int) -> None:
        dst.copy_(self.tensors[peer][position][src_slot : src_slot + n])


def needs_barrier(earlier: Sequence[LayerTransferPlan], plan: LayerTransferPlan) -> bool:
    """Whether a round (``plan``) reads, on some rank, a slot that an earlier round of the
    same layer (``earlier``) wrote there: its pulls must then wait for every rank's commit of
    those rounds (a barrier). The same answer on every rank (shared plans)."""
    for r, mine in enumerate(plan.ranks):
        reads = {s.src_local_slot for s in mine.sends}
        if reads and any(not reads.isdisjoint(p.ranks[r].changed_local_slots) for p in earlier):
            return True
    return False


def barrier_needed(peers: PeerViews | None, first: bool, earlier: Sequence[LayerTransferPlan],
                   plan: LayerTransferPlan) -> bool:
    """Whether a round posts the pulls' barrier (``stage_round(barrier=...)``; the same answer
    on every rank): only when some rank pulls, and then for the first round of a call or
    mover run (the previous call's commits may still be queued on a peer's stream) or for a
    round that ``needs_barrier`` after the earlier rounds of its layer."""
    return peers is not None and peers.active and (first or needs_barrier(earlier, plan))


@contextmanager
def pulling(peers: PeerViews | None, device: torch.device):
    """Run a round's staging and its vote on the copy stream, after everything the current
    stream has queued (commits, pool rows given back), so that the pulls overlap the current
    stream's later commits and the vote (its NCCL all-reduce waits for the stream it is
    posted from) follows the pulls. No pulls, or CPU: the current stream as it is."""
    if peers is None or not peers.peers or device.type != "cuda":
        yield
        return
    stream = copy_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


_COPY_STREAMS: dict[int, object] = {}


def copy_stream(device: torch.device):
    """A stream per device for pulls, so that they overlap the caller's commits."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return _COPY_STREAMS[index]


def check_transport(transport: str) -> Transport:
    """The registered transport ``transport``; ConfigError naming the known ones."""
    return TRANSPORTS.get(transport)


def resolve_peers(transport: str, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, *,
                  known: PeerViews | None = None) -> PeerViews | None:
    """The views a move's pulls go through under ``transport`` (TRANSPORTS), or None for
    P2P (a transport without pulls, or a single rank). Otherwise collective over group: ``known`` (views
    from an earlier call) is kept while every rank's tensors are the ones it describes
    (agreed by an all-reduce), else they are exchanged again (``PeerViews.exchange``); the
    result may be inactive (pulls impossible, its ``reason`` says why), which a transport
    that requires pulls (ipc) refuses with a ConfigError on every rank alike."""
    kind = check_transport(transport)
    group, _, world = group_info(group)
    if not kind.pulls or world == 1:
        return None
    stale = known is None or any(t.data_ptr() not in known.index for t in tensors)
    if all_reduce_host(torch.tensor([float(stale)]), group, op="max")[0] > 0:  # every rank alike
        known = PeerViews.exchange(tensors, group)
    if kind.requires_pulls and not known.active:
        others = [name for name in TRANSPORTS if not TRANSPORTS.get(name).requires_pulls]
        raise ConfigError(f"transport {transport} is not possible here ({known.reason}); use {' or '.join(others)}")
    return known
