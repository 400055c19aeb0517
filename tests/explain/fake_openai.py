"""An OpenAI-compatible chat-completions server on 127.0.0.1 with scripted faults.

Used by the explain tests and by benchmarks/explain.py (run as a script it serves until
killed and prints its base URL). Every request is logged with its arrival time, its
cache key (computed like `builder.llm.types.Request.key`) and what it got.

Faults are consumed in arrival order from `faults`; a request that draws none is answered
normally after `latency` seconds:
- transient: `429` (with Retry-After), `500`, `503`, `hang` (no answer before the client's
  timeout), `malformed` (a 200 whose body is not JSON);
- terminal: `empty_choices`, `refusal` (the API's refusal field), `content_filter`
  (finish_reason), `blank` (empty content), `sorry` (a refusal in words), `garbage` (no
  phrase), `400` (non-retryable), `400_filter` (Azure-style content filter error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRANSIENT = ("429", "500", "503", "hang", "malformed")
TERMINAL = ("empty_choices", "refusal", "content_filter", "blank", "sorry", "garbage", "400", "400_filter")


def request_key(body: dict[str, Any]) -> str:
    """The call layer's cache key of a received body (same canonical JSON)."""
    keep = {k: v for k, v in body.items() if k not in ("stream", "n")}
    blob = json.dumps(keep, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def default_answer(body: dict[str, Any]) -> str:
    """A phrase that names the request, so a test can tell which answer went where."""
    return f"concept {request_key(body)[:10]}"


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog (5) refuses bursts of connections
    daemon_threads = True


@dataclass
class Entry:
    """One received request."""

    at: float
    key: str
    body: dict[str, Any]
    fault: str
    """The fault it drew, or `ok`."""
    done_at: float = 0.0
    """When the answer was written (0: never, e.g. a hang)."""


@dataclass
class FakeOpenAI:
    latency: float = 0.0
    """Seconds before each answer."""
    faults: list[str] = field(default_factory=list)
    retry_after: str = "0.2"
    """Retry-After header value of the 429 fault (seconds)."""
    hang_seconds: float = 5.0
    answer: Callable[[dict[str, Any]], str] = default_answer
    usage: tuple[int, int] = (100, 5)
    """(prompt_tokens, completion_tokens) reported per answer."""
    log: list[Entry] = field(default_factory=list)
    record: bool = True
    """Parse and log each request (off in the benchmark: the server's own cost stays small)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall between headers and body

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                fake._handle(self)

        self._server = _Server(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    # -- inspection ----------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self.log)

    def answered_keys(self) -> set[str]:
        """Keys of requests that got a normal answer."""
        return {e.key for e in self.entries() if e.fault == "ok" and e.done_at}

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    # -- serving -------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length", "0"))
        raw = h.rfile.read(length)
        if not self.record:
            if self.latency:
                self._stop.wait(self.latency)
            self._send(h, 200, self._completion({}, "the answer"))
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(h, 400, {"error": {"message": "body is not JSON"}})
            return
        with self._lock:
            fault = self.faults.pop(0) if self.faults else "ok"
            entry = Entry(time.monotonic(), request_key(body), body, fault)
            self.log.append(entry)
        if fault == "hang":
            self._stop.wait(self.hang_seconds)
            return  # the client gave up long ago; close without an answer
        if self.latency:
            self._stop.wait(self.latency)
        status, payload, headers = self._reply(fault, body)
        try:
            self._send(h, status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):
            return
        entry.done_at = time.monotonic()

    def _completion(self, body: dict[str, Any], content: str | None, finish: str = "stop",
                    refusal: str | None = None, choices: bool = True) -> dict[str, Any]:
        message = {"role": "assistant", "content": content, "refusal": refusal}
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}] if choices else [],
            "usage": {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1],
                      "total_tokens": sum(self.usage)},
        }

    def _reply(self, fault: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        err = lambda msg, code=None: {"error": {"message": msg, "type": "fake", "code": code}}  # noqa: E731
        if fault == "ok":
            return 200, self._completion(body, self.answer(body)), {}
        if fault == "429":
            return 429, err("rate limited"), {"Retry-After": self.retry_after}
        if fault in ("500", "503"):
            return int(fault), err("server error"), {}
        if fault == "malformed":
            return 200, b'{"id": "chatcmpl-fake", "choices": [', {}
        if fault == "empty_choices":
            return 200, self._completion(body, None, choices=False), {}
        if fault == "refusal":
            return 200, self._completion(body, None, refusal="I can't help with that."), {}
        if fault == "content_filter":
            return 200, self._completion(body, None, finish="content_filter"), {}
        if fault == "blank":
            return 200, self._completion(body, "   "), {}
        if fault == "sorry":
            return 200, self._completion(body, "I'm sorry, but I can't identify what these images show."), {}
        if fault == "garbage":
            return 200, self._completion(body, "...!?"), {}
        if fault == "400":
            return 400, err("bad request"), {}
        if fault == "400_filter":
            return 400, err("filtered", "content_filter"), {}
        raise ValueError(f"unknown fault {fault!r}")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()


async def serve_lean(latency: float, port: int = 0) -> None:
    """A minimal asyncio HTTP/1.1 server that answers every POST with one fixed completion
    after `latency` seconds (no parsing, no log, no faults): the benchmark's endpoint, so
    that the server's own CPU time barely competes with the client being measured."""
    import asyncio

    body = json.dumps(FakeOpenAI()._completion({"model": "gpt-4o"}, "the answer")).encode()
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in headers.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                await asyncio.sleep(latency)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=256)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI endpoint until killed.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--record", action="store_true", help="parse and keep every request")
    parser.add_argument("--lean", action="store_true", help="the minimal asyncio server (benchmarks)")
    args = parser.parse_args()
    if args.lean:
        import asyncio

        asyncio.run(serve_lean(args.latency, args.port))
        return
    server = FakeOpenAI(latency=args.latency, record=args.record).start(args.port)
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
