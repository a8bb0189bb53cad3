"""`mer serve` as a user runs it: a real server process on localhost, spoken to by the
official `openai` client and by raw HTTP for what a well-behaved client never sends."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

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
        (["--max-request-bytes", "big"], "--max-request-bytes: not a size"),
    ],
)
def test_serve_rejects_bad_budgets_in_one_line(trained_store, capsys, option, message):
    from mer.cli import main

    assert main(["serve", "--store", str(trained_store), *option]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
