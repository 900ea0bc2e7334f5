"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint through the official client.

    vllm serve HuggingFaceH4/zephyr-7b-beta --port 8000     # then:
    OpenAIBackend("HuggingFaceH4/zephyr-7b-beta", base_url="http://localhost:8000/v1").generate(requests)

Works the same against TGI, the llama.cpp server or OpenAI itself (``base_url=None``). The client never
retries by itself; ``OpenAIBackend`` retries what is worth retrying (429, 408, 409, 5xx, timeouts,
connection errors) with capped exponential backoff, and turns what still fails into an ``error`` reply,
so one bad request does not stop a stage of thousands.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, Reply

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "EMPTY"  # what a local server without --api-key accepts (vLLM's convention)
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
COUNTERS = ("requests", "retries", "failures", "rate_limited", "server_errors", "timeouts")
SEED_RANGE = 2**63  # servers parse the seed as a signed 64-bit int


class OpenAIBackend:
    """One OpenAI-compatible endpoint. ``generate`` returns one ``Reply`` per request, in order, with at
    most ``max_concurrency`` requests in flight, each with ``timeout`` seconds.

    The API key is read from the environment variable named ``api_key_env`` and never logged, shown or
    written. Without it: a ``ConfigError`` for OpenAI itself (``base_url=None``), a placeholder key for a
    ``base_url`` (local servers usually need none). ``counts`` (cumulative): ``requests`` handled,
    ``retries`` made, ``failures`` (error replies), and the attempts that met a 429 (``rate_limited``), a
    5xx (``server_errors``) or a timeout (``timeouts``). ``extra_body`` is merged into every request body
    (e.g. vLLM's ``{"top_k": 20}``).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        name: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        extra_body: dict | None = None,
    ) -> None:
        self.model, self.base_url, self.name = model, base_url, name or model
        self.max_concurrency, self.max_retries, self.timeout = max_concurrency, max_retries, timeout
        self.backoff, self.max_backoff, self.extra_body = backoff, max_backoff, dict(extra_body or {})
        where = f"generation backend {self.name!r}"
        checks = [
            (max_concurrency >= 1, f"max_concurrency={max_concurrency} must be >= 1"),
            (max_retries >= 0, f"max_retries={max_retries} must be >= 0"),
            (timeout > 0, f"timeout={timeout} must be > 0"),
            (min(backoff, max_backoff) >= 0, f"backoff={backoff} and max_backoff={max_backoff} must be >= 0"),
        ]
        if problems := [message for ok, message in checks if not ok]:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        try:
            import openai
        except ImportError:
            raise ConfigError(f"{where} needs the openai client: pip install 'zephyr-lit[distill]'") from None
        key = os.environ.get(api_key_env) or None
        if key is None and base_url is None:
            raise ConfigError(f"{where}: environment variable {api_key_env} is not set; export your OpenAI API "
                              f"key in it (or set base_url for a local server)")
        self._openai = openai
        self._secret = key  # only to scrub it from any text we pass on
        self._client = openai.OpenAI(api_key=key or PLACEHOLDER_KEY, base_url=base_url or OPENAI_URL,
                                     max_retries=0, timeout=timeout)
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIBackend(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        """One reply per request, same order; failures are ``Reply("", "error", error=...)``."""
        if not requests:
            return []
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests)), thread_name_prefix="openai") as pool:
            return list(pool.map(self._generate_one, requests))

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The chat-completions arguments for one request (``extra_body`` goes alongside)."""
        sampling = request.sampling
        body = {"model": self.model, "messages": list(request.messages), "temperature": sampling.temperature,
                "max_tokens": sampling.max_new_tokens, "seed": request.seed % SEED_RANGE}
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        return body

    def _generate_one(self, request: ChatRequest) -> Reply:
        self._count("requests")
        body = self.request_body(request)
        for attempt in range(self.max_retries + 1):
            try:
                completion = self._client.chat.completions.create(
                    **body, extra_body=self.extra_body or None, timeout=self.timeout)
            except self._openai.OpenAIError as err:
                reason, retryable, retry_after = self._classify(err)
            else:
                return completion_reply(completion)
            if not retryable or attempt == self.max_retries:
                break
            delay = retry_delay(attempt, self.backoff, self.max_backoff, retry_after)
            self._count("retries")
            log.warning("%s: %s, retry %d/%d in %.2fs", self.name, reason, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        if retryable:
            reason = f"{reason} after {self.max_retries} retries"
        self._count("failures")
        log.warning("%s: request failed: %s", self.name, reason)
        return Reply("", "error", error=reason)

    def _classify(self, err: Exception) -> tuple[str, bool, float | None]:
        """(short reason with the key scrubbed, worth retrying, the server's Retry-After in seconds)."""
        openai = self._openai
        if isinstance(err, openai.APITimeoutError):  # before APIConnectionError, its base class
            self._count("timeouts")
            return "timeout", True, None
        if isinstance(err, openai.APIConnectionError):
            return "connection error", True, None
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status == 429:
                self._count("rate_limited")
            elif status >= 500:
                self._count("server_errors")
            if status in RETRY_STATUSES or status >= 500:
                return f"HTTP {status}", True, retry_after_seconds(err.response.headers)
            detail = err.body.get("message") if isinstance(err.body, dict) else err.body
            return self._scrub(f"HTTP {status}: {detail}" if detail else f"HTTP {status}")[:300], False, None
        return self._scrub(f"{type(err).__name__}: {err}")[:300], False, None

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _count(self, counter: str) -> None:
        with self._lock:
            self.counts[counter] += 1


def completion_reply(completion: Any) -> Reply:
    """A chat completion as a ``Reply``: finish ``length`` stays ``length``, anything else is ``stop``."""
    if not completion.choices:
        return Reply("", "error", error="the response had no choices")
    choice = completion.choices[0]
    return Reply(choice.message.content or "", "length" if choice.finish_reason == "length" else "stop")


def retry_delay(attempt: int, backoff: float, max_backoff: float, retry_after: float | None = None) -> float:
    """Seconds before retry ``attempt + 1``: the server's ``retry_after`` if it sent one, else
    ``backoff * 2**attempt`` with up to 10% jitter; at most ``max_backoff`` either way."""
    if retry_after is not None:
        return min(max_backoff, retry_after)
    return min(max_backoff, backoff * 2.0 ** min(attempt, 60) * (1.0 + 0.1 * random.random()))


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After-Ms``, else ``Retry-After`` (seconds or an HTTP date), in seconds; None if absent or
    unreadable."""
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[header]) * scale)
        except (KeyError, TypeError, ValueError):
            pass
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
