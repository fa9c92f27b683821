"""`gpt-fpga serve` with --backend fixed on the bundled gpt2-kjv, through the real `openai` client on loopback.

Every expected text comes from the generation path of `gpt-fpga generate` (host/generate.py on its own
backend, and the CLI itself), never from the server. Slow, gated and failing backends are the fixed
backend wrapped: they count and hold forward calls, or raise the driver's EngineError once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest

from conftest import MODELS, REPO, run_cli, running_server
from gpt_fpga.host.backends import FixedBackend
from gpt_fpga.host.driver import EngineError
from gpt_fpga.host.generate import Sampling, generate
from gpt_fpga.host.serve import create_app
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.quantize.tokenizer import StreamDecoder

PROMPT = "And God said"
MODEL_ID = "gpt2-kjv-int8"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img = tmp_path_factory.mktemp("serve") / f"{MODEL_ID}.img"
    quantize_checkpoint(MODELS / "gpt2-kjv", img, weights="int8", progress=False)
    return img


@pytest.fixture(scope="module")
def reference(image):
    """The generate path on a backend of its own."""
    return FixedBackend(image)


def generated_text(backend, prompt_ids, max_new, sampling=Sampling()) -> tuple[str, list[int]]:
    """What `gpt-fpga generate` prints after the prompt, and the ids, for the same request."""
    ids = generate(backend, prompt_ids, max_new, sampling)
    stream = StreamDecoder(backend.codec, prompt_ids)
    text = "".join(stream.push(t) for t in ids if t != backend.config.eos_token_id) + stream.flush()
    return text, ids


def client(url, key=None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def server(image):
    with running_server(create_app(FixedBackend(image), MODEL_ID)) as url:
        yield url


class WrappedBackend:
    """A backend that delegates to `inner`, counting forward calls; `delay_s` slows each one, `gate` holds
    each until set, `fail_at` raises the driver's EngineError at that forward call (once)."""

    def __init__(self, inner, delay_s=0.0, gate: threading.Event | None = None, fail_at: int | None = None):
        self.inner, self.delay_s, self.gate, self.fail_at = inner, delay_s, gate, fail_at
        self.forwards = 0
        self.recovered = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids):
        self.forwards += 1
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        time.sleep(self.delay_s)
        if self.forwards == self.fail_at:
            raise EngineError("LAYER 2 at position 4 ended with error axi_read (step qkv): an AXI read "
                              "answered SLVERR or DECERR")
        return self.inner.forward(ids)

    def recover(self):
        self.recovered += 1
        self.inner.recover()


def post(url, path, body: bytes, headers=None, timeout=60) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def get(url, path, headers=None) -> tuple[int, str]:
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---- completions equal generate ---------------------------------------------------------------------
def test_greedy_completion_equals_generate(server, reference, image, capsys):
    want, ids = generated_text(reference, reference.codec.encode(PROMPT), 12)
    got = client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want and len(want.split()) > 3
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(reference.codec.encode(PROMPT)), len(ids))
    rc, out, err = run_cli(capsys, "generate", image, "--backend", "fixed", "--prompt", PROMPT,
                           "--max-new-tokens", "12")
    assert rc == 0, err
    assert out == PROMPT + got.choices[0].text + "\n"
    by_ids = client(server).completions.create(model=MODEL_ID, prompt=reference.codec.encode(PROMPT),
                                               max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want


def test_streaming_gives_the_same_text(server, reference):
    want, ids = generated_text(reference, reference.codec.encode(PROMPT), 10)
    chunks = list(client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=10, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert len(finishes) - 1 == len(ids)  # a chunk per token, then the finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_stream_ends_with_done(server):
    req = urllib.request.Request(server + "/v1/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        status, ctype, raw = r.status, r.headers["Content-Type"], r.read().decode()
    assert status == 200 and ctype.startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_seed_makes_sampling_repeatable(server, reference):
    def sample(seed):
        return client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0.9,
                                                 seed=seed, extra_body={"top_k": 40}).choices[0].text

    want, _ = generated_text(reference, reference.codec.encode(PROMPT), 16, Sampling(0.9, 40, 1.0, 11))
    assert sample(11) == sample(11) == want
    assert {sample(12), sample(13)} - {want}, "different seeds gave the same text"


def test_stop_sequence_cuts_the_text(server, reference):
    want, _ = generated_text(reference, reference.codec.encode(PROMPT), 12)
    stop = want.split()[2]  # a word from the middle of the greedy text
    got = client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == want[:want.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want[:want.index(stop)]


# ---- endpoints --------------------------------------------------------------------------------------
def test_models_health_page_and_chat(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    status, body = get(server, "/health")
    health = json.loads(body)
    assert status == 200 and health["backend"] == "fixed" and health["model"] == MODEL_ID
    assert "engine" not in health  # the golden model has no engine to identify
    status, page = get(server, "/")
    assert status == 200 and "<textarea" in page and "/v1/completions" in page
    assert "http://" not in page and "https://" not in page, "the page must not load anything from elsewhere"
    with pytest.raises(openai.NotFoundError, match="base model"):
        client(server).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    status, body = get(server, "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)


BAD = [  # (request fields, status, words the message must hold)
    (dict(max_tokens=254), 400, ["prompt (3 tokens) + max_tokens (254) = 257", "context of 256"]),
    (dict(max_tokens=0), 400, ["'max_tokens' must be >= 1"]),
    (dict(max_tokens=2.5), 400, ["'max_tokens' must be an integer"]),
    (dict(temperature=3), 400, ["'temperature' must be in [0, 2]"]),
    (dict(temperature=-0.5), 400, ["'temperature'"]),
    (dict(top_p=0), 400, ["'top_p' must be in (0, 1]"]),
    (dict(extra_body={"top_k": 5000}), 400, ["'top_k' must be between 1 and 4096"]),
    (dict(seed=-1), 400, ["'seed' must be between 0"]),
    (dict(n=2), 400, ["'n' 2 is not supported", "one completion per request"]),
    (dict(logprobs=2), 400, ["'logprobs'", "not supported"]),
    (dict(extra_body={"frobnicate": 1}), 400, ["unknown field 'frobnicate'"]),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, ["at most 4"]),
    (dict(prompt=[5, 17, 4096]), 400, ["token id 4096 is out of range", "4096 ids"]),
    (dict(prompt=[5, -1]), 400, ["token id -1 is out of range"]),
    (dict(prompt=[]), 400, ["'prompt' must be"]),
    (dict(prompt=["two", "prompts"]), 400, ["one prompt per request"]),
    (dict(prompt=""), 400, ["the prompt is empty"]),
    (dict(model="gpt-4"), 404, ["model 'gpt-4' is not served here", MODEL_ID]),
    (dict(prompt="x" * 70000), 400, ["exceeds this server's limit of 65536 bytes"]),
]


@pytest.mark.parametrize("fields,status,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_its_status_and_message(server, fields, status, needles):
    kw = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=4)
    kw.update(fields)
    with pytest.raises(openai.APIStatusError) as info:
        client(server).completions.create(**kw)
    e = info.value
    assert e.status_code == status, e
    assert e.body["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in e.body["message"], (needle, e.body["message"])
    # and the server keeps serving
    assert client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1).usage.completion_tokens == 1


@pytest.mark.parametrize("raw,needle", [(b'{"prompt": "And God', "not valid JSON"),
                                        (b'[1, 2]', "must be a JSON object, got list"),
                                        (b'\xff\xfe', "not valid JSON"),
                                        (b'{"prompt": "x", "temperature": NaN}', "'temperature' must be a number")])
def test_malformed_json(server, raw, needle):
    status, _, body = post(server, "/v1/completions", raw)
    assert status == 400 and needle in body["error"]["message"], body


def test_oversized_body_is_refused_before_it_is_read(server):
    """A declared Content-Length past the limit is refused from the header alone."""
    conn = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 ** 9))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 400 and "limit of 65536 bytes" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_api_key(image, reference):
    with running_server(create_app(FixedBackend(image), MODEL_ID, api_key=KEY)) as url:
        for key in ("wrong", None):
            with pytest.raises(openai.AuthenticationError) as info:
                client(url, key).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2)
            assert info.value.status_code == 401 and "API key" in info.value.body["message"]
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        assert get(url, "/health")[0] == 200  # no key needed: a load balancer's probe
        assert get(url, "/")[0] == 200  # the page holds nothing; it asks for the key
        assert get(url, "/v1/models")[0] == 401
        want, _ = generated_text(reference, reference.codec.encode(PROMPT), 3)
        got = client(url, KEY).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0)
        assert got.choices[0].text == want


# ---- one device, one sequence at a time ---------------------------------------------------------------
def wait_for(predicate, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def health(url) -> dict:
    return json.loads(get(url, "/health")[1])


@contextlib.contextmanager
def opened_at_exit(gate: threading.Event):
    """A failed assertion must not leave the device thread held (the server could not stop)."""
    try:
        yield
    finally:
        gate.set()


def test_past_the_queue_503_with_retry_after(image, reference):
    gate = threading.Event()
    backend = WrappedBackend(FixedBackend(image), gate=gate)
    results = {}

    def complete(name):
        try:
            results[name] = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3,
                                                           temperature=0).choices[0].text
        except openai.APIStatusError as e:
            results[name] = e

    with running_server(create_app(backend, MODEL_ID, max_waiting=1)) as url, opened_at_exit(gate):
        running = threading.Thread(target=complete, args=("running",))
        running.start()
        wait_for(lambda: health(url)["queue"]["running"], what="the first request to run")
        waiting = threading.Thread(target=complete, args=("waiting",))
        waiting.start()
        wait_for(lambda: health(url)["queue"]["waiting"] == 1, what="the second request to wait")
        status, headers, body = post(url, "/v1/completions", json.dumps({"prompt": PROMPT}).encode())
        assert status == 503 and int(headers["Retry-After"]) >= 1, (status, headers)
        assert "busy" in body["error"]["message"] and body["error"]["code"] == "queue_full"
        gate.set()
        running.join(60), waiting.join(60)
        want, _ = generated_text(reference, reference.codec.encode(PROMPT), 3)
        assert results == {"running": want, "waiting": want}
        wait_for(lambda: health(url)["queue"] == {"running": False, "waiting": 0, "limit": 1, "served": 2},
                 what="the queue to empty")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(image, reference, stream):
    backend = WrappedBackend(FixedBackend(image), delay_s=0.03)
    with running_server(create_app(backend, MODEL_ID)) as url:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "stream": stream}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b"data: {" not in received:  # the first token arrived
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
        else:
            wait_for(lambda: backend.forwards >= 3, what="generation to start")
        sock.close()
        wait_for(lambda: not health(url)["queue"]["running"], timeout_s=10, what="generation to stop")
        stopped_at = backend.forwards
        assert stopped_at < 40, f"{stopped_at} forward calls: generation went on after the disconnect"
        time.sleep(0.2)
        assert backend.forwards == stopped_at
        # and the next request is served in full
        want, _ = generated_text(reference, reference.codec.encode(PROMPT), 4)
        assert client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4,
                                              temperature=0).choices[0].text == want


@pytest.mark.parametrize("stream", [False, True])
def test_device_error_answers_500_then_the_next_request_is_served(image, reference, stream):
    backend = WrappedBackend(FixedBackend(image), fail_at=2)  # the first decode step after the prompt
    with running_server(create_app(backend, MODEL_ID)) as url:
        with pytest.raises(openai.APIError) as info:
            r = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, stream=stream)
            list(r) if stream else None
        message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
        assert "LAYER 2 at position 4 ended with error axi_read" in message
        if not stream:
            assert info.value.status_code == 500
        assert backend.recovered == 1
        want, _ = generated_text(reference, reference.codec.encode(PROMPT), 5)
        got = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0)
        assert got.choices[0].text == want


def test_device_error_before_the_first_token_is_a_500_when_streamed(image):
    backend = WrappedBackend(FixedBackend(image), fail_at=1)  # the prompt's pass
    with running_server(create_app(backend, MODEL_ID)) as url:
        with pytest.raises(openai.InternalServerError, match="ended with error axi_read"):
            list(client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, stream=True))
        assert backend.recovered == 1


def test_16_concurrent_clients(image, reference):
    """Each is answered correctly, in turn or with 503 past the queue; none hangs; the server answers after."""
    backend = WrappedBackend(FixedBackend(image), delay_s=0.01)
    want, _ = generated_text(reference, reference.codec.encode(PROMPT), 4)
    results = [None] * 16

    def one(i):
        try:
            r = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=0)
            results[i] = r.choices[0].text
        except openai.APIStatusError as e:
            results[i] = e.status_code
        except Exception as e:  # noqa: BLE001 - recorded, then failed below
            results[i] = repr(e)

    with running_server(create_app(backend, MODEL_ID, max_waiting=4)) as url:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(16)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, 120 - (time.monotonic() - start)))
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert all(r == want or r == 503 for r in results), results
        served = results.count(want)
        assert served >= 5 and served + results.count(503) == 16
        wait_for(lambda: health(url)["queue"]["served"] == served, what=f"{served} requests counted as served")
        assert client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4,
                                              temperature=0).choices[0].text == want


# ---- the command ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(image, reference, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "gpt_fpga.host.cli", "serve", str(image), "--port", str(port),
                             "--api-key", KEY, "--queue", "2"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "gpt-fpga serve did not start"
            try:
                if get(url, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        h = health(url)
        assert h["queue"]["limit"] == 2 and h["api_key"] and h["backend"] == "fixed" and h["model"] == MODEL_ID
        want, _ = generated_text(reference, reference.codec.encode(PROMPT), 6)
        got = client(url, KEY).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0)
        assert got.choices[0].text == want
    finally:
        proc.terminate()
        proc.wait(30)
    assert "127.0.0.1" in (tmp_path / "serve.log").read_text()  # bound to loopback by default


def test_serve_command_errors(capsys, image, tmp_path):
    from conftest import expect_error

    expect_error(capsys, ["serve", image, "--queue", "-1"], "--queue must be >= 0")
    expect_error(capsys, ["serve", image, "--max-body", "10"], "--max-body must be >= 1024")
    expect_error(capsys, ["serve", tmp_path / "missing.img"], "missing.img")
