"""The load channel: a replica's scheduler publishes its ``LoadReport`` each step; routers read.

ZMQ PUB/SUB, one small message (96 bytes) a step, straight from the engine process (where the
scheduler runs) to every router, without the replica's event loop or Ray's controller in the
way (Ray Serve's routing stats go replica -> controller -> long poll, every few seconds at best).
A publisher repeats its last report every ``HEARTBEAT_S`` while nothing new comes (an idle
engine, a long step), so a router tells a quiet replica from a dead one; it stops when the
replica process that started the engine is gone. Subscribers keep only the newest message of each publisher (ZMQ_CONFLATE).

The prefix feed: with prefix affinity, each replica's server also publishes the prefix hashes
of every prompt it receives (``PrefixPublisher``, one message a request), so that every router
learns what the others sent where; its subscribers keep every message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable, Mapping

import zmq

from vllm_prepack.routing import LoadReport, encode_chain

logger = logging.getLogger("vllm_prepack")

HEARTBEAT_S = 0.1
METADATA_KEY = "vllm_prepack_load_endpoint"  # where a Ray Serve replica advertises its endpoint
PREFIX_METADATA_KEY = "vllm_prepack_prefix_endpoint"  # and its prefix feed's,
PREFIX_HASHING_KEY = "vllm_prepack_prefix_hashing"  # hashed so ("block:chars_per_token")
PREFIX_HWM = 4096  # prefix messages queued per peer; past it ZMQ drops the new ones


def free_port(host: str = "0.0.0.0") -> int:
    """A TCP port free now (the engine binds it moments later, as vLLM does with its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LoadPublisher:
    """Owned by the scheduler: ``publish`` hands the newest report to a daemon thread, which
    sends it at once and repeats it every HEARTBEAT_S (a ZMQ socket belongs to one thread)."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 16)
        self._socket.bind(endpoint)  # here, so that a taken port fails engine start
        self._latest: bytes | None = None
        self._wake = threading.Event()
        self._stop = False
        self._parent = os.getppid()
        self._thread = threading.Thread(target=self._run, name="prepack-load", daemon=True)
        self._thread.start()

    def publish(self, report: LoadReport) -> None:
        self._latest = report.encode()
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop and os.getppid() == self._parent:
                self._wake.wait(HEARTBEAT_S)
                self._wake.clear()
                data = self._latest
                if data is not None:
                    self._socket.send(data, zmq.NOBLOCK)  # PUB drops, never blocks
        finally:
            self._socket.close(0)
            self._context.term()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=1)


class PrefixPublisher:
    """A replica server's prefix feed on a port of `host` that ZMQ picks as it binds (no port
    chosen ahead, which another engine could take meanwhile): each prompt's block hashes, sent
    at once from the thread that calls ``publish`` (the server's event loop: one thread owns
    the socket). PUB never blocks: past PREFIX_HWM queued messages it drops the new ones, and
    a router then misses a prefix."""

    def __init__(self, host: str) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, PREFIX_HWM)
        self.endpoint = f"tcp://{host}:{self._socket.bind_to_random_port(f'tcp://{host}')}"

    def publish(self, chain: list[int]) -> None:
        if chain:
            self._socket.send(encode_chain(chain), zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(0)
        self._context.term()


class LoadSubscriber:
    """A router's side: one SUB socket per replica, read by a daemon thread that calls
    ``on_report(replica, decode(message), now)``. ``watch`` sets which replicas to read, from
    anywhere; the thread applies it within its poll interval. `conflate`: keep only each
    replica's newest message (load reports), or every one (the prefix feed)."""

    def __init__(self, on_report: Callable[[Hashable, object, float], None],
                 poll_s: float = 0.05, decode: Callable[[bytes], object] = LoadReport.decode,
                 conflate: bool = True) -> None:
        self._on_report = on_report
        self._decode, self._conflate = decode, conflate
        self._poll_ms = int(poll_s * 1000)
        self._wanted: dict[Hashable, str] = {}
        self._changed = True
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="prepack-load-sub", daemon=True)
        self._thread.start()

    def watch(self, endpoints: Mapping[Hashable, str]) -> None:
        with self._lock:
            self._wanted = dict(endpoints)
            self._changed = True

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=1)

    def _run(self) -> None:
        context = zmq.Context()
        poller = zmq.Poller()
        sockets: dict[Hashable, tuple[str, zmq.Socket]] = {}
        replica_of: dict[zmq.Socket, Hashable] = {}
        try:
            while not self._stop:
                if self._changed:
                    with self._lock:
                        wanted, self._changed = self._wanted, False
                    for replica, (endpoint, sock) in list(sockets.items()):
                        if wanted.get(replica) != endpoint:
                            poller.unregister(sock)
                            sock.close(0)
                            del sockets[replica], replica_of[sock]
                    for replica, endpoint in wanted.items():
                        if replica not in sockets:
                            sock = context.socket(zmq.SUB)
                            sock.setsockopt(zmq.LINGER, 0)
                            if self._conflate:
                                sock.setsockopt(zmq.CONFLATE, 1)
                            else:
                                sock.setsockopt(zmq.RCVHWM, PREFIX_HWM)
                            sock.setsockopt(zmq.SUBSCRIBE, b"")
                            sock.connect(endpoint)
                            poller.register(sock, zmq.POLLIN)
                            sockets[replica] = (endpoint, sock)
                            replica_of[sock] = replica
                for sock, _ in poller.poll(self._poll_ms):
                    while True:  # all that has come (one message where conflated)
                        try:
                            data = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:  # one bad message (another sender on the port) stops nothing
                            self._on_report(replica_of[sock], self._decode(data), time.time())
                        except Exception:
                            logger.exception("message from %s dropped", replica_of[sock])
        finally:
            for _, sock in sockets.values():
                sock.close(0)
            context.term()
