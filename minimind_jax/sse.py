"""Server-Sent Events for clients that must keep reading (the chat and completions streams of the server).

A client that sends its request and then never reads its stream cannot be told from a slow one while the
connection takes the chunks: they pile up in the client's receive buffer, then in the server's socket buffer,
then in uvicorn's write buffer (64 KiB). Once those are full, sending the next chunk waits. Linux grows a
socket's send buffer up to 4 MiB (``net.ipv4.tcp_wmem``): a never-reading client on 127.0.0.1 took 3 MB, about
14,000 chunks, before a send waited; :func:`listening_socket` fixes it at 64 KiB per connection (the kernel
doubles it to 128 KiB), so ~200 KB (about 1,000 chunks, with a client's default 128 KiB receive buffer) fill the
path. :class:`EventStream`
times every send: one that has not gone through within ``stall_s`` seconds (the connection took nothing for that
long) calls ``on_stall`` once, which cancels the request's rows and so frees their decode slots; the response
then stops taking chunks from its source, and when (if ever) the client reads again it gets an error event
(``code: "stream_not_read"``) and ``data: [DONE]``. A client that closes its connection ends the response as
with any stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

__all__ = ["SEND_BUFFER_BYTES", "STALL_S", "EventStream", "listening_socket"]

log = logging.getLogger("minimind_jax.server")

STALL_S = 15.0  # seconds a send may wait before the client is taken as not reading its stream

SEND_BUFFER_BYTES = 64 * 1024  # each connection's socket send buffer (SO_SNDBUF; no autotuning beyond it)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response of ``events`` (``data: ...`` lines); ``on_stall()`` is called (on the
    event loop) when one chunk cannot be sent for ``stall_s`` seconds."""

    def __init__(self, events: AsyncIterator[str], on_stall: Callable[[], None], stall_s: float = STALL_S):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_stall, self.stall_s = on_stall, stall_s
        self.stalled = False

    def _stall(self) -> None:
        self.stalled = True
        log.warning("a client has not read its stream for %.0f s: its generation is stopped", self.stall_s)
        self.on_stall()

    async def _send_chunk(self, send, chunk: str | bytes) -> None:
        body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
        timer = asyncio.get_running_loop().call_later(self.stall_s, self._stall)
        try:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            timer.cancel()

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await self._send_chunk(send, chunk)
            if self.stalled:
                break
        if self.stalled:
            await self.body_iterator.aclose()  # its rows were cancelled: nothing more comes
            error = {"message": f"the stream was not read for {self.stall_s:g} s; its generation was stopped",
                     "type": "invalid_request_error", "param": None, "code": "stream_not_read"}
            await send({"type": "http.response.body", "more_body": True,
                        "body": f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def listening_socket(host: str, port: int, send_buffer: int = SEND_BUFFER_BYTES) -> socket.socket:
    """A bound, listening TCP socket for uvicorn (``Server.run(sockets=[...])``) whose connections inherit a
    send buffer of ``send_buffer`` bytes, so a client that stops reading fills it soon."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
