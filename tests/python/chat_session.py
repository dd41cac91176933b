"""A small test client for the gateway's `Chat.Open` bidirectional stream.

Outgoing frames go through a queue that feeds the request iterator grpc consumes; a reader
thread moves incoming frames into another queue, so tests can wait for a frame with a
deadline instead of blocking forever. Heartbeats are sent whenever nothing else was sent
for one heartbeat interval, as a real client does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from bluetick.gateway.v1 import chat_pb2, chat_pb2_grpc

# Deadline for every unary RPC, for connecting and for each awaited frame, in seconds.
RPC_TIMEOUT_S = 10.0

# Marks the end of the incoming stream in the incoming queue.
_STREAM_CLOSED = object()
# Marks the end of the outgoing stream in the outgoing queue.
_HALF_CLOSE = object()


def bearer(token: str) -> list[tuple[str, str]]:
    """Returns the call metadata that authenticates as the device owning token."""
    return [("authorization", f"Bearer {token}")]


class ChatSession:
    """One device's open chat stream."""

    def __init__(self, channel: grpc.Channel, token: str, heartbeat_interval_s: float = 2.0):
        self._outgoing: queue.Queue = queue.Queue()
        self._incoming: queue.Queue = queue.Queue()
        # Frames read while waiting for another kind, handed out by later expect() calls.
        self._stash: list[chat_pb2.ServerFrame] = []
        self._closed_error: grpc.RpcError | None = None
        self._stream_ended = False
        self.heartbeat_interval_s = heartbeat_interval_s
        stub = chat_pb2_grpc.ChatStub(channel)
        self._call = stub.Open(self._requests(), metadata=bearer(token))
        self._reader = threading.Thread(target=self._read, name="chat-reader", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[chat_pb2.ClientFrame]:
        while True:
            try:
                frame = self._outgoing.get(timeout=self.heartbeat_interval_s)
            except queue.Empty:
                frame = chat_pb2.ClientFrame(heartbeat=chat_pb2.Heartbeat())
            if frame is _HALF_CLOSE:
                return
            yield frame

    def _read(self) -> None:
        try:
            for frame in self._call:
                self._incoming.put(frame)
        except grpc.RpcError as error:
            self._incoming.put(error)
        self._incoming.put(_STREAM_CLOSED)

    def send(self, frame: chat_pb2.ClientFrame) -> None:
        """Queues a frame for the server."""
        self._outgoing.put(frame)

    def expect(
        self,
        kind: str,
        matches: Callable[[object], bool] | None = None,
        timeout_s: float = RPC_TIMEOUT_S,
    ):
        """Returns the payload of the next server frame whose oneof is `kind` (and that
        `matches`, if given), waiting at most timeout_s.

        Other frames are kept for later calls. An error frame, while waiting for something
        else, fails the test at once with the server's message.
        """
        for index, frame in enumerate(self._stash):
            if self._is_match(frame, kind, matches):
                del self._stash[index]
                return getattr(frame, kind)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {kind!r} frame within {timeout_s}s; other frames received: "
                    f"{[f.WhichOneof('frame') for f in self._stash]}"
                )
            if self._stream_ended:
                raise AssertionError(
                    f"chat stream ended while waiting for {kind!r}: {self._closed_error!r}"
                )
            try:
                item = self._incoming.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is _STREAM_CLOSED:
                self._stream_ended = True
                continue
            if isinstance(item, grpc.RpcError):
                self._closed_error = item
                continue
            if self._is_match(item, kind, matches):
                return getattr(item, kind)
            if item.WhichOneof("frame") == "error":
                error = item.error
                raise AssertionError(
                    f"server sent an error frame while waiting for {kind!r}: "
                    f"code={error.code} message={error.message!r} ids={list(error.message_ids)}"
                )
            self._stash.append(item)

    @staticmethod
    def _is_match(frame, kind: str, matches) -> bool:
        if frame.WhichOneof("frame") != kind:
            return False
        return matches is None or matches(getattr(frame, kind))

    def close(self) -> None:
        """Half-closes the stream, then cancels the call and joins the reader."""
        self._outgoing.put(_HALF_CLOSE)
        self._call.cancel()
        self._reader.join(timeout=5)
