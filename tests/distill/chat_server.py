"""A scripted chat-completions server for tests, on 127.0.0.1 and a free port.

    with ChatServer(script={"q3": ["429"], "q5": ["slow"]}) as server:
        OpenAIBackend("tiny", base_url=server.base_url).generate(requests)

``POST /v1/chat/completions``. A request's last user message picks its script, one action per attempt
(past the end, or unscripted: ``ok``):
  ok      200, content ``echo <last user message> seed=<seed>``, finish ``stop``
  length  the same, finish ``length``      null  content null, finish ``stop``
  slow    ``ok`` after ``slow_s`` seconds (longer than the client's timeout)
  429     Retry-After: 0     400 / 500   an error body     401  an error that repeats the Authorization
Every request is recorded in ``seen`` (lower-cased headers, JSON body, action); ``max_in_flight`` is the
most requests handled at once. ``delay`` holds every answer that long, so that requests overlap.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Seen:
    headers: dict[str, str]
    body: dict
    action: str


class ChatServer:
    def __init__(self, script: dict[str, list[str]] | None = None, delay: float = 0.0, slow_s: float = 3.0) -> None:
        self.script, self.delay, self.slow_s = script or {}, delay, slow_s
        self.seen: list[Seen] = []
        self.attempts: Counter[str] = Counter()  # by last user message
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # lets a ``slow`` answer give up at teardown
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
        self.httpd.chat = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> ChatServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, headers: dict[str, str], body: dict) -> str:
        """The action for this attempt, after recording it."""
        prompt = last_user(body)
        with self.lock:
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
            actions = self.script.get(prompt, [])
            action = actions[attempt] if attempt < len(actions) else "ok"
            self.seen.append(Seen(headers, body, action))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return action


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        chat: ChatServer = self.server.chat  # type: ignore[attr-defined]
        if self.path != "/v1/chat/completions":
            return self.reply(404, error_body("not found", "not_found"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        headers = {k.lower(): v for k, v in self.headers.items()}
        action = chat.record(headers, body)
        try:
            time.sleep(chat.delay)
            if action == "slow" and chat.stopping.wait(chat.slow_s):
                return  # torn down while the client had long given up
            if action in ("429", "400", "500"):
                extra = {"Retry-After": "0"} if action == "429" else {}
                return self.reply(int(action), error_body(f"scripted {action}", "scripted"), extra)
            if action == "401":
                return self.reply(401, error_body(f"bad key: {headers.get('authorization')}", "invalid_api_key"))
            self.reply(200, completion(body, action))
        finally:
            with chat.lock:
                chat.in_flight -= 1

    def reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def last_user(body: dict) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def completion(body: dict, action: str) -> dict:
    content = None if action == "null" else f"echo {last_user(body)} seed={body.get('seed')}"
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "length" if action == "length" else "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "scripted_error", "param": None, "code": code}}
