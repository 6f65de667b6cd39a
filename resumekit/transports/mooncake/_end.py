"""What both ends over a Mooncake TransferEngine share: the ZMQ sockets, the send and
control threads, heartbeats, and releasing the engine's memory and the ZMQ context
once, off the event loop. The protocol over it: :mod:`resumekit.transports.mooncake`."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from resumekit._check import check_str
from resumekit.allocator.buffers import BlockBuffers
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Lost,
    Role,
    ThreadedEnd,
    check_timeout,
)
from resumekit.transports.mooncake import jsonwire
from resumekit.transports.mooncake.engine import load_mooncake, start_engine
from resumekit.transports.mooncake.jsonwire import MalformedMessage, wire_rid

if TYPE_CHECKING:
    import zmq

_ENGINE_METHODS: Final = (
    "register_memory",
    "unregister_memory",
    "batch_transfer_async_write",
    "transfer_check_status",
)
_POLL_MS: Final = 100  # how often a thread looks at the closing flag


def _encode(message: dict[str, Any]) -> bytes:
    """A control message as it travels: compact JSON."""
    return json.dumps(message, separators=(",", ":")).encode()


def _endpoint(value: object, name: str) -> str:
    """A ZMQ endpoint a peer can reach: ``tcp://host:port`` with a port 1..65535 (port 0
    binds a port nobody is told), or ``ipc://``/``inproc://`` with a name."""
    value = check_str(value, name)
    scheme, sep, rest = value.partition("://")
    usage = f"{name} must be a ZMQ endpoint such as tcp://host:port, not {value!r}"
    if not sep or not rest or scheme not in ("tcp", "ipc", "inproc"):
        raise InvalidArgumentError(usage)
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidArgumentError(f"{usage}: the port must be 1..65535")
    return value


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
) -> tuple[str, str, str, float]:
    """The constructor's checks that need neither the engine nor a socket."""
    listen = _endpoint(listen, "listen")
    peer = _endpoint(peer, "peer")
    if listen == peer:
        raise InvalidArgumentError(
            f"listen and peer are both {listen}; an end cannot be its own peer"
        )
    hostname = check_str(hostname, "hostname")
    if protocol not in ("tcp", "rdma"):
        raise InvalidArgumentError(f"protocol must be 'tcp' or 'rdma', not {protocol!r}")
    seconds = check_timeout(timeout)
    if role == "receiver" and not isinstance(buffers, BlockBuffers):
        raise InvalidArgumentError(
            "buffers: the receiver end needs the BlockBuffers rounds land in, not "
            f"{type(buffers).__name__}"
        )
    if engine is not None and session is None:
        raise InvalidArgumentError(
            "session: with an engine of your own, say how peers name it (host:rpc_port)"
        )
    if session is not None:
        check_str(session, "session")
    missing = [
        m for m in _ENGINE_METHODS if engine is not None and not callable(getattr(engine, m, None))
    ]
    if missing:
        raise InvalidArgumentError(
            f"engine: a {type(engine).__name__} lacks {', '.join(missing)}; pass a Mooncake "
            "TransferEngine (or None to make one)"
        )
    return listen, peer, hostname, seconds


class MooncakeEnd(ThreadedEnd):
    """What both ends over a Mooncake ``TransferEngine`` share; made through
    :func:`~resumekit.transports.mooncake.MooncakeTransport`, which says what each
    argument is."""

    _max_message: ClassVar[int] = -1  # bytes; ZMQ drops a peer that sends more; -1: no limit

    def __init__(
        self,
        *,
        listen: str,
        peer: str,
        buffers: BlockBuffers | None = None,
        engine: Any = None,
        session: str | None = None,
        hostname: str = "127.0.0.1",
        protocol: Literal["tcp", "rdma"] = "tcp",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        role = self.role
        listen, peer, hostname, timeout = _check_arguments(
            role, listen, peer, buffers, engine, session, hostname, protocol, timeout
        )
        super().__init__(timeout)
        transfer_engine, self._zmq = load_mooncake()
        if engine is None:
            engine, session = start_engine(transfer_engine, hostname, protocol)
        self.engine = engine
        self.session: str = session  # type: ignore[assignment]
        self.buffers = buffers
        self.listen = listen
        self.peer = peer
        self._registered: list[int] = []  # addresses this end registered with the engine
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._link_lost = False  # nothing queued can reach the peer: sockets close at once
        self._farewell = False  # a refusal is queued: the send socket lingers to deliver it
        self._errors: dict[str, TransportError] = {}  # a thread's loss, typed, by its reason
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

    # -- plumbing ------------------------------------------------------------------------

    def check_request_id(self, rid: object) -> None:
        """Refuse an id this transport cannot carry, before any block is taken."""
        wire_rid(rid)

    @property
    def lost_error(self) -> TransportError | None:
        """Why the peer was lost (``peer_lost``) as a typed error: a refused hello is a
        :class:`~resumekit.transports.mooncake.jsonwire.HelloRefused`; ``None`` if it is not."""
        reason = self.peer_lost
        if reason is None:
            return None
        error = self._errors.get(reason)
        return error if error is not None else TransportError(reason)

    def _send(self, **message: Any) -> None:
        self._sends.put(_encode(message))

    def _lost(self, reason: str, error: TransportError | None = None) -> None:
        """(thread) Declare the peer lost for ``reason``; ``error``: that loss, typed."""
        if not self._closing:
            self._link_lost = True
            if error is not None:
                self._errors[reason] = error
            self._deliver(Lost(reason))

    def _send_loop(self) -> None:
        push = self._socket(self._zmq.PUSH)
        ping = b'{"t":"ping"}'
        try:
            push.setsockopt(self._zmq.LINGER, int(self.timeout * 1000))
            push.connect(self.peer)
            while True:
                try:
                    item = self._sends.get(timeout=self.timeout / 4)
                except queue.Empty:
                    item = ping
                if item is None:
                    return
                push.send(item)
        except Exception as error:  # a socket that fails is a lost link, never a dead thread
            failure = TransportError(f"the send thread failed: {error!r}")
            failure.__cause__ = error
            self._lost(str(failure), failure)
            self._stop_threads()  # the peer sees the disconnect at once
        finally:
            # Lingers (at most the timeout) so the last messages, a bye or a refusal,
            # still go out; a lost peer takes nothing more.
            push.close(0 if self._link_lost and not self._farewell else None)

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
                    # What came before the disconnect is read first: a bye, a refusal.
                    while self._pull.poll(0):
                        if not self._read(self._pull.recv()):
                            return
                    self._lost("connection lost: the peer disconnected")
                    return
                if self._pull not in ready:
                    if now - self._heard > self.timeout:
                        self._lost(f"the peer made no progress for {self.timeout:g} s")
                        return
                    continue
                self._heard = now
                if not self._read(self._pull.recv()):
                    return
        except Exception as error:  # never die unheard: the event loop learns the peer is lost
            self._lost(f"the control thread failed: {error!r}")
        finally:
            self._pull.disable_monitor()
            self._monitor.close(0)
            self._pull.close(0)

    def _read(self, raw: bytes) -> bool:
        """(control thread) One message's bytes; ``False`` ends the loop."""
        try:
            message = jsonwire.read(raw)
            return message["t"] == "ping" or self._on_message(message)
        except MalformedMessage as error:
            self._lost(f"malformed control message: {error}")
            return False

    def _stop_threads(self) -> None:
        super()._stop_threads()
        self._sends.put(None)

    def _closed(self) -> None:
        with self._release_lock:
            self.closed = True
            everyone_left = self._all_left()
        if everyone_left:
            self._release()
