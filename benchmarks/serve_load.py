"""Load test for `litquant serve` (a benchmark, not a test): aggregate tokens/sec and time to first token (p50/p95)
at several numbers of concurrent clients, each sending streamed completion requests back to back.

    python benchmarks/serve_load.py                                  # bundled model: 32-true and bnb.nf4
    python benchmarks/serve_load.py --model 200m --clients 1,4,16    # the random 200M Llama of scale.py
    python benchmarks/serve_load.py --url http://127.0.0.1:8000      # a server that is already running
    python benchmarks/serve_load.py --peer litgpt                    # also `litgpt serve` (0.5.13), where it installs

Starts the server itself (one per mode) unless --url is given. The client is raw asyncio HTTP/1.1 (one
connection per client, no third-party client) so that it costs the server's CPU as little as possible; it still
shares the machine, which is in the JSON (loadavg, cores). Writes benchmarks/out/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from litquant.benchmark.modes import check_modes, split_mode  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

PROMPTS = [
    "def fib(",
    "import os\nimport sys\n\ndef main(",
    "class Stack:\n    def __init__(self",
    "for i in range(",
    "# read a file and count its lines\ndef count_lines(path):\n",
    "x = [",
    "def quicksort(items):\n",
    "with open(path) as f:\n",
]


async def request(host: str, port: int, body: dict, path: str = "/v1/completions") -> dict:
    """One streamed request: time to first text, completion tokens (from usage), total time."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status = (await reader.readline()).decode()
    if " 200 " not in status:
        rest = await reader.read()
        writer.close()
        raise RuntimeError(f"{status.strip()}: {rest[-300:]!r}")
    ttft, tokens, text, pieces = None, 0, "", 0
    async for raw in reader:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
            piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
            pieces += bool(piece)
    writer.close()
    # a server without usage counts: one streamed piece per token
    return dict(
        ttft=ttft if ttft is not None else time.perf_counter() - t0,
        tokens=tokens or pieces,
        total=time.perf_counter() - t0,
    )


async def load(
    host: str,
    port: int,
    clients: int,
    requests_per_client: int,
    max_tokens: int,
    model: str,
    chat: bool = False,
) -> dict:
    async def client(c: int) -> list[dict]:
        out = []
        for r in range(requests_per_client):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            body = dict(
                model=model,
                max_tokens=max_tokens,
                temperature=0.8,
                seed=c * 1000 + r,
                stream=True,
                stream_options={"include_usage": True},
            )
            if chat:  # LitServe's OpenAI spec has the chat endpoint only
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            out.append(await request(host, port, body, "/v1/chat/completions" if chat else "/v1/completions"))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return dict(
        clients=clients,
        requests=len(results),
        tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(1000 * statistics.median(ttfts), 1),
        ttft_p95_ms=round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            said = [line for line in (proc.stderr.read() if proc.stderr else "").splitlines() if line.strip()]
            raise UserError(f"the server exited ({proc.returncode}): {(said or ['?'])[-1][:300]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UserError("the server did not come up")


def model_id(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            return json.load(r)["data"][0]["id"]
    except OSError:  # no model list (LitServe)
        return "model"


def run_mode(cmd: list[str], args, label: str, chat: bool = False) -> dict:
    port = free_port()
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_healthy(port, proc)
        mid = model_id(port)
        asyncio.run(load("127.0.0.1", port, 1, 2, 8, mid, chat))  # warm-up
        rows = []
        for c in args.clients:
            row = asyncio.run(load("127.0.0.1", port, c, args.requests, args.max_tokens, mid, chat))
            rows.append(row)
            print(
                f"{label:>24}  {c:>3} clients  {row['tokens_per_s']:>8.1f} tok/s"
                f"  TTFT p50 {row['ttft_p50_ms']:>7.1f} ms  p95 {row['ttft_p95_ms']:>7.1f} ms",
                flush=True,
            )
        base = rows[0]["tokens_per_s"]
        for row in rows:
            row["speedup_vs_first"] = round(row["tokens_per_s"] / base, 2)
        return dict(label=label, command=" ".join(cmd), rows=rows)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="bundled",
        choices=["bundled", "200m", "1.1b"],
        help="the bundled model, or a random Llama of scale.py",
    )
    ap.add_argument("--modes", default="32-true,bnb.nf4", help="comma list: a precision or a --quantize mode")
    ap.add_argument("--clients", default="1,4,8,16", help="comma list of concurrent clients")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--url", default=None, help="measure a running server instead")
    ap.add_argument(
        "--peer", default=None, help="litgpt: also measure `litgpt serve` (its venv, see peer_litgpt.py)"
    )
    args = ap.parse_args()
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise UserError(f"--clients takes a comma list of integers, got {args.clients!r}") from None
    modes = args.modes.split(",")
    check_modes(modes, None, torch.device("cpu"))  # unknown names fail here, before any server starts
    from common import machine

    report = dict(
        machine=machine(),
        model=args.model,
        max_tokens=args.max_tokens,
        requests_per_client=args.requests,
        date=time.strftime("%Y-%m-%d"),
        results=[],
    )
    if args.url:
        host, _, port = args.url.split("//")[-1].partition(":")
        report["results"].append(
            dict(
                label=args.url,
                rows=[
                    asyncio.run(load(host, int(port or 80), c, args.requests, args.max_tokens, ""))
                    for c in args.clients
                ],
            )
        )
    else:
        ckpt = checkpoint_for(args.model)
        for mode in modes:
            precision, quantize = split_mode(mode, None)
            flag = ["--quantize", quantize] if quantize else []
            flag += ["--precision", precision] if precision else []
            cmd = [
                sys.executable,
                "-m",
                "litquant.cli",
                "serve",
                "--checkpoint_dir",
                str(ckpt),
                *flag,
                "--max_batch_size",
                str(args.max_batch_size),
            ]
            report["results"].append(run_mode(cmd, args, f"litquant {mode}"))
        if args.peer == "litgpt":
            try:
                report["results"].append(peer_litgpt(ckpt, args))
            except Exception as e:  # the peer did not start or did not answer: say so, keep our figures
                print(
                    f"litgpt serve: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    flush=True,
                )
                report["results"].append(dict(label="litgpt serve", error=str(e)[:500]))
    OUT.mkdir(exist_ok=True)
    out = OUT / "serve_load.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"Wrote {out}")


def checkpoint_for(model: str) -> Path:
    if model == "bundled":
        from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR

        return DEFAULT_CHECKPOINT_DIR
    from scale import build  # the random Llamas, built with transformers and converted on first use

    return build(model)


def peer_litgpt(ckpt: Path, args) -> dict:
    """`litgpt serve` from the litgpt venv of peer_litgpt.py (its own checkpoint conversion)."""
    from peer_litgpt import convert, ensure_venv

    try:
        py = ensure_venv()
    except Exception as e:  # no litgpt 0.5.13 wheel for this torch / Python, or no package index
        return dict(label="litgpt serve", skipped=f"litgpt does not install here: {str(e).splitlines()[0]}")
    if subprocess.run([str(py), "-c", "import litserve"], capture_output=True).returncode != 0:
        from benchmarks.common import sh, venv_env

        print(
            "Installing litserve (litgpt's `extra` requirement for `litgpt serve`) into the litgpt venv",
            flush=True,
        )
        sh([py, "-m", "pip", "install", "-q", "litserve>0.2"], env=venv_env())
    lit_dir = convert(ckpt, py)
    cmd = [
        str(py),
        "-m",
        "litgpt",
        "serve",
        str(lit_dir),
        "--max_new_tokens",
        str(args.max_tokens),
        "--stream",
        "true",
        "--openai_spec",
        "true",
    ]
    return run_mode(cmd, args, "litgpt serve", chat=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_guarded(main)
