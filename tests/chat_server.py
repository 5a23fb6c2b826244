"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, scripted per
request, for the `openai` grounding backend's tests (unit and through Ray)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, Any, float]  # (HTTP status, JSON body or raw bytes, delay in seconds)


class ChatServer:
    """A real HTTP server on 127.0.0.1 speaking /v1/chat/completions, scripted per request."""

    def __init__(self, script: Callable[[int, dict[str, Any]], Reply]) -> None:
        self.script, self.requests = script, []  # type: ignore[var-annotated]
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    index = len(owner.requests)
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    status, payload, delay = owner.script(index, body)
                    time.sleep(delay)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


