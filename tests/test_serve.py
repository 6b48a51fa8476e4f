"""``surgeon serve``: the official ``openai`` client against the real server (a subprocess of the CLI, on loopback),
on a bank export of the embedded tiny GPT-2 with two adapters.

Every answer is checked against ``AdapterSession.generate`` on that request alone (greedy and seeded sampling,
streamed or not, alone or among concurrent requests of other adapters): the tokens must be equal, so the text is.
Refusals (404, 400, 401, 429), a client that goes away mid-stream and SIGTERM run on a second server with a key and
room for one request.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

import surgeon
from surgeon.bundled import BUILTIN
from surgeon.onnx.engine import load_tokenizer
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession
from tests.conftest import run_cli

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A KV-cache bank export of tiny GPT-2 with adapters alpha and beta (random B, so they differ)."""
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    model = surgeon.get_peft_model(AutoModelForCausalLM.from_pretrained(BUILTIN["tiny-gpt2"]),
                                   surgeon.LoraConfig(**config), adapter_name="alpha")
    model.add_adapter("beta", surgeon.LoraConfig(**config))
    return export_onnx(model, tmp_path_factory.mktemp("serve") / "bank", kv_cache=True, bank=True, source="tiny-gpt2")


class Served:
    """``surgeon serve`` in a subprocess; ``url`` once it listens."""

    def __init__(self, export_dir, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "surgeon", "serve", str(export_dir), "--port", "0", *args],
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.banner = self.proc.stderr.readline()
        assert "serving" in self.banner, self.banner + self.proc.stderr.read()
        self.url = self.banner.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def get(self, path: str, key: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url.removesuffix("/v1") + path,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, rest = self.proc.communicate(timeout=60)
        return self.proc.returncode, rest


@pytest.fixture(scope="module")
def server(export):
    served = Served(export, "--max-batch", "4")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def local(export):
    """(AdapterSession, tokenizer) on the same export, for the answers alone."""
    return AdapterSession(export), load_tokenizer(export)


def alone(session, tokenizer, prompt: str, model: str, n: int, **sampling) -> str:
    """What AdapterSession.generate gives the request by itself, as text."""
    ids = np.array([tokenizer.encode(prompt).ids])
    out = session.generate(ids, adapters=[None if model == "base" else model], max_new_tokens=n, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_openai_client_gets_each_request_its_tokens_alone(server, local):
    session, tokenizer = local
    client = server.client()
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
    prompts = ["Day 12, noon. Wind", "The harbour", "Log: calm"]
    texts = {}
    for model in ("base", "alpha", "beta"):
        answer = client.completions.create(model=model, prompt=prompts[0], max_tokens=12, temperature=0)
        texts[model] = answer.choices[0].text
        assert texts[model] == alone(session, tokenizer, prompts[0], model, 12)
        used = answer.usage.completion_tokens
        assert answer.choices[0].finish_reason == ("length" if used == 12 else "stop")  # stop: end of sequence
        streamed = client.completions.create(model=model, prompt=prompts[0], max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == texts[model]
    assert len(set(texts.values())) == 3  # the adapters act

    sampled = client.completions.create(model="beta", prompt=prompts[1], max_tokens=10, temperature=0.8, top_p=0.9,
                                        seed=5, extra_body={"top_k": 20})
    assert sampled.choices[0].text == alone(session, tokenizer, prompts[1], "beta", 10, do_sample=True,
                                            temperature=0.8, top_p=0.9, top_k=20, seed=5)

    # concurrent requests of every adapter, greedy and sampled, of different lengths: each as if alone
    jobs = [(prompts[i % 3], ("base", "alpha", "beta")[i % 3], 24 + 3 * i, i) for i in range(10)]

    def ask(job):
        prompt, model, n, seed = job
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=1.0 if seed % 2 else 0,
                                           seed=seed, stream=bool(seed % 3))
        return "".join(c.choices[0].text for c in answer) if seed % 3 else answer.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, model, n, seed), text in zip(jobs, got):
        sampling = {"do_sample": True, "seed": seed} if seed % 2 else {}
        assert text == alone(session, tokenizer, prompt, model, n, **sampling), (model, seed)

    status, metrics = server.get("/metrics")
    assert status == 200
    rows = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("surgeon_batch")}
    assert rows["surgeon_batch_rows_sum"] > rows["surgeon_batch_rows_count"]  # some steps ran several rows
    assert 'surgeon_requests_total{model="beta",status="200"}' in metrics
    assert json.loads(server.get("/health")[1])["status"] == "ok"


def test_stop_strings_end_the_text_before_them(server, local):
    session, tokenizer = local
    full = alone(session, tokenizer, "Day 12", "alpha", 20)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    client = server.client()
    answer = client.completions.create(model="alpha", prompt="Day 12", max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)] and answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="alpha", prompt="Day 12", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


@pytest.fixture(scope="module")
def guarded(export):
    """A server with a key and room for exactly one request (one batch row, no queue)."""
    served = Served(export, "--max-batch", "1", "--max-queue", "0", "--api-key", KEY, "--shutdown-timeout", "30")
    yield served
    served.stop()


def until(condition, what: str, seconds: float = 30.0):
    """Wait for the server to reach a state (not a timing check: a deadline on something that must happen)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_refusals_are_named_with_their_status(guarded):
    client = guarded.client(api_key=KEY)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        guarded.client(api_key="wrong").completions.create(model="alpha", prompt="x", max_tokens=2)
    assert guarded.get("/health")[0] == 401 and guarded.get("/health", KEY)[0] == 200
    with pytest.raises(openai.NotFoundError, match=r"alpah.*did you mean 'alpha'.*base, alpha, beta"):
        client.completions.create(model="alpah", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"prompt of 11 tokens.*context of 256 positions.*max_tokens to 245"):
        client.completions.create(model="alpha", prompt="x " * 10, max_tokens=250)
    for bad, name in (({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"n": 2}, "n"),
                      ({"max_tokens": 0}, "max_tokens"), ({"extra_body": {"top_kk": 3}}, "top_k")):
        with pytest.raises(openai.BadRequestError, match=name):
            client.completions.create(model="alpha", prompt="x", **{"max_tokens": 2, **bad})


def test_a_full_server_answers_429_and_a_gone_client_frees_its_row(guarded):
    client = guarded.client(api_key=KEY)
    metric = lambda name: float(next(line.split()[1] for line in guarded.get("/metrics", KEY)[1].splitlines()  # noqa
                                     if line.startswith(name)))
    made = 'surgeon_generated_tokens_total{model="beta"}'
    before = metric(made) if made in guarded.get("/metrics", KEY)[1] else 0
    stream = client.completions.create(model="beta", prompt="Day", max_tokens=254, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # running: the one row is taken
    with pytest.raises(openai.RateLimitError, match="--max-queue 0"):
        client.completions.create(model="alpha", prompt="x", max_tokens=2)
    stream.close()  # the client goes away mid-stream
    until(lambda: metric("surgeon_running_rows") == 0, "its row left the batch")
    assert metric("surgeon_cancelled_requests_total") == 1
    assert metric(made) - before < 254  # dropped early: a row left running would make all 254 tokens
    assert client.completions.create(model="alpha", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_finishes_in_flight_requests_then_exits_0(export, local):
    served = Served(export, "--shutdown-timeout", "30")
    stream = served.client().completions.create(model="alpha", prompt="Day", max_tokens=60, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    served.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    code, stderr = served.stop()
    assert code == 0 and "stopped (SIGTERM): 1 requests answered, 0 cancelled" in stderr, stderr
    session, tokenizer = local
    assert text == alone(session, tokenizer, "Day", "alpha", 60, eos_token_id=[])


def test_cli_refusals_are_one_line_exit_2(export, server, tmp_path):
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    for args, words in ((["serve", str(tmp_path)], "manifest"), (["serve", str(export), "--port", port], "cannot listen"),
                        (["serve", str(export), "--api-key", ""], "--api-key")):
        result = run_cli(*args)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_listening_socket_gives_connections_tcp_nodelay():
    """Without TCP_NODELAY each keep-alive response waited ~40 ms for the client's delayed ACK (Nagle between the
    headers and the body): asyncio sets it only on sockets made with proto IPPROTO_TCP."""
    import asyncio
    import socket

    from surgeon.cli.serve import _listen

    async def accepted_nodelay() -> int:
        found = asyncio.get_running_loop().create_future()

        def protocol():
            class Probe(asyncio.Protocol):
                def connection_made(self, transport):
                    sock = transport.get_extra_info("socket")
                    found.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    transport.close()
            return Probe()

        server = await asyncio.get_running_loop().create_server(protocol, sock=_listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(found, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
