"""`mer serve` as a user runs it: a real server process on localhost, spoken to by the
official `openai` client and by raw HTTP for what a well-behaved client never sends."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

import mer
from mer.errors import MerError
from mer.serve.app import Server, ServerSettings, serve
from mer.serve.local import LocalServer

openai = pytest.importorskip("openai")

MODEL = "stdlib"


def start_server(store, *extra: str) -> LocalServer:
    options = ["--model-name", MODEL, "--ram-budget", "1MiB", "--kv-budget", "16MiB", *extra]
    return LocalServer(store, *options)


def request(port: int, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def metrics(port: int) -> dict[str, float]:
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    lines = [ln.split() for ln in text.decode().splitlines() if not ln.startswith("#")]
    return {name: float(value) for name, value in lines}


@pytest.fixture(scope="module")
def server(trained_store):
    with start_server(trained_store) as local:
        yield local.port


WELL_FORMED = {"model": MODEL, "prompt": "def fibonacci(n):\n", "max_tokens": 8, "temperature": 0}


def completion_text(port: int, body: dict | bytes) -> str:
    status, payload = request(port, "POST", "/v1/completions", body)
    assert status == 200, payload
    return json.loads(payload)["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(server) -> str:
    """What the well-formed request answers on a fresh server."""
    return completion_text(server, WELL_FORMED)


@pytest.fixture(autouse=True)
def _still_serving(request):
    """After every test on the shared server, the next well-formed request gets the right
    answer and /health says ok: no test may leave the server broken."""
    shared = "server" in request.fixturenames
    if shared:
        port, want = request.getfixturevalue("server"), request.getfixturevalue("reference")
    yield
    if shared:
        assert completion_text(port, WELL_FORMED) == want
        assert request_health(port) == (200, {"status": "ok"})


def request_health(port: int) -> tuple[int, dict]:
    status, payload = request(port, "GET", "/health")
    return status, json.loads(payload)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")


def test_models_chat_and_completions_through_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == [MODEL]

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a function."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0

    done = client.completions.create(
        model=MODEL, prompt="def fibonacci(n):\n", max_tokens=10, temperature=0
    )
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10
    assert done.choices[0].text.strip()

    # Streaming gives the same text as the non-streaming call, then usage.
    stream = client.completions.create(
        model=MODEL,
        prompt="def fibonacci(n):\n",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10

    pieces = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a function."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert streamed == chat.choices[0].message.content


def test_stop_strings_end_the_completion(client):
    full = client.completions.create(
        model=MODEL, prompt="def fibonacci(n):\n", max_tokens=24, temperature=0
    ).choices[0]
    stop = full.text.strip()[:3]
    cut = client.completions.create(
        model=MODEL, prompt="def fibonacci(n):\n", max_tokens=24, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)


def test_a_stop_string_ends_a_completion_as_it_ends_generate(server, trained_store):
    """The server cuts text at stop strings itself (the engine knows no text): the same
    text, finish reason and token count as `Model.generate`, streamed or not, and the
    request it cancels stops generating."""
    prompt = "def fibonacci(n):\n"
    model = mer.open(trained_store, ram_budget="1MiB")
    try:
        full = model.generate(prompt, max_tokens=24)
        stop = full.text[len(full.text) // 2 :][:3]
        done = model.generate(prompt, max_tokens=24, stop=[stop])
    finally:
        model.close()
    assert done.finish_reason == "stop" and len(done.token_ids) < 24
    generated_before = metrics(server)["mer_generation_tokens_total"]
    body = {**WELL_FORMED, "prompt": prompt, "max_tokens": 400, "stop": [stop]}
    status, payload = request(server, "POST", "/v1/completions", body)
    answer = json.loads(payload)
    assert status == 200 and answer["choices"][0]["text"] == done.text
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == len(done.token_ids)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, events = request(server, "POST", "/v1/completions", streamed)
    chunks = [
        json.loads(line[len("data: ") :])
        for line in events.decode().splitlines()
        if line.startswith("data: {")
    ]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks[:-1]) == done.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(done.token_ids)
    deadline = time.monotonic() + 60
    while metrics(server)["mer_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    m = metrics(server)
    assert m["mer_requests_running"] == 0 and m["mer_kv_blocks_used"] == 0
    assert m["mer_generation_tokens_total"] - generated_before < 2 * 100  # not 2 x 400


def test_each_request_under_8_way_concurrency_equals_its_output_alone(client):
    prompts = [f"def f{i}(x):\n    return" for i in range(8)]

    def run(i: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0.9, seed=100 + i
            )
            .choices[0]
            .text
        )

    alone = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8)))
    assert together == alone
    assert len(set(alone)) > 1  # the seeds and prompts really differ


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"model": MODEL, "prompt": 5}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "stop": [1]}, 400, "stop"),
        ({"model": MODEL, "prompt": "x", "n": 3}, 400, "n"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x " * 3000}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    got, payload = request(server, "POST", "/v1/completions", body)
    assert got == status
    error = json.loads(payload)["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert request(server, "GET", "/health")[0] == 200


def test_chat_errors_and_limits(server):
    path = "/v1/chat/completions"
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
    assert request(server, "POST", path, bad_role)[0] == 400
    assert request(server, "POST", path, {"model": MODEL, "messages": []})[0] == 400
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}
    status, payload = request(server, "POST", path, long)
    assert status == 400 and json.loads(payload)["error"]["code"] == "context_length_exceeded"
    huge = b'{"model": "stdlib", "prompt": "' + b"x" * (2 << 20) + b'"}'
    assert request(server, "POST", "/v1/completions", huge)[0] == 413
    assert request(server, "GET", "/v1/completions")[0] == 405
    assert request(server, "GET", "/v2/nothing")[0] == 404


def test_disconnected_streams_free_their_sequences_and_kv_blocks(server):
    body = json.dumps(
        {"model": MODEL, "prompt": "def f(x):\n", "max_tokens": 200, "stream": True}
    ).encode()
    generated_before = metrics(server)["mer_generation_tokens_total"]
    for _ in range(50):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
        conn.request("POST", "/v1/completions", body=body)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event arrived: the sequence is running
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["mer_requests_running"] == m["mer_requests_waiting"] == m["mer_kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    assert m["mer_requests_running"] == 0 and m["mer_kv_blocks_used"] == 0
    assert m["mer_requests_waiting"] == 0
    assert m["mer_requests_finished_total"] == m["mer_requests_total"]
    # Clients that left stopped their generation: nowhere near 50 x 200 tokens were made.
    assert m["mer_generation_tokens_total"] - generated_before < 50 * 200 / 4
    assert request(server, "GET", "/health")[0] == 200


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(server):
    before = metrics(server)["mer_generation_tokens_total"]
    body = json.dumps({"model": MODEL, "prompt": "def f(x):\n", "max_tokens": 900}).encode()
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
        conn.request("POST", "/v1/completions", body=body)
        time.sleep(0.2)  # the request is admitted and generating
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["mer_requests_running"] == m["mer_requests_waiting"] == 0:
            break
        time.sleep(0.2)
    assert m["mer_requests_running"] == 0 and m["mer_kv_blocks_used"] == 0
    assert m["mer_generation_tokens_total"] - before < 5 * 900 / 3


def test_metrics_report_tokens_cache_and_dedup(server, client):
    client.completions.create(model=MODEL, prompt="import os\n", max_tokens=4)
    m = metrics(server)
    assert m["mer_generation_tokens_total"] > 0 and m["mer_ssd_read_bytes_total"] > 0
    assert 0 <= m["mer_expert_cache_hit_ratio"] <= 1 and m["mer_expert_dedup_factor"] >= 1
    assert m["mer_kv_blocks_total"] > 0


def test_an_api_key_is_required_when_set(trained_store):
    with start_server(trained_store, "--api-key", "sesame") as local:
        port = local.port
        status, payload = request(port, "GET", "/v1/models")
        assert status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame")
        assert ok.models.list().data[0].id == MODEL
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="guess")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_serve_on_port_0_announces_the_port_it_got(trained_store):
    cmd = [sys.executable, "-m", "mer.cli", "serve", "--store", str(trained_store), "--port", "0"]
    proc = subprocess.Popen(cmd + ["--kv-budget", "16MiB"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving ") and ":0/" not in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        for _ in range(100):
            try:
                status, body = request(port, "GET", "/health")
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_port_in_use(trained_store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "mer.cli", "serve", "--store", str(trained_store)]
            + ["--port", str(port), "--kv-budget", "16MiB"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr


def test_bench_serve_compares_batching_with_one_at_a_time(trained_store, capsys):
    from mer.cli import main

    args = ["bench", "serve", "--store", str(trained_store), "--agents", "2", "--turns", "2"]
    assert main([*args, "--max-tokens", "4", "--think", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│      2 │")]
    assert len(rows) == 2 and "1 at a time" in rows[0] and "batched" in rows[1]
    assert "│ x" in rows[1] and "│ /" in rows[1]  # the batched run's ratios to the baseline


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--kv-budget", "1KiB"], "KV budget of 1024 bytes holds 0 blocks"),
        (["--kv-budget", "lots"], "--kv-budget: not a size"),
        (["--kv-budget", "64TiB"], "KV budget of 64.0 TiB needs a pool of"),
        (["--max-request-bytes", "big"], "--max-request-bytes: not a size"),
    ],
)
def test_serve_rejects_bad_budgets_in_one_line(trained_store, capsys, option, message):
    from mer.cli import main

    assert main(["serve", "--store", str(trained_store), *option]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---- issue 19: one request must never stop the others ----


def test_extreme_sampling_values_neither_stop_generation_nor_hang(server, reference):
    # Before: each of these killed the engine thread, and every later request hung.
    greedy = {**WELL_FORMED, "temperature": 1e-40}
    assert completion_text(server, greedy) == reference  # a tiny temperature is greedy
    tiny_top_p = {**WELL_FORMED, "temperature": 1.0, "top_p": 1e-300, "seed": 3}
    assert completion_text(server, tiny_top_p) == reference  # keeps the top token only
    assert completion_text(server, {**WELL_FORMED, "temperature": 2.0, "seed": 1})
    for field in ("temperature", "top_p"):
        for constant in ("NaN", "Infinity", "-Infinity", "1e999"):
            raw = json.dumps(WELL_FORMED)[:-1] + f', "{field}": {constant}}}'
            status, payload = request(server, "POST", "/v1/completions", raw.encode())
            assert status == 400, (field, constant, payload)
            assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    status, payload = request(server, "POST", "/v1/completions", {**WELL_FORMED, "top_p": 0})
    assert status == 400 and json.loads(payload)["error"]["param"] == "top_p"


def test_a_lone_surrogate_or_non_utf8_body_is_an_openai_400(server):
    cases = [
        ("/v1/completions", {**WELL_FORMED, "prompt": "x\ud800y"}, "prompt"),
        ("/v1/completions", {**WELL_FORMED, "stop": ["\udfff"]}, "stop[0]"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
            "messages[0].content",
        ),
        ("/v1/completions", {**WELL_FORMED, "user\ud800": 1}, "user\\ud800"),
        ("/v1/completions", {**WELL_FORMED, "logit_bias": {"\udc00": 1}}, "logit_bias.\\udc00"),
    ]
    for path, body, param in cases:
        status, payload = request(server, "POST", path, body)  # json.dumps escapes it: \ud800
        assert status == 400, payload
        error = json.loads(payload)["error"]
        assert error["param"] == param and "surrogate" in error["message"]
    for raw in (b'{"model": "stdlib", "prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000):
        status, payload = request(server, "POST", "/v1/completions", raw)
        assert status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]


def test_the_same_sampling_rule_as_the_cli_and_api(server):
    for body, param in [
        ({**WELL_FORMED, "temperature": 2.5}, "temperature"),
        ({**WELL_FORMED, "temperature": 10**400}, "temperature"),
        ({**WELL_FORMED, "max_tokens": 10**400}, "max_tokens"),
        ({**WELL_FORMED, "top_k": -1}, "top_k"),
        ({**WELL_FORMED, "top_k": 2.5}, "top_k"),
    ]:
        status, payload = request(server, "POST", "/v1/completions", body)
        assert status == 400, payload
        assert json.loads(payload)["error"]["param"] == param


# ---- liveness: a dead or stuck engine is visible, and a dead one stops the server ----


class _Crash(BaseException):
    """What `except Exception` cannot catch: the engine thread really dies."""


def engine(trained_store, **options):
    """An in-process model and scheduler whose `step` a test can slow down or break."""
    model = mer.open(trained_store, ram_budget="1MiB")
    return model, model.scheduler("16MiB", **options)


@contextmanager
def http_app(model, scheduler):
    """The server's app on real HTTP (uvicorn on a free port), without serve()'s exit on
    a dead engine, so that what it answers then can be seen."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    app = Server(model, scheduler, ServerSettings(MODEL)).app()
    http = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not http.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        http.should_exit = True
        thread.join(30)
        sock.close()
        scheduler.close()
        model.close()


def test_a_stuck_scheduler_is_unhealthy_and_turns_new_work_away(trained_store):
    model, scheduler = engine(trained_store, stuck_after=0.5)
    real_step, release = scheduler.step, threading.Event()

    def slow_step() -> bool:
        release.wait(60)
        return real_step()

    scheduler.step = slow_step
    scheduler.start()
    with http_app(model, scheduler) as port, ThreadPoolExecutor(1) as pool:
        try:
            assert request_health(port) == (200, {"status": "ok"})
            first = pool.submit(completion_text, port, WELL_FORMED)
            time.sleep(1.0)
            status, body = request_health(port)
            assert status == 503 and body["status"] == "unhealthy"
            assert "stuck" in body["reason"] and "limit 0.5 s" in body["reason"]
            assert metrics(port)["mer_scheduler_healthy"] == 0
            status, payload = request(port, "POST", "/v1/completions", WELL_FORMED)
            assert status == 503 and "stuck" in json.loads(payload)["error"]["message"]
        finally:
            release.set()
        assert first.result(60)  # the slow step finished: its request completed
        assert request_health(port) == (200, {"status": "ok"})
        assert metrics(port)["mer_scheduler_healthy"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_is_unhealthy_and_refuses_requests(trained_store):
    model, scheduler = engine(trained_store)

    def dying_step() -> bool:
        raise _Crash("engine bug")

    scheduler.step = dying_step
    scheduler.start()
    with http_app(model, scheduler) as port:
        status, payload = request(port, "POST", "/v1/completions", WELL_FORMED)
        assert status == 500 and "died: _Crash" in json.loads(payload)["error"]["message"]
        assert scheduler.stopped.wait(30)
        status, body = request_health(port)
        assert status == 503 and "scheduler thread died: _Crash" in body["reason"]
        m = metrics(port)
        assert m["mer_scheduler_healthy"] == 0 and m["mer_requests_failed_total"] == 1
        status, payload = request(port, "POST", "/v1/completions", WELL_FORMED)
        error = json.loads(payload)["error"]
        assert status == 503 and error["type"] == "server_error" and "died" in error["message"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_serve_fails_waiting_clients_and_exits_with_an_error_when_the_engine_dies(
    trained_store,
):
    model, scheduler = engine(trained_store)
    gate = threading.Event()

    def dying_step() -> bool:
        gate.wait(60)
        raise _Crash("engine bug")

    scheduler.step = dying_step
    scheduler.start()
    urls: queue.Queue[str] = queue.Queue()
    outcome: dict[str, str] = {}

    def run() -> None:
        try:
            serve(model, scheduler, ServerSettings(MODEL), "127.0.0.1", 0, announce=urls.put)
        except MerError as e:
            outcome["error"] = str(e)

    server_thread = threading.Thread(target=run)
    server_thread.start()
    try:
        port = int(urls.get(timeout=60).split(":")[2].split("/")[0])
        streamed = {**WELL_FORMED, "stream": True}
        with ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(request, port, "POST", "/v1/completions", body)
                for body in (WELL_FORMED, streamed)
            ]
            deadline = time.monotonic() + 30
            while scheduler.stats.requests < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            (status, payload), (stream_status, events) = [w.result(60) for w in waiting]
        assert status == 500 and "died" in json.loads(payload)["error"]["message"]
        assert stream_status == 200 and b'"server_error"' in events and b"died" in events
    finally:
        gate.set()
        server_thread.join(60)
    assert not server_thread.is_alive()
    assert outcome["error"].startswith("the scheduler thread died (_Crash)")


def test_an_unexpected_exception_in_a_request_is_an_openai_shaped_500(trained_store):
    model, scheduler = engine(trained_store)
    scheduler.start()

    def broken_template(messages):  # a bug on the request path, outside the engine
        raise RuntimeError("template bug")

    model.chat_prompt = broken_template
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with http_app(model, scheduler) as port:
        status, payload = request(port, "POST", "/v1/chat/completions", chat)
        error = json.loads(payload)["error"]
        assert status == 500 and error["type"] == "server_error"
        assert error["message"] == "internal error: RuntimeError: template bug"
        assert completion_text(port, WELL_FORMED)  # the server goes on
        assert request_health(port) == (200, {"status": "ok"})
