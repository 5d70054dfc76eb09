"""`mixq serve` on builtin:tiny-mixtral, through the official `openai` client and raw HTTP (httpx).

The server runs in-process (uvicorn in a thread, a free loopback port) over its own model; the oracle is a second
copy of the model decoding with `model.generate()`. Greedy (temperature 0) unless a test says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner

from mixtral_quant import load_quantized
from mixtral_quant.cli.main import cli
from mixtral_quant.cli.serve import is_loopback
from mixtral_quant.serve.app import create_app
from mixtral_quant.serve.engine import Engine, GenRequest, QueueFull

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny"
CHAT = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Write a function to sort a list."}]
PROMPTS = ["def parse_args(argv):", "import os\nimport sys\n", "class Queue:", "The tokenizer module", "# Copyright",
           "for i in range(10):", "Return the absolute path", "try:\n    import"]  # fmt: skip


class Server:
    """uvicorn serving create_app(...) in a thread on 127.0.0.1:<free port>; .stop() shuts it down."""

    def __init__(self, model, **kw):
        engine_kw = {k: kw.pop(k) for k in ("max_batch", "max_queue", "context", "batch_wait") if k in kw}
        self.engine = Engine(model, **engine_kw)
        app = create_app(self.engine, NAME, **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def wait_idle(self, timeout=30):
        deadline = time.time() + timeout
        while self.engine.busy:
            assert time.time() < deadline, "engine still busy"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def model():
    return load_quantized("builtin:tiny-mixtral", device="cpu")


@pytest.fixture(scope="module")
def oracle():
    return load_quantized("builtin:tiny-mixtral", device="cpu")


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, max_batch=8, context=512, batch_wait=0.05)
    yield s
    s.stop()


def greedy(oracle, ids, n, **kw):
    """Oracle: model.generate's new tokens, up to and including EOS."""
    eos = oracle.tokenizer.eos_id
    kw.setdefault("eos", eos)
    out = oracle.generate(torch.tensor([ids]), n, **kw)[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out and kw["eos"] == eos else out


def text_of(oracle, new, chat=True, prompt_ids=None):
    """What the API should return for these new tokens: the chat reply decoded on its own, a completion as the text
    it adds to the prompt."""
    tok = oracle.tokenizer
    new = [t for t in new if t != tok.eos_id]
    if chat:
        return tok.decode(new)
    full, head = tok.decode(prompt_ids + new), tok.decode(prompt_ids)
    assert full.startswith(head)
    return full[len(head):]


def finish_of(oracle, new, n):
    return "stop" if new and new[-1] == oracle.tokenizer.eos_id else "length"


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    r = httpx.get(server.url + "/health", timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_an_existing_tool_points_at_it_by_environment(server, monkeypatch):
    """What README tells users of other tools: OPENAI_BASE_URL / OPENAI_API_KEY and nothing else."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "anything")
    r = openai.OpenAI().chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=4)
    assert r.model == NAME and r.usage.completion_tokens >= 1


def test_chat_greedy_equals_generate(server, oracle):
    r = server.client().chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=40)
    ids = oracle.tokenizer.apply_chat_template(CHAT)
    new = greedy(oracle, ids, 40)
    assert len(new) > 5  # a real reply, not an immediate EOS
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(oracle, new)
    assert r.choices[0].finish_reason == finish_of(oracle, new, 40)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))
    assert r.usage.total_tokens == len(ids) + len(new)


def test_stream_deltas_equal_the_completion(server, oracle):
    c = server.client()
    full = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=60)
    chunks = list(c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=60, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([d for d in deltas if d]) > 3  # it really streamed, piece by piece
    assert "".join(deltas) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_equals_generate(server, oracle):
    prompt = "def fibonacci(n):"
    r = server.client().completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32)
    ids = oracle.tokenizer.encode(prompt)
    new = greedy(oracle, ids, 32)
    assert r.object == "text_completion"
    assert r.choices[0].text == text_of(oracle, new, chat=False, prompt_ids=ids)
    assert r.choices[0].finish_reason == finish_of(oracle, new, 32)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))
    streamed = server.client().completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_seeded_sampling_equals_generate(server, oracle):
    """temperature/top_p/seed: the same tokens as model.generate(do_sample=True, seed=...) (one generator per row)."""
    kw = dict(temperature=0.8, top_p=0.9, seed=1234)
    r = server.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=30, **kw)
    ids = oracle.tokenizer.apply_chat_template(CHAT)
    new = greedy(oracle, ids, 30, do_sample=True, **kw)
    assert r.choices[0].message.content == text_of(oracle, new)
    assert new != greedy(oracle, ids, 30)  # sampling changed the answer: the parameters were used


def test_stop_strings(server, oracle):
    c = server.client()
    full = c.completions.create(model=NAME, prompt="class Queue:", temperature=0, max_tokens=40).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # three characters from the middle of the greedy text
    want = full[: full.index(stop)]
    r = c.completions.create(model=NAME, prompt="class Queue:", temperature=0, max_tokens=40, stop=[stop, "@@@@"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = c.completions.create(model=NAME, prompt="class Queue:", temperature=0, max_tokens=40, stop=stop,
                                    stream=True)  # fmt: skip
    parts = list(streamed)
    assert "".join(p.choices[0].text for p in parts) == want and parts[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_are_batched(server, oracle):
    """8 streamed requests at once, prompts of different lengths (left padding): each gets its own greedy text,
    and they were decoded together (fewer batches than requests)."""
    c = server.client()
    results: dict[int, tuple[str, str]] = {}

    def one(i):
        stream = c.completions.create(model=NAME, prompt=PROMPTS[i], temperature=0, max_tokens=24 + 3 * i, stream=True)
        parts = list(stream)
        results[i] = ("".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason)

    server.wait_idle()
    batches = server.engine.batches
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(8))
    for i, p in enumerate(PROMPTS):
        ids = oracle.tokenizer.encode(p)
        new = greedy(oracle, ids, 24 + 3 * i)
        assert results[i] == (text_of(oracle, new, chat=False, prompt_ids=ids), finish_of(oracle, new, 0)), p
    assert server.engine.batches - batches < 8  # requests shared batches


def test_requests_join_a_running_batch(server, oracle):
    """Requests sent while a long answer decodes join its batch (no new batch) and finish long before it; each
    gets its own greedy text."""
    server.wait_idle()
    batches = server.engine.batches
    client, cm, lines = open_stream(server.url, {"prompt": "def main():\n    parser = argparse.ArgumentParser()",
                                                 "max_tokens": 400, "temperature": 0, "ignore_eos": True})  # fmt: skip
    head = [json.loads(next(lines)[6:]) for _ in range(20)]
    c = server.client()
    for p, n in [("import os", 12), ("class Queue:", 20)]:
        at = server.engine.steps
        r = c.completions.create(model=NAME, prompt=p, temperature=0, max_tokens=n)
        ids = oracle.tokenizer.encode(p)
        new = greedy(oracle, ids, n)
        assert r.choices[0].text == text_of(oracle, new, chat=False, prompt_ids=ids)
        assert server.engine.steps - at < n + 40  # it did not wait for the 400-token answer
    rest = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    cm.__exit__(None, None, None)
    client.close()
    assert server.engine.batches == batches + 1 and rest[-1]["choices"][0]["finish_reason"] == "length"
    ids = oracle.tokenizer.encode("def main():\n    parser = argparse.ArgumentParser()")
    want = text_of(oracle, greedy(oracle, ids, 400, eos=[]), chat=False, prompt_ids=ids)
    assert "".join(x["choices"][0]["text"] for x in head + rest) == want  # the long row was not disturbed


def test_one_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="mixtral_quant.serve"):
        r = server.client().completions.create(model=NAME, prompt="import re", temperature=0, max_tokens=8)
    recs = [x for x in caplog.records if getattr(x, "request", {}).get("id") == r.id]
    assert len(recs) == 1
    req = recs[0].request
    assert (req["prompt_tokens"], req["completion_tokens"], req["status"]) == (r.usage.prompt_tokens,
                                                                               r.usage.completion_tokens, 200)
    assert req["tokens_per_s"] > 0 and req["queue_wait_s"] >= 0
    assert r.id in recs[0].getMessage() and "tok/s=" in recs[0].getMessage()


BAD = [  # (why, body or raw bytes, status, error param or message fragment)
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
    ("no messages", {"model": NAME}, 400, "messages"),
    ("empty messages", {"model": NAME, "messages": []}, 400, "messages"),
    ("negative max_tokens", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("temperature too high", {"messages": CHAT, "temperature": 2.5}, 400, "temperature"),
    ("negative temperature", {"messages": CHAT, "temperature": -0.1}, 400, "temperature"),
    ("top_p 0", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("max_tokens a string", {"messages": CHAT, "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature a string", {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ("stream not a bool", {"messages": CHAT, "stream": "yes"}, 400, "stream"),
    ("content a number", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("assistant first", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "must start with a user"),
    ("n = 2", {"messages": CHAT, "n": 2}, 400, "n"),
    ("seed beyond 64 bits", {"messages": CHAT, "seed": 1 << 64}, 400, "seed"),
    ("stop not strings", {"messages": CHAT, "stop": [1, 2]}, 400, "stop"),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 600}]}, 400,
     "maximum context length is 512"),
    ("prompt + max_tokens beyond the context", {"messages": CHAT, "max_tokens": 500}, 400, "maximum context length"),
]  # fmt: skip


@pytest.mark.parametrize("why,body,status,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_json_errors(server, oracle, why, body, status, expect):
    server.wait_idle()
    steps = server.engine.steps
    content = body if isinstance(body, bytes) else json.dumps({"model": NAME, **body}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str)
    assert expect in err["message"] or expect == err["param"], err
    assert server.engine.steps == steps  # nothing was decoded for it
    # the server keeps serving
    ok = server.client().completions.create(model=NAME, prompt="import os", temperature=0, max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_bad_completion_requests(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="x", max_tokens=-5)
    assert e.value.status_code == 400 and "max_tokens" in e.value.message
    for body, fragment in [({"prompt": 5}, "prompt"), ({"prompt": "x", "logprobs": 2}, "not supported"),
                           ({"prompt": "x " * 600}, "maximum context length")]:  # fmt: skip
        r = httpx.post(server.url + "/v1/completions", json={"model": NAME, **body}, timeout=60)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_body_size_limit(model):
    s = Server(model, max_body=4096, context=512)
    try:
        big = {"model": NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=big, timeout=60)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: counted while it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = httpx.post(s.url + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"},
                       timeout=60)  # fmt: skip
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        assert s.engine.steps == 0
        ok = s.client().chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=3)
        assert ok.usage.completion_tokens >= 1
    finally:
        s.stop()


def test_api_key(model):
    s = Server(model, api_key="s3cret", context=512)
    try:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
                r = httpx.request(method, s.url + path, headers=headers, json={"model": NAME, "prompt": "x"}, timeout=60)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").models.list().data[0].id == NAME
        r = s.client("s3cret").chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(s.url + "/health", timeout=60).status_code == 200  # open, for load balancers (as vLLM)
    finally:
        s.stop()


def open_stream(url, body):
    """Start a streamed request with raw httpx; returns (client, response context, line iterator)."""
    client = httpx.Client(timeout=60)
    cm = client.stream("POST", url + "/v1/completions", json={"model": NAME, "stream": True, **body})
    r = cm.__enter__()
    assert r.status_code == 200
    return client, cm, (line for line in r.iter_lines() if line.startswith("data: "))


def test_cancelled_stream_stops_decoding(server, oracle):
    """Closing the connection mid-stream stops the row within a few steps; the server then serves the next one."""
    server.wait_idle()
    client, cm, lines = open_stream(server.url, {"prompt": "def main():", "max_tokens": 400, "temperature": 0,
                                                 "ignore_eos": True})  # fmt: skip
    for _ in range(5):
        next(lines)
    cm.__exit__(None, None, None)
    client.close()
    at_close = server.engine.steps
    server.wait_idle()
    assert server.engine.steps - at_close <= 10, (at_close, server.engine.steps)  # of 400
    r = server.client().completions.create(model=NAME, prompt="def main():", temperature=0, max_tokens=10,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    ids = oracle.tokenizer.encode("def main():")
    assert r.choices[0].text == text_of(oracle, greedy(oracle, ids, 10, eos=[]), chat=False, prompt_ids=ids)


def test_abandoned_whole_answer_stops_decoding(server):
    """A non-streamed request whose client gives up (here: a 0.5 s read timeout) stops too: the server polls for the
    disconnect every 0.1 s, so decoding stops well before max_tokens."""
    server.wait_idle()
    steps = server.engine.steps
    body = {"model": NAME, "prompt": "def main():", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    at_close = server.engine.steps
    server.wait_idle()
    assert at_close - steps < 480, "finished before the client gave up: the test proves nothing"
    assert server.engine.steps - at_close < 60, (steps, at_close, server.engine.steps)


def test_cancelled_row_leaves_the_batch(server, oracle):
    """Two streams in one batch: one is closed, the other finishes with its own greedy text, and the batch took
    about as many steps as the survivor needed (the closed row did not keep the batch going)."""
    server.wait_idle()
    steps = server.engine.steps
    c1, cm1, l1 = open_stream(server.url, {"prompt": "def main():", "max_tokens": 300, "temperature": 0,
                                           "ignore_eos": True})  # fmt: skip
    got = {}

    def survivor():
        s = server.client().completions.create(model=NAME, prompt="import os", temperature=0, max_tokens=60,
                                               stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        got["text"] = "".join(p.choices[0].text for p in s)

    t = threading.Thread(target=survivor)
    t.start()
    for _ in range(3):
        next(l1)
    cm1.__exit__(None, None, None)
    c1.close()
    t.join(60)
    server.wait_idle()
    ids = oracle.tokenizer.encode("import os")
    want = greedy(oracle, ids, 60, eos=[])
    assert got["text"] == text_of(oracle, want, chat=False, prompt_ids=ids)
    assert server.engine.steps - steps < 120  # far from the 300 steps of the closed row


def test_full_queue_answers_503(model):
    s = Server(model, max_batch=1, max_queue=0, context=512)
    try:
        c1, cm1, l1 = open_stream(s.url, {"prompt": "def main():", "max_tokens": 480, "temperature": 0,
                                          "ignore_eos": True})  # fmt: skip
        next(l1)  # decoding: the worker holds it, the queue is empty
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=s.client().completions.create(
            model=NAME, prompt="import os", temperature=0, max_tokens=4)))  # fmt: skip
        t.start()
        deadline = time.time() + 30
        while s.engine.queue.qsize() < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        cm1.__exit__(None, None, None)
        c1.close()
        t.join(60)
        assert waiting["r"].usage.completion_tokens >= 1  # the queued request was served after the slot freed
    finally:
        s.stop()


def test_engine_rejects_beyond_context_and_queue(model):
    e = Engine(model, max_batch=1, max_queue=1, context=64)  # not started: requests stay queued
    with pytest.raises(ValueError, match="must fit the context of 64"):
        e.submit(GenRequest([1] * 60, 5, lambda c: None))
    e.submit(GenRequest([1, 2], 5, lambda c: None))
    e.submit(GenRequest([1, 2], 5, lambda c: None))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        e.submit(GenRequest([1, 2], 5, lambda c: None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mixq_serve_command_json_logs(oracle):
    """The command itself: starts, answers, logs one JSON line per request, stops on SIGTERM."""
    port = _free_port()
    mixq = shutil.which("mixq") or os.path.join(os.path.dirname(sys.executable), "mixq")
    proc = subprocess.Popen([mixq, "serve", "builtin:tiny-mixtral", "--port", str(port), "--device", "cpu",
                             "--json-logs", "--model-name", "tm"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "mixq serve did not start"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tm", messages=CHAT, temperature=0, max_tokens=10)
        ids = oracle.tokenizer.apply_chat_template(CHAT)
        assert r.choices[0].message.content == text_of(oracle, greedy(oracle, ids, 10))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    logs = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    # a clean shutdown; uvicorn then re-raises SIGTERM, so the status is -15 (or 0 with older uvicorn)
    assert proc.returncode in (0, -15) and logs[-1]["message"].startswith("Finished server process"), err
    mine = [x for x in logs if x.get("id") == r.id]
    assert len(mine) == 1 and mine[0]["completion_tokens"] == r.usage.completion_tokens
    assert mine[0]["prompt_tokens"] == len(ids) and mine[0]["queue_wait_s"] >= 0 and mine[0]["tokens_per_s"] > 0


def test_mixq_serve_warns_on_a_public_host_without_a_key():
    """192.0.2.1 (TEST-NET, never local): the warning comes first, then binding fails; nothing is exposed."""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.com")
    mixq = shutil.which("mixq") or os.path.join(os.path.dirname(sys.executable), "mixq")
    env = {k: v for k, v in os.environ.items() if k != "MIXQ_API_KEY"}
    r = subprocess.run([mixq, "serve", "builtin:tiny-mixtral", "--host", "192.0.2.1", "--port", "8000", "--device",
                        "cpu"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert "serving on 192.0.2.1 without an API key" in r.stderr, r.stderr
    assert r.returncode != 0
    assert CliRunner().invoke(cli, ["serve", "--help"]).exit_code == 0
