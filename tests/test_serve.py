"""`litquant serve` through the real `openai` client and raw HTTP: completions, streamed chat, concurrent clients
(continuous batching gives each the tokens it gets alone), bad requests, a client that disconnects, 100 requests."""

import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

PROMPTS = [
    "def fib(",
    "import os\nimport sys\n\ndef main(",
    "class Foo:\n    def __init__(self",
    "x = [",
    "for i in range(",
    "# add two numbers\ndef add(a, b):\n    ",
    "with open(path) as f:\n",
    "try:\n    ",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "litquant.cli",
            "serve",
            "--port",
            str(port),
            "--precision",
            "32-true",
            "--max_batch_size",
            "8",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                break
        except OSError:
            time.sleep(0.25)
    yield url, port
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _health(url) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def _post(port, path, body, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        path,
        body=raw if raw is not None else json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


@pytest.fixture(scope="module")
def reference():
    """What each prompt decodes alone, greedily, in-process (the same load path and precision)."""
    from litquant.api import LLM

    llm = LLM.load(precision="32-true", progress=False)
    return {p: llm.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS}, llm


def test_models_and_completions_through_the_openai_client(server, reference):
    url, _ = server
    client = _client(url)
    models = client.models.list()
    model = models.data[0].id
    assert model == "litquant-tiny"
    out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert out.choices[0].text == reference[0][PROMPTS[0]]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens == len(reference[1].tokenizer.encode(PROMPTS[0]))
    two = client.completions.create(model=model, prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [
        reference[0][p] for p in PROMPTS[:2]
    ]
    stop = reference[0][PROMPTS[0]][5:9]
    cut = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_streamed_chat_through_the_openai_client(server, reference):
    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": "What is a list?"}]
    full = client.chat.completions.create(
        model="litquant-tiny", messages=messages, max_tokens=20, temperature=0
    )
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(
        model="litquant-tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert len([p for p in pieces if p]) > 1  # streamed in pieces
    assert (
        "".join(pieces) == full.choices[0].message.content == reference[1].chat(messages, 20, temperature=0)
    )
    assert reasons[-1] == "length" and usage.completion_tokens == 20


def test_concurrent_clients_get_what_they_get_alone(server, reference):
    url, _ = server
    client = _client(url)

    def one(p):
        return (
            client.completions.create(model="litquant-tiny", prompt=p, max_tokens=24, temperature=0)
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, PROMPTS * 2))
    assert got == [reference[0][p] for p in PROMPTS * 2]


@pytest.mark.parametrize(
    "body,status,param",
    [
        (None, 400, None),  # malformed JSON
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "stop": 3}, 400, "stop"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
    ],
)
def test_bad_completion_requests_are_4xx_and_the_server_goes_on(server, body, status, param):
    url, port = server
    code, err = _post(port, "/v1/completions", body, raw="{not json" if body is None else None)
    assert code == status, err
    assert err["error"]["type"] in ("invalid_request_error", "not_found_error") and err["error"]["message"]
    assert err["error"]["param"] == param
    assert _post(port, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ],
)
def test_bad_chat_requests_are_400(server, body, param):
    _, port = server
    code, err = _post(port, "/v1/chat/completions", body)
    assert code == 400 and err["error"]["param"] == param, err


def test_openai_client_raises_on_bad_requests(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError):
        _client(url).completions.create(model="litquant-tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="nope", prompt="x", max_tokens=2)


def test_a_client_that_disconnects_frees_its_row(server):
    url, port = server
    before = _health(url)["finished"].get("cancelled", 0)
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "def fib(", "max_tokens": 250, "stream": True, "temperature": 0}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    sock.close()
    for _ in range(100):
        h = _health(url)
        if h["active"] == 0 and h["finished"].get("cancelled", 0) > before:
            break
        time.sleep(0.05)
    assert h["active"] == 0 and h["waiting"] == 0
    assert h["finished"].get("cancelled", 0) == before + 1  # it stopped before its 250 tokens


def test_a_hundred_concurrent_requests(server):
    url, port = server

    def one(i):
        return _post(
            port,
            "/v1/completions",
            {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0.7, "seed": i},
        )

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:2]
    assert all(r["usage"]["completion_tokens"] == 8 for _, r in results)
    h = _health(url)
    assert h["active"] == 0 and h["waiting"] == 0 and h["alive"]


def test_serve_cli_errors_are_one_line(server):
    _, port = server
    busy = run_cli("serve", "--port", str(port))
    assert (
        busy.returncode == 1
        and "cannot listen on 127.0.0.1" in busy.stderr
        and "Traceback" not in busy.stderr
    )
    bad = run_cli("serve", "--max_batch_size", "0")
    assert bad.returncode == 1 and "--max_batch_size must be at least 1" in bad.stderr
