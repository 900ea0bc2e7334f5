"""The openai backend against a scripted chat-completions server on 127.0.0.1 (tests/distill/chat_server.py):
replies in order, retries that recover, failures that stay failures, a bounded pool, and a key that never
leaks."""

from __future__ import annotations

import logging
import socket
import sys

import pytest

from tests.distill.chat_server import ChatServer
from zephyr_lit.distill.openai_backend import OpenAIBackend, retry_after_seconds, retry_delay
from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, Reply, Sampling

pytest.importorskip("openai")

KEY_ENV = "ZEPHYR_TEST_OPENAI_KEY"
KEY = "sk-test-do-not-leak-7f3a9c"


@pytest.fixture
def serve():
    """``serve(**ChatServer kwargs)``: a started server, stopped at teardown."""
    servers: list[ChatServer] = []

    def start(**kwargs) -> ChatServer:
        servers.append(ChatServer(**kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def ask(prompt: str, seed: int = 0, sampling: Sampling = Sampling()) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
                       sampling=sampling, seed=seed)


def backend(server: ChatServer, **kwargs) -> OpenAIBackend:
    return OpenAIBackend("tiny-chat", base_url=server.base_url, api_key_env=KEY_ENV,
                         **{"backoff": 0.01, "timeout": 5.0, **kwargs})


def test_replies_come_back_in_order_after_a_rate_limit_and_a_timeout(serve, key, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the client's and httpx2's included
    server = serve(script={"q3": ["429"], "q5": ["slow"]}, slow_s=3.0)
    model = backend(server, timeout=1.0, max_concurrency=4)
    replies = model.generate([ask(f"q{i}", seed=100 + i) for i in range(8)])

    assert replies == [Reply(f"echo q{i} seed={100 + i}", "stop") for i in range(8)]
    assert model.counts == {"requests": 8, "retries": 2, "failures": 0, "rate_limited": 1,
                            "server_errors": 0, "timeouts": 1}
    assert [s.action for s in server.seen].count("ok") == 8 and len(server.seen) == 10
    assert {s.headers["authorization"] for s in server.seen} == {f"Bearer {key}"}
    assert any("HTTP 429, retry 1/5" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for text in (repr(replies), repr(model.counts), repr(model), str(model), caplog.text):
        assert key not in text


def test_a_request_always_answered_500_fails_after_max_retries_and_the_others_succeed(serve, key):
    server = serve(script={"bad": ["500"] * 10})
    model = backend(server, max_retries=3)
    replies = model.generate([ask("a"), ask("bad"), ask("b")])

    assert replies == [Reply("echo a seed=0"), Reply("", "error", error="HTTP 500 after 3 retries"),
                       Reply("echo b seed=0")]
    assert server.attempts["bad"] == 4  # the first try and 3 retries
    assert model.counts == {"requests": 3, "retries": 3, "failures": 1, "rate_limited": 0,
                            "server_errors": 4, "timeouts": 0}


def test_a_400_is_not_retried(serve, key):
    server = serve(script={"bad": ["400"]})
    model = backend(server)
    [reply] = model.generate([ask("bad")])

    assert reply == Reply("", "error", error="HTTP 400: scripted 400")
    assert server.attempts["bad"] == 1
    assert model.counts["retries"] == 0 and model.counts["failures"] == 1


def test_an_error_message_that_repeats_the_key_is_scrubbed(serve, key, caplog):
    server = serve(script={"who": ["401"]})
    model = backend(server)
    [reply] = model.generate([ask("who")])

    assert reply.finish_reason == "error" and reply.error == "HTTP 401: bad key: Bearer ***"
    assert server.attempts["who"] == 1
    assert key not in caplog.text


def test_no_more_than_max_concurrency_requests_are_in_flight(serve, key):
    server = serve(delay=0.1)
    model = backend(server, max_concurrency=3)
    replies = model.generate([ask(f"q{i}", seed=i) for i in range(12)])

    assert [r.text for r in replies] == [f"echo q{i} seed={i}" for i in range(12)]
    assert 2 <= server.max_in_flight <= 3  # they overlap, and never more than 3


def test_sampling_seed_and_extra_body_arrive_in_the_body(serve, key):
    server = serve()
    model = backend(server, extra_body={"top_k": 20})
    model.generate([ask("nucleus", seed=2**64 + 5, sampling=Sampling(temperature=0.7, top_p=0.9, max_new_tokens=33)),
                    ask("greedy", seed=7)])
    nucleus, greedy = sorted((s.body for s in server.seen), key=lambda b: b["messages"][-1]["content"], reverse=True)

    assert nucleus == {"model": "tiny-chat", "messages": [{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "nucleus"}],
                       "temperature": 0.7, "top_p": 0.9, "max_tokens": 33, "seed": 5, "top_k": 20}
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 512 and greedy["seed"] == 7
    assert "top_p" not in greedy  # top_p = 1 is not sent


def test_finish_reason_length_stays_length_and_null_content_is_empty(serve, key):
    server = serve(script={"long": ["length"], "empty": ["null"]})
    replies = backend(server).generate([ask("long"), ask("empty")])

    assert replies == [Reply("echo long seed=0", "length"), Reply("", "stop")]


def test_a_missing_key_for_openai_itself_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        OpenAIBackend("gpt-4o-mini", api_key_env=KEY_ENV)


def test_a_missing_key_for_a_local_server_uses_a_placeholder(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve()
    [reply] = backend(server).generate([ask("hi")])

    assert reply == Reply("echo hi seed=0")
    assert server.seen[0].headers["authorization"] == "Bearer EMPTY"


def test_without_the_openai_package_the_error_says_what_to_install(monkeypatch, key):
    monkeypatch.setitem(sys.modules, "openai", None)  # makes ``import openai`` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'zephyr-lit\[distill\]'"):
        OpenAIBackend("gpt-4o-mini", api_key_env=KEY_ENV)


def test_bad_settings_are_reported_together():
    with pytest.raises(ConfigError, match=r"max_concurrency=0 must be >= 1; max_retries=-1 must be >= 0"):
        OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", max_concurrency=0, max_retries=-1)


def test_backoff_doubles_with_jitter_is_capped_and_retry_after_wins():
    """backoff=1: attempt 3 waits 1 * 2**3 = 8 s plus up to 10%; attempt 10 would be 1024 s, capped at 60."""
    assert 8.0 <= retry_delay(3, 1.0, 60.0) <= 8.8
    assert retry_delay(10, 1.0, 60.0) == 60.0
    assert retry_delay(3, 1.0, 60.0, retry_after=2.5) == 2.5
    assert retry_delay(0, 1.0, 60.0, retry_after=3600.0) == 60.0
    assert retry_after_seconds({"retry-after": "0"}) == 0.0
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({}) is None


def test_a_server_that_is_not_there_is_a_connection_error_after_the_retries(key):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = OpenAIBackend("tiny-chat", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV,
                          max_retries=1, backoff=0.01)
    [reply] = model.generate([ask("anyone?")])

    assert reply == Reply("", "error", error="connection error after 1 retries")
    assert model.counts["retries"] == 1 and model.counts["failures"] == 1
