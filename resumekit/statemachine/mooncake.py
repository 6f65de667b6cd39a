"""The protocol across two processes over the Mooncake TransferEngine, control over ZMQ.

The receiver registers its whole :class:`~resumekit.allocator.BlockBuffers`
with the engine once, at start, and posts with each round the addresses of its
blocks; the sender writes the round straight into them (one transfer per run of
adjacent blocks and tensor, all submitted before any is waited on) and only then
sends the round's status. Posts, cancels, statuses and heartbeats are JSON over two ZMQ PUSH/PULL
connections: each end binds ``listen`` and connects to ``peer``.

Each end runs a send thread (it owns the PUSH socket and sends a heartbeat when
idle for a quarter ``timeout``) and a control thread (it owns the PULL socket,
reads messages and watches the connection); the sender adds a writer thread
that performs each round's writes, then passes on its status, in the order the
event loop called ``write_round`` and ``report``. It submits the transfers
asynchronously and sleeps between looks at them: the engine's synchronous calls
spin a CPU until a batch completes. The event loop never blocks,
locks or waits. The peer is lost when its connection drops, when nothing comes
from it for ``timeout``, or when a posted round gets no status for ``timeout``;
the receiver then unregisters its buffers (the engine refuses any later write
into them) before it reports :class:`~resumekit.statemachine.messages.PeerLost`.

Messages (``t`` names the kind; ``inc`` is the request's incarnation):
``hello {session, hidden, dtype, aux}`` (receiver, first: where the sender writes,
what a token's embedding is there, and how long an aux row is), ``post {rid, inc,
epoch, sent, cap, expect, blocks, dst}`` (``dst``: per block, the addresses of
its embeddings, fill ids, three mRoPE rows and aux row), ``cancel {rid, inc,
epoch}``, ``close``; back: ``landed {rid, inc, epoch, tokens, total, final}``,
``cancelled``, ``error {..., reason}``, ``bye``, and first ``hi {to}`` (the session
the sender writes to: a receiver takes statuses only after a hi naming its own);
``ping`` both ways. How each is
read, and what a message that cannot be read does: :mod:`~resumekit.statemachine.jsonwire`.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import torch

from resumekit._check import as_int, check_str
from resumekit.allocator.buffers import MROPE_ROWS, BlockBuffers, EmbeddingTensors
from resumekit.errors import InvalidArgumentError, TransportError, TransportUnavailableError
from resumekit.statemachine import jsonwire
from resumekit.statemachine.distributed import (
    DEFAULT_TIMEOUT,
    Arrived,
    Closed,
    Delivery,
    Lost,
    PostArrived,
    Role,
    _seconds,
    _wait_seconds,
)
from resumekit.statemachine.jsonwire import Key, MalformedMessage, wire_rid
from resumekit.statemachine.messages import (
    Cancelled,
    Landed,
    PeerLost,
    Post,
    RoundPost,
    SenderError,
    Status,
    require_cancel,
    require_post,
    require_status,
)
from resumekit.statemachine.wire import MAX_REASON_BYTES

if TYPE_CHECKING:
    import zmq

INSTALL_HINT: Final = (
    "pip install 'resumekit[mooncake]' (the transfer engine and pyzmq), and the system "
    "packages libibverbs1 and librdmacm1 (apt-get install libibverbs1 librdmacm1)"
)
_POLL_MS: Final = 100  # how often a thread looks at the closing flag
# How long the writer sleeps between looks at a batch in flight. The engine's own
# synchronous calls spin on the batch's status instead: on a host whose CPUs also
# move the bytes (TCP) the spin takes a CPU from the transfer and the copy-out.
_WRITE_POLL_S: Final = 1e-4
_STUCK_POLL_S: Final = 1e-2  # once a batch has been in flight for longer than ``timeout``
_DONE: Final = 1  # transfer_check_status: the batch completed (the engine freed it)
_FAILED: Final = -1  # it failed (freed too); 0 pending, -2 timed out (still the engine's)
_NO_BATCH: Final = (0, -1, 2**64 - 1)  # batch_transfer_async_write could not start it
MAX_STATUS_BYTES: Final = 1 << 20  # what the receiver end reads in one message at most
_EMPTY_STATUSES: tuple[Status, ...] = ()
_EMPTY_POSTS: tuple[Post, ...] = ()


def load_mooncake() -> tuple[Any, Any]:
    """``(mooncake.engine.TransferEngine, zmq)``, or the error that says what to install.

    Sets ``MC_LOG_LEVEL=WARNING`` unless set: the engine logs each connection at INFO.
    """
    try:
        zmq = importlib.import_module("zmq")
    except ImportError as error:
        raise TransportUnavailableError(f"pyzmq is missing ({error}): {INSTALL_HINT}") from None
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # read when the engine starts
    try:
        engine = importlib.import_module("mooncake.engine")
    except (ImportError, OSError) as error:
        raise TransportUnavailableError(
            f"the Mooncake transfer engine cannot be loaded ({error}): {INSTALL_HINT}"
        ) from None
    return engine.TransferEngine, zmq


def _endpoint(value: object, name: str) -> str:
    value = check_str(value, name)
    if "://" not in value:
        raise InvalidArgumentError(f"{name} must be a ZMQ endpoint such as tcp://host:port")
    return value


@dataclass
class _Write:
    """(sender) One round to write: where each piece goes, and the tensors it comes from."""

    key: Key
    session: str
    sources: list[torch.Tensor]
    targets: list[int]
    aux: list[int]
    aux_target: int


def _check_arguments(
    role: Role,
    listen: object,
    peer: object,
    buffers: object,
    engine: object,
    session: object,
    hostname: object,
    protocol: object,
    timeout: object,
    aux_size: object,
) -> tuple[str, str, str, float, int]:
    """The constructor's checks that need neither the engine nor a socket."""
    listen = _endpoint(listen, "listen")
    peer = _endpoint(peer, "peer")
    hostname = check_str(hostname, "hostname")
    if protocol not in ("tcp", "rdma"):
        raise InvalidArgumentError(f"protocol must be 'tcp' or 'rdma', not {protocol!r}")
    seconds = _seconds(timeout, "timeout")
    aux = as_int(aux_size, "aux_size", minimum=2, maximum=1 << 16)
    if buffers is None:
        if role == "receiver":
            raise InvalidArgumentError(
                "buffers: the receiver end needs the BlockBuffers rounds land in"
            )
    elif not isinstance(buffers, BlockBuffers):
        raise InvalidArgumentError(
            f"buffers must be a BlockBuffers or None, not {type(buffers).__name__}"
        )
    if engine is not None and session is None:
        raise InvalidArgumentError(
            "session: with an engine of your own, say how peers name it (host:rpc_port)"
        )
    if session is not None:
        check_str(session, "session")
    return listen, peer, hostname, seconds, aux


def _runs(
    data: EmbeddingTensors, dst: list[list[int]], n: int, bs: int
) -> tuple[list[torch.Tensor], list[int]]:
    """The pieces of ``n`` tokens of ``data`` and where each goes: one per run of blocks
    whose addresses follow on, per tensor (embeddings, fill ids, three mRoPE rows)."""
    rows = [data.embeddings, data.fill_ids, *(data.mrope[r] for r in range(MROPE_ROWS))]
    sources: list[torch.Tensor] = []
    targets: list[int] = []
    for k, src in enumerate(rows):
        per_token = src[:1].numel() * src.element_size()
        start = 0  # the current run: tokens [start, end) to target
        end = 0
        target = following = -1
        for i in range(-(-n // bs)):
            count = min(bs, n - end)
            at = dst[i][k]
            if at != following:
                if end > start:
                    sources.append(src[start:end])
                    targets.append(target)
                start, target = end, at
            end += count
            following = at + count * per_token
        sources.append(src[start:end])
        targets.append(target)
    return sources, targets


_User = tuple[int, Hashable, int]  # (the sender end's id, rid, incarnation)


class _SourceLedger:
    """The source storages sender ends registered with one engine, shared by every end
    that uses it: a storage is registered once and unregistered when the last request
    writing from it ends, through whichever end. One the engine refuses (its owner
    registered it, as an encoder's output pool is) is written as it is, and tried
    again once no request writes from it (its owner may have unregistered it)."""

    _ledgers: ClassVar[dict[int, _SourceLedger]] = {}  # by id(engine), while an end uses it
    _ledgers_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.ends = 0
        self._lock = threading.Lock()
        # address -> (the storage, kept alive while registered; None when the engine
        # refused it), and the requests writing from it
        self.sources: dict[int, tuple[torch.Tensor | None, set[_User]]] = {}

    @classmethod
    def join(cls, engine: Any) -> _SourceLedger:
        with cls._ledgers_lock:
            ledger = cls._ledgers.get(id(engine))
            if ledger is None:
                ledger = cls._ledgers[id(engine)] = cls(engine)
            ledger.ends += 1
            return ledger

    def leave(self, end: int) -> None:
        """``end`` is released: what only its requests still used is unregistered."""
        self.forget(lambda user: user[0] == end)
        with self._ledgers_lock:
            self.ends -= 1
            if self.ends == 0:
                del self._ledgers[id(self.engine)]

    def use(self, t: torch.Tensor, user: _User) -> None:
        """Register the storage under ``t`` unless it is already; ``user`` writes from it."""
        storage = t.untyped_storage()
        address = storage.data_ptr()
        with self._lock:
            known = self.sources.get(address)
            if known is not None:
                known[1].add(user)
                return
            keep = None
            if self.engine.register_memory(address, storage.nbytes()) == 0:
                keep = torch.empty(0, dtype=torch.uint8).set_(storage)
            self.sources[address] = (keep, {user})

    def forget(self, ended: Callable[[_User], bool]) -> None:
        """The requests ``ended`` picks write no more: unregister what nobody else uses."""
        with self._lock:
            for address, (keep, users) in list(self.sources.items()):
                users.difference_update([u for u in users if ended(u)])
                if not users:
                    del self.sources[address]
                    if keep is not None:
                        self.engine.unregister_memory(address)


class MooncakeTransport:
    """One end of the protocol over a Mooncake ``TransferEngine``; ``role`` says which.

    ``listen``: the ZMQ endpoint this end binds (``tcp://host:port``); ``peer``:
    the one the other end binds. ``engine``: an initialised ``TransferEngine``
    the process already has (with ``session``, its ``host:rpc_port`` as peers
    name it); without one, the transport starts its own on ``hostname`` over
    ``protocol`` (``"tcp"``, or ``"rdma"`` on a cluster), whose teardown when the
    transport is collected holds the GIL for about a second: a server passes the
    engine it keeps for the life of the process. The receiver end needs
    the ``buffers`` its rounds land in. Request ids are int64s or strs. Call it
    from one event loop.

    ``MooncakeTransport("receiver", ...)`` is a :class:`MooncakeReceiverEnd`,
    ``"sender"`` a :class:`MooncakeSenderEnd`; a call that belongs to the other
    end raises :class:`TransportError`.
    """

    role: ClassVar[Role]
    _ends: ClassVar[dict[str, type[MooncakeTransport]]] = {}
    _max_message: ClassVar[int] = -1  # bytes; ZMQ drops a peer that sends more; -1: no limit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "role" in cls.__dict__:
            MooncakeTransport._ends.setdefault(cls.role, cls)

    def __new__(cls, role: Role, *args: Any, **kwargs: Any) -> MooncakeTransport:
        end = cls
        if cls is MooncakeTransport:
            try:
                end = MooncakeTransport._ends[role]
            except (KeyError, TypeError):
                raise InvalidArgumentError(
                    f"role must be 'receiver' or 'sender', not {role!r}"
                ) from None
        return super().__new__(end)

    def __init__(
        self,
        role: Role,
        *,
        listen: str,
        peer: str,
        buffers: BlockBuffers | None = None,
        engine: Any = None,
        session: str | None = None,
        hostname: str = "127.0.0.1",
        protocol: Literal["tcp", "rdma"] = "tcp",
        timeout: float = DEFAULT_TIMEOUT,
        aux_size: int = 16,
    ) -> None:
        if role != self.role:
            raise InvalidArgumentError(f"role must be {self.role!r} for {type(self).__name__}")
        listen, peer, hostname, timeout, aux_size = _check_arguments(
            role, listen, peer, buffers, engine, session, hostname, protocol, timeout, aux_size
        )
        self.timeout = timeout
        transfer_engine, self._zmq = load_mooncake()
        if engine is None:
            engine = transfer_engine()
            if engine.initialize(hostname, "P2PHANDSHAKE", protocol, "") != 0:
                raise TransportError(f"the transfer engine did not start on {hostname}")
            session = f"{hostname}:{engine.get_rpc_port()}"
        self.engine = engine
        self.session: str = session  # type: ignore[assignment]
        self.buffers = buffers
        self.aux_size = buffers.aux_size if buffers is not None else aux_size
        self.listen = listen
        self.peer = peer
        self.closed = False
        self.finished = False  # (sender) the receiver said close, or is gone
        self.peer_lost: str | None = None
        self.posted = 0
        self.delivered = 0
        self._registered: list[int] = []  # addresses this end registered with the engine
        self._inbox: deque[Delivery] = deque()
        self._wake = threading.Event()
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closing = False
        self._link_lost = False  # nothing queued can reach the peer: sockets close at once
        self._release_lock = threading.Lock()
        # Released yet; how many threads have left their loops (their sockets closed).
        self._released, self._left_count = False, 0
        self._context = self._zmq.Context()
        # Bind here, so a bad endpoint is refused by the constructor, not by a thread.
        self._pull = self._socket(self._zmq.PULL)
        self._pull.setsockopt(self._zmq.MAXMSGSIZE, self._max_message)
        try:
            self._pull.bind(listen)
        except self._zmq.ZMQError as error:
            self._pull.close(0)
            self._context.term()
            raise InvalidArgumentError(f"listen: cannot bind {listen}: {error}") from None
        self._monitor = self._pull.get_monitor_socket(self._zmq.EVENT_DISCONNECTED)
        self._heard = time.monotonic()
        try:
            self._prepare()
        except BaseException:
            self._release_memory()
            self._monitor.close(0)
            self._pull.close(0)
            self._context.term()
            raise
        self._threads = [
            self._thread(self._send_loop, f"resumekit-{role}-send"),
            self._thread(self._control_loop, f"resumekit-{role}-control"),
            *self._more_threads(),
        ]
        for t in self._threads:
            t.start()

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = self._context.socket(kind)
        s.setsockopt(self._zmq.LINGER, 0)
        return s

    # -- what each end provides ----------------------------------------------------------

    def _prepare(self) -> None:
        """What this end sets up before its threads start."""

    def _more_threads(self) -> list[threading.Thread]:
        return []

    def _thread(self, loop: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                loop()
            finally:
                self._leave()

        return threading.Thread(target=run, name=name, daemon=True)

    def _leave(self) -> None:
        """(each thread, last) The last one out after :meth:`close` releases what it had to
        leave: the memory a stuck write still used, and the ZMQ context."""
        with self._release_lock:
            self._left_count += 1
            last = self._left_count == len(self._threads) and self.closed
        if last:
            self._release()

    def _all_left(self) -> bool:
        return self._left_count == len(self._threads)

    def _release(self) -> None:
        """Unregister this end's memory, then end its ZMQ context in the background; once.

        Ending a context waits for what its sockets still linger to deliver: never on
        the event loop, and never left to the garbage collector (pyzmq ends a context it
        collects, blocking whichever thread collects it)."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
            self._release_memory()
        threading.Thread(target=self._context.term, name="resumekit-zmq-term", daemon=True).start()

    def _on_message(self, m: dict[str, Any]) -> bool:
        """(control thread) One message from the peer; ``False`` ends the loop."""
        raise NotImplementedError

    def _release_memory(self) -> None:
        """Unregister what this end registered with the engine: nothing more lands there."""
        for address in self._registered:
            self.engine.unregister_memory(address)
        self._registered.clear()

    # -- the other end's calls -----------------------------------------------------------

    def _belongs_to(self, role: Role) -> TransportError:
        return TransportError(f"this is the {self.role} end; that call belongs to the {role}")

    def post_round(self, post: RoundPost) -> None:
        raise self._belongs_to("receiver")

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        raise self._belongs_to("receiver")

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers bye and stops."""
        raise self._belongs_to("receiver")

    def poll_statuses(self) -> Sequence[Status]:
        raise self._belongs_to("receiver")

    def poll_posts(self) -> Sequence[Post]:
        raise self._belongs_to("sender")

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        raise self._belongs_to("sender")

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        raise self._belongs_to("sender")

    # -- plumbing ------------------------------------------------------------------------

    def check_request_id(self, rid: object) -> None:
        """Refuse an id this transport cannot carry, before any block is taken."""
        wire_rid(rid)

    def _send(self, **message: Any) -> None:
        self._sends.put(json.dumps(message, separators=(",", ":")).encode())

    def _deliver(self, item: Delivery) -> None:
        self._inbox.append(item)
        self._wake.set()

    def _lost(self, reason: str) -> None:
        if not self._closing:
            self._link_lost = True
            self._deliver(Lost(reason))

    def _losing(self) -> bool:
        return False

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until something arrived; polls never call this."""
        timeout = _wait_seconds(timeout, "timeout")
        if self._losing() and not self.closed:
            limit = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, limit - time.monotonic()))
            return not self._threads_alive()
        if self._inbox:
            return True
        self._wake.clear()
        if self._inbox:
            return True
        return self._wake.wait(timeout)

    def _send_loop(self) -> None:
        push = self._socket(self._zmq.PUSH)
        push.setsockopt(self._zmq.LINGER, int(self.timeout * 1000))
        push.connect(self.peer)
        ping = b'{"t":"ping"}'
        try:
            while True:
                try:
                    item = self._sends.get(timeout=self.timeout / 4)
                except queue.Empty:
                    item = ping
                if item is None:
                    return
                push.send(item)
        finally:
            # Lingers (at most the timeout) so the last messages, a bye, still go out;
            # a lost peer takes nothing more.
            push.close(0 if self._link_lost else None)

    def _control_loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while not self._closing:
                ready = dict(poller.poll(_POLL_MS))
                now = time.monotonic()
                if self._monitor in ready:
                    self._monitor.recv_multipart()
                    self._lost("connection lost: the peer disconnected")
                    return
                if self._pull not in ready:
                    if now - self._heard > self.timeout:
                        self._lost(f"the peer made no progress for {self.timeout:g} s")
                        return
                    continue
                self._heard = now
                try:
                    message = jsonwire.read(self._pull.recv())
                    if message["t"] != "ping" and not self._on_message(message):
                        return
                except MalformedMessage as error:
                    self._lost(f"malformed control message: {error}")
                    return
        except Exception as error:  # never die unheard: the event loop learns the peer is lost
            self._lost(f"the control thread failed: {error!r}")
        finally:
            self._pull.disable_monitor()
            self._monitor.close(0)
            self._pull.close(0)

    def _stop_threads(self) -> None:
        self._closing = True
        self._sends.put(None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """End cleanly: the receiver says close, the sender answers bye, then both close."""
        timeout = _wait_seconds(timeout, "timeout")
        deadline = time.monotonic() + timeout
        self._say_goodbye()
        self._threads[1].join(max(0.0, deadline - time.monotonic()))
        self.close(wait=max(0.0, deadline - time.monotonic()))

    def _say_goodbye(self) -> None:
        """What this end sends when it shuts down cleanly."""

    def close(self, wait: float | None = None) -> None:
        """Stop the threads, unregister this end's memory and close its sockets; never hangs."""
        if wait is not None:
            wait = _wait_seconds(wait, "wait")
        if self.closed:
            return
        self._stop_threads()
        limit = self.timeout + 1.0 if wait is None else wait
        deadline = time.monotonic() + limit
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._release_lock:
            self.closed = True
            everyone_left = self._all_left()
        if everyone_left:
            self._release()

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads if t is not threading.current_thread())


# -- the receiver ------------------------------------------------------------------------


class MooncakeReceiverEnd(MooncakeTransport):
    """The language side's end: ``MooncakeTransport("receiver", listen=, peer=, buffers=)``."""

    role: ClassVar[Role] = "receiver"
    # A status is at most a few dozen KiB (a 1024-character rid, a 4096-byte reason,
    # both JSON-escaped): a peer that sends more is broken, not a reason to hold its bytes.
    _max_message: ClassVar[int] = MAX_STATUS_BYTES

    def _prepare(self) -> None:
        self._lost_reason: str | None = None
        self._greeted = False  # the sender answered the hello, naming this end's session
        self._rounds: dict[Key, float] = {}  # posted rounds with no status yet: when posted
        self._next_check = 0.0
        buffers = self.buffers
        assert buffers is not None
        tensors = (buffers.embeddings, buffers.fill_ids, buffers.mrope, buffers.aux)
        for t in tensors:
            address = t.data_ptr()
            if self.engine.register_memory(address, t.numel() * t.element_size()) != 0:
                self._release_memory()
                raise TransportError(
                    "the transfer engine refused to register the block buffers (it refuses "
                    "memory registered already, by its owner or another end): the receiver "
                    "end registers them itself, to unregister them when the peer is lost"
                )
            self._registered.append(address)
        nb, bs = buffers.num_blocks, buffers.block_size
        self._strides = (
            bs * buffers.hidden_size * buffers.embeddings.element_size(),
            bs * buffers.fill_ids.element_size(),
            bs * buffers.mrope.element_size(),
            nb * bs * buffers.mrope.element_size(),  # one mRoPE row to the next
            buffers.aux_size * buffers.aux.element_size(),
        )
        self._send(
            t="hello",
            session=self.session,
            hidden=buffers.hidden_size,
            dtype=jsonwire.dtype_name(buffers.dtype),
            aux=buffers.aux_size,
        )

    def _losing(self) -> bool:
        return self._lost_reason is not None

    def _say_goodbye(self) -> None:
        if not self._closing:
            self.finish()

    def _addresses(self, blocks: Sequence[int]) -> list[list[int]]:
        """Per block: where its embeddings, fill ids, three mRoPE rows and aux row start."""
        emb, fill, mrope, aux = self._registered
        s_emb, s_fill, s_mrope, s_row, s_aux = self._strides
        return [
            [
                emb + b * s_emb,
                fill + b * s_fill,
                *(mrope + r * s_row + b * s_mrope for r in range(MROPE_ROWS)),
                aux + b * s_aux,
            ]
            for b in blocks
        ]

    def post_round(self, post: RoundPost) -> None:
        require_post(post)
        if self._closing:
            return  # the peer is gone: PeerLost is (about to be) reported
        rid = wire_rid(post.rid)
        allocation = post.allocation
        if allocation is not None and self.buffers is not None:
            self.buffers.allocator.check_live(allocation)
        self._rounds[(rid, post.incarnation, post.epoch)] = time.monotonic()
        self.posted += 1
        self._send(
            t="post",
            rid=rid,
            inc=post.incarnation,
            epoch=post.epoch,
            sent=post.sent,
            cap=post.capacity_tokens,
            expect=post.expect_tokens,
            blocks=list(post.blocks),
            dst=self._addresses(post.blocks),
        )

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        require_cancel(rid, epoch, incarnation)
        if not self._closing:
            self._send(t="cancel", rid=wire_rid(rid), inc=incarnation, epoch=epoch)

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers bye and stops."""
        if not self._closing:
            self._send(t="close")

    def poll_statuses(self) -> Sequence[Status]:
        inbox = self._inbox
        if self._lost_reason is not None:
            return self._report_lost()
        if not inbox and (not self._rounds or time.monotonic() < self._next_check):
            return _EMPTY_STATUSES
        out: list[Status] = []
        now = time.monotonic()
        while inbox:
            item = inbox.popleft()
            if type(item) is Arrived:
                self._rounds.pop(item.key, None)
                out.append(item.status)
            elif type(item) is Lost:
                self._begin_losing(item.reason)
                break
        if self._rounds and now >= self._next_check and self._lost_reason is None:
            self._next_check = now + min(1.0, self.timeout / 4)
            for (rid, _, epoch), posted in self._rounds.items():
                if now - posted > self.timeout:
                    self._begin_losing(
                        f"round {epoch} of request {rid} made no progress for {self.timeout:g} s"
                    )
                    break
        if self._lost_reason is not None:
            # What arrived before the loss still counts: a round that landed is the
            # receiver's (its bytes are in), and only then is the peer lost.
            self.delivered += len(out)
            out.extend(self._report_lost())  # which counts its PeerLost
            return out
        if not out:
            return _EMPTY_STATUSES
        self.delivered += len(out)
        return out

    def _begin_losing(self, reason: str) -> None:
        self._lost_reason = reason
        self._link_lost = True
        self._stop_threads()

    def _report_lost(self) -> Sequence[Status]:
        """``[PeerLost]`` once the threads are out and the buffers unregistered: from
        then on the engine refuses any write into the blocks."""
        with self._release_lock:
            if self.closed or not self._all_left():
                return _EMPTY_STATUSES
            self.closed = True
        self._release()
        self.peer_lost = self._lost_reason
        self._rounds.clear()
        self.delivered += 1
        return [PeerLost(self._lost_reason or "peer lost")]

    def _on_message(self, m: dict[str, Any]) -> bool:
        kind = m["t"]
        if kind == "bye":
            self._deliver(Closed())
            return False
        if kind == "hi":
            to = jsonwire.hi(m)
            if to != self.session:
                # A sender paired with another receiver sends its statuses here: its
                # keys may match ours while its rounds landed in the other's blocks.
                self._lost(
                    f"a sender that writes to {to} reached this end ({self.session}): "
                    "a receiver end serves one sender"
                )
                return False
            self._greeted = True
            return True
        if not self._greeted:
            raise MalformedMessage(f"{kind!r} before the sender said hi")
        status = jsonwire.status(m)
        key: Any = (status.rid, status.incarnation, status.epoch)  # the rid may be a str here
        self._deliver(Arrived(key, status))
        return True


# -- the sender --------------------------------------------------------------------------


class MooncakeSenderEnd(MooncakeTransport):
    """The encode side's end: ``MooncakeTransport("sender", listen=..., peer=...)``."""

    role: ClassVar[Role] = "sender"

    def _prepare(self) -> None:
        self._hello: jsonwire.Hello | None = None  # where and how rounds land
        # Each posted round's block addresses, or why the post's addresses are unusable.
        self._dst: dict[Key, list[list[int]] | str] = {}
        self._jobs: queue.SimpleQueue[_Write | Status | None] = queue.SimpleQueue()
        self._failed: dict[Key, str] = {}  # (writer) rounds whose write failed: why
        self._ledger: _SourceLedger | None = _SourceLedger.join(self.engine)
        # Registered once, as long as the longest aux row: a round writes the receiver's.
        self._aux_stage = torch.zeros(jsonwire.MAX_AUX, dtype=torch.int32)
        address = self._aux_stage.data_ptr()
        if self.engine.register_memory(address, jsonwire.MAX_AUX * 4) != 0:
            raise TransportError("the transfer engine refused to register the aux row")
        self._registered.append(address)

    def _more_threads(self) -> list[threading.Thread]:
        return [self._thread(self._write_loop, "resumekit-write")]

    def _stop_threads(self) -> None:
        super()._stop_threads()
        self._jobs.put(None)

    def _release_memory(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger.leave(id(self))
        super()._release_memory()

    # -- the event loop's calls ----------------------------------------------------------

    def poll_posts(self) -> Sequence[Post]:
        inbox = self._inbox
        if not inbox:
            return _EMPTY_POSTS
        out: list[Post] = []
        while inbox:
            item = inbox.popleft()
            if type(item) is PostArrived:
                out.append(item.post)
            elif type(item) is Closed:
                self.finished = True
            elif type(item) is Lost:
                self.peer_lost = item.reason
                self.finished = True
        return out

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        require_post(post)
        if not isinstance(data, EmbeddingTensors):
            raise InvalidArgumentError(
                f"data must be an EmbeddingTensors, not {type(data).__name__}"
            )
        if self._closing:
            return
        key = (wire_rid(post.rid), post.incarnation, post.epoch)
        dst = self._dst.pop(key, None)
        if dst is None:
            raise TransportError(f"round {post.epoch} of request {post.rid} was never posted")
        if isinstance(dst, str):
            raise TransportError(f"round {post.epoch} cannot be written: {dst}")
        n = data.num_tokens
        if not post.blocks or post.capacity_tokens % len(post.blocks):
            raise TransportError(f"round {post.epoch} post has an inconsistent capacity")
        bs = post.capacity_tokens // len(post.blocks)
        if n > post.capacity_tokens or len(dst) != len(post.blocks):
            raise TransportError(f"round {post.epoch} does not fit the blocks it was posted")
        hello = self._hello
        assert hello is not None  # the hello precedes every post
        emb = data.embeddings
        if emb.shape[1] != hello.hidden or emb.dtype != hello.dtype:
            # Written as it is, it would be misread, or spill into the next blocks.
            raise TransportError(
                f"the source's embeddings are {jsonwire.dtype_name(emb.dtype)} x "
                f"{emb.shape[1]}; the receiver's blocks hold "
                f"{jsonwire.dtype_name(hello.dtype)} x {hello.hidden}"
            )
        if len(aux or ()) > hello.aux:
            raise TransportError(
                f"{len(aux or ())} aux values; the receiver's aux rows hold {hello.aux}"
            )
        sources, targets = _runs(data, dst, n, bs)
        row = [0] * hello.aux  # the whole row: nothing of an earlier round's stays
        for i, v in enumerate(aux or ()):
            row[i] = int(v)
        self._jobs.put(_Write(key, hello.session, sources, targets, row, dst[0][5]))

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        require_status(status)
        rid = wire_rid(status.rid)
        if type(status) is not Landed or status.final:
            # That life ends here: a round it posted and never had written (parked
            # until a source that never came, then cancelled) is dropped with it.
            life = (rid, status.incarnation)
            for key in [k for k in list(self._dst) if k[:2] == life]:
                self._dst.pop(key, None)
        if not self._closing:
            self._jobs.put(status)  # after the round's writes, in the writer thread

    # -- the threads ---------------------------------------------------------------------

    def _on_message(self, m: dict[str, Any]) -> bool:
        kind = m["t"]
        if kind == "hello":
            hello, paired = jsonwire.hello(m), self._hello
            if paired is not None and hello != paired:
                # A second receiver's control socket reached ours: the posts of both
                # would be written to one engine, at the other's addresses.
                self._lost(
                    f"a receiver at {hello.session} said hello to this end, which is "
                    f"paired with {paired.session}: a sender end serves one receiver"
                )
                self._stop_threads()  # the paired receiver sees the disconnect at once
                return False
            if paired is None:
                self._send(t="hi", to=hello.session)  # before any status: says whose they are
            self._hello = hello
        elif kind == "post":
            post, dst = jsonwire.post(m)
            self._dst[(post.rid, post.incarnation, post.epoch)] = dst
            self._deliver(PostArrived(post))
        elif kind == "cancel":
            self._deliver(PostArrived(jsonwire.cancel(m)))
        elif kind == "close":
            self._send(t="bye")
            self._closing = True  # the receiver is done: the heartbeat stops too
            self._sends.put(None)
            self._jobs.put(None)
            self._deliver(Closed())
            return False
        else:
            raise MalformedMessage(f"unknown message {kind!r}")
        return True

    @property
    def pending_posts(self) -> int:
        """Rounds the receiver posted that were neither written nor ended here yet."""
        return len(self._dst)

    def _write_loop(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                if isinstance(job, _Write):
                    self._write(job)
                else:
                    self._pass_on(job)
        except Exception as error:  # an engine call raised: the link goes, nobody waits on it
            self._lost(f"the writer thread failed: {error!r}")
            self._stop_threads()  # the receiver sees the disconnect

    def _write(self, job: _Write) -> None:
        """Write one round; a failure turns the round's status into an error.

        Every piece (each run of blocks per tensor, then the aux row) is submitted
        before any is waited on, each as a batch of one: this engine's
        ``transfer_check_status`` reads a batch's first transfer only, and frees
        the batch when that one is done.
        """
        started: list[int] = []
        problem: str | None = None
        try:
            stage = self._aux_stage[: len(job.aux)]
            stage.copy_(torch.tensor(job.aux, dtype=torch.int32))
            pieces = [(t if t.is_contiguous() else t.contiguous()) for t in job.sources]
            ledger, user = self._ledger, (id(self), *job.key[:2])
            assert ledger is not None  # released only after this thread left
            for t in pieces:
                ledger.use(t, user)
            targets = [*job.targets, job.aux_target]
            for t, target in zip([*pieces, stage], targets, strict=True):
                nbytes = t.numel() * t.element_size()
                batch = self.engine.batch_transfer_async_write(
                    job.session, [t.data_ptr()], [target], [nbytes]
                )
                if batch in _NO_BATCH:
                    problem = "the transfer engine refused to start the round's write"
                    break
                started.append(batch)
        except Exception as error:
            problem = f"the round could not be written: {error}"
        # What was started is waited for even when a later piece failed to start.
        for batch in started:
            if self._finish(batch) != _DONE and problem is None:
                problem = "the transfer engine failed to write the round"
        if problem is not None:
            self._failed[job.key] = problem

    def _finish(self, batch: int) -> int:
        """Wait, sleeping, until the engine says ``batch`` completed or failed.

        Only the engine's word ends the wait (a timed-out batch, -2, is not
        one): a round reported failed while its bytes may still be moving could
        land in blocks the receiver reuses. An engine that never answers leaves
        the round without a status, and the receiver declares the peer lost (and
        unregisters its buffers) after its timeout; the thread then stays alive,
        looking every 10 ms once ``timeout`` has passed, so :meth:`close` keeps
        this end's memory registered and alive for the engine.
        """
        check = self.engine.transfer_check_status
        nap, slow_after = _WRITE_POLL_S, time.monotonic() + self.timeout
        while (status := check(batch)) != _DONE and status != _FAILED:
            time.sleep(nap)
            if nap == _WRITE_POLL_S and time.monotonic() > slow_after:
                nap = _STUCK_POLL_S
        return int(status)

    def _pass_on(self, status: Status) -> None:
        assert isinstance(status, Landed | Cancelled | SenderError)
        rid = wire_rid(status.rid)
        inc, epoch = status.incarnation, status.epoch
        failed = self._failed.pop((rid, inc, epoch), None)
        if isinstance(status, Landed) and failed is None:
            self._send(
                t="landed",
                rid=rid,
                inc=inc,
                epoch=epoch,
                tokens=status.tokens,
                total=status.total,
                final=status.final,
            )
        elif isinstance(status, Cancelled):
            self._send(t="cancelled", rid=rid, inc=inc, epoch=epoch)
        else:
            reason = failed if failed is not None else getattr(status, "reason", "")
            reason = reason.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore") or "?"
            self._send(t="error", rid=rid, inc=inc, epoch=epoch, reason=reason)
        ends = not isinstance(status, Landed) or status.final or failed is not None
        if ends and self._ledger is not None:
            user = (id(self), rid, inc)
            self._ledger.forget(user.__eq__)


__all__ = [
    "INSTALL_HINT",
    "MooncakeReceiverEnd",
    "MooncakeSenderEnd",
    "MooncakeTransport",
    "load_mooncake",
    "wire_rid",
]
