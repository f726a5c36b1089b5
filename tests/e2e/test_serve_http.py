"""A real `vllm serve` with FlexDraft (started with `flexdraft-vllm serve`, the
CPU-safe spelling of `vllm serve ... --speculative-config ...`), driven over
HTTP with the openai client: non-streaming and streaming, concurrent requests,
a client that disconnects mid-stream, a request vLLM must reject; the server
keeps serving throughout and reports FlexDraft's spec-decode metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

MAX_MODEL_LEN = 1024
QUESTIONS = [
    "What is the capital of France?",
    "Write a python function that returns the square of a number.",
    "Name three primary colors.",
    "Explain what a list comprehension is in one sentence.",
    "What is 12 times 12?",
    "Give a synonym for 'happy'.",
    "Write a haiku about autumn.",
    "What does HTTP stand for?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def server(target_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    kv = int(float(os.environ.get("FLEXDRAFT_KV_GIB", "1")) * (1 << 30))
    cmd = [sys.executable, "-m", "flexdraft_vllm.cli", "serve", str(target_dir),
           "--flexdraft-mode", "flex", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smollm2", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    if not _has_cuda():  # the same engine settings as flexdraft_vllm.engine_defaults
        cmd += ["--dtype", "float32", "--kv-cache-memory-bytes", str(kv), "--enforce-eager"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/health", 2) is not None:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, log
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=300, max_retries=0)


def _chat(client, q: str, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                          temperature=0, max_tokens=64, **kw)


def test_non_streaming_and_streaming_agree(client):
    r = _chat(client, QUESTIONS[0])
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.usage.completion_tokens > 0
    chunks = [c.choices[0].delta.content or "" for c in _chat(client, QUESTIONS[0], stream=True) if c.choices]
    assert "".join(chunks) == text
    assert len([c for c in chunks if c]) > 1, "streaming delivered everything in one chunk"


def test_concurrent_requests_match_sequential(client):
    one_by_one = [_chat(client, q).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as ex:
        together = list(ex.map(lambda q: _chat(client, q).choices[0].message.content, QUESTIONS))
    assert together == one_by_one


def test_aborted_stream_leaves_server_healthy(client, server):
    import httpx

    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count from 1 to 500."}],
            "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", server[0] + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 3:
                    break  # the client goes away mid-generation
    # the aborted request must leave the engine: nothing running after a moment
    deadline = time.time() + 60
    while time.time() < deadline:
        running = [ln for ln in _get(server[0] + "/metrics").splitlines() if ln.startswith("vllm:num_requests_running")]
        if running and all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in running):
            break
        time.sleep(1)
    else:
        pytest.fail(f"aborted request still running: {running}")
    assert "Paris" in _chat(client, QUESTIONS[0]).choices[0].message.content


def test_invalid_request_is_rejected_and_server_stays_up(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, QUESTIONS[0], extra_body={"max_tokens": MAX_MODEL_LEN * 4})
    assert "max" in str(e.value).lower() or "context" in str(e.value).lower()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                       temperature=-1.0, max_tokens=8)
    assert "Paris" in _chat(client, QUESTIONS[0]).choices[0].message.content


def test_prometheus_reports_flexdraft_spec_decoding(client, server):
    _chat(client, QUESTIONS[1])
    metrics = _get(server[0] + "/metrics")
    drafts = [ln for ln in metrics.splitlines() if ln.startswith("vllm:spec_decode_num_draft_tokens_total")]
    assert drafts and float(drafts[0].rsplit(" ", 1)[1]) > 0, "no FlexDraft drafts in /metrics"
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" in metrics
    assert "FlexDraft drafter loaded" in server[1].read_text()
