"""``cospec serve`` on tiny models over loopback, with the official ``openai`` client.

Greedy spd through the server = target through the server = the library's own loop; streams
carry the same text as plain responses; bad input is a 4xx with an OpenAI-shaped error and
never a 500; a full queue is a 429; a client that goes away frees its slot.
"""

import asyncio
import copy
import json
import random
import re
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from cospec.arbiter import FEATURES, LearnedPolicy, save_arbiter  # noqa: E402
from cospec.cli import main  # noqa: E402
from cospec.methods import build_method, chat_ids, eos_ids  # noqa: E402
from cospec.models import Pair  # noqa: E402
from cospec.sampling import GREEDY  # noqa: E402
from cospec.scheduler import Engine  # noqa: E402
from cospec.server import BackgroundServer, create_app  # noqa: E402
from cospec.text_stream import TextStream, safe_len, stop_at  # noqa: E402

MODEL = "tiny"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["hello world", "the answer is 42", "def return print", "6 times 7 because"]


def near_copy(model, noise: float, seed: int = 5):
    """The model with Gaussian noise on every weight: a draft that agrees often, not always."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise * p.std())
    return out


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    target = tiny_model(1, vocab=len(tok))
    return Pair(target, near_copy(target, 0.05), tok, MODEL, "tiny-draft")


@pytest.fixture(scope="module")
def arbiter(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("arbiter") / "arbiter.safetensors"
    save_arbiter(LearnedPolicy(len(FEATURES), None, 8), path, (MODEL, "tiny-draft"))
    return str(path)


@pytest.fixture(scope="module")
def server(pair, arbiter):
    app = create_app(pair, methods=["target", "spd", "cospec", "cos-we"], arbiter=arbiter,
                     max_active=4, max_queue=16, timeout=60)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def chat(client, prompt, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    extra = {k: kw.pop(k) for k in ("method", "k", "ignore_eos") if k in kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                          "content": prompt}], extra_body=extra, **kw)


def health(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    return r.json()


def test_models_and_health(client, server):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["methods"] == ["target", "spd", "cospec",
                                                                "cos-we"]
    assert card.model_extra["default_method"] == "spd"
    assert client.models.retrieve(MODEL).id == MODEL
    assert health(server)["status"] == "ok"


def test_greedy_spd_equals_target_and_the_library(client, pair):
    taus = []
    for prompt in PROMPTS:
        ref = build_method("target", pair).run(
            chat_ids(pair.tokenizer, [{"role": "user", "content": prompt}]), k=4,
            max_new_tokens=24, sampling=GREEDY, eos_ids=eos_ids(pair.tokenizer, pair.target))[0]
        texts = set()
        for method, k in (("target", None), ("spd", 4), ("spd", 1), ("cos-we", 3)):
            r = chat(client, prompt, method=method, **({"k": k} if k else {}))
            if method != "cos-we":  # we is its own combination
                texts.add(r.choices[0].message.content)
                assert r.usage.completion_tokens == len(ref)
            m = r.model_extra["metrics"]
            assert m["method"] == method and m["k"] == k
            assert 0 <= m["accepted"] <= m["drafted"]
            assert m["from_draft"] <= m["accepted"]  # only accepted proposals come from one
            assert m["tau"] >= 1 and m["decode_s"] > 0 and m["queue_s"] >= 0
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            if method == "spd" and k == 4:
                taus.append(m["tau"])
        assert texts == {pair.tokenizer.decode(ref, skip_special_tokens=True)}
    assert max(taus) > 1.5  # the near-copy draft is accepted often


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_equals_plain_response(client, endpoint):
    for prompt in PROMPTS[:2]:
        kw = dict(model=MODEL, temperature=0, max_tokens=20, extra_body={"method": "spd"})
        if endpoint == "chat":
            create, kw["messages"] = client.chat.completions.create, [{"role": "user",
                                                                       "content": prompt}]
        else:
            create, kw["prompt"] = client.completions.create, prompt
        plain = create(**kw)
        chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
        pieces = [(c.choices[0].delta.content or "") if endpoint == "chat" else c.choices[0].text
                  for c in chunks if c.choices]
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        choice = plain.choices[0]
        text = choice.message.content if endpoint == "chat" else choice.text
        assert "".join(pieces) == text
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == choice.finish_reason
        assert finals[0].model_extra["metrics"]["method"] == "spd"
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        assert len({c.id for c in chunks}) == 1


def test_stop_strings(client):
    full = chat(client, PROMPTS[0], ignore_eos=True, max_tokens=40).choices[0].message.content
    stop = full[12:15]
    want = full[:full.find(stop)]
    r = chat(client, PROMPTS[0], ignore_eos=True, max_tokens=40, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    stream = chat(client, PROMPTS[0], ignore_eos=True, max_tokens=40, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_prompts_are_encoded_while_the_worker_steps(pair):
    """A prompt's encoding does not wait for the worker thread (here busy with a 1 s "step"):
    it runs on a thread of its own, with a tokenizer of its own."""
    eng = Engine(pair, {})

    async def go():
        busy = asyncio.ensure_future(eng.on_worker(time.sleep, 1.0))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        ids = await eng.encode(lambda tok: tok.encode("hello world"))
        took = time.perf_counter() - t0
        await busy
        return ids, took

    try:
        ids, took = asyncio.run(go())
    finally:
        eng.worker.shutdown()
        eng.encoder.shutdown()
    assert ids == pair.tokenizer.encode("hello world") and took < 0.5
    assert eng.encoding is not eng.tokenizer


def test_stop_helpers():
    assert stop_at("abcSTOPx", ("STOP", "c")) == 2 and stop_at("abc", ("x",)) is None
    assert safe_len("hello ST", ("STOP",)) == 6  # "ST" may start a stop string
    assert safe_len("hello S", ("xyz", "S!")) == 6
    assert safe_len("caf\ufffd", ()) == 3  # an incomplete character waits
    assert stop_at("STOP abc STOP", ("STOP",), 1) == 9  # only from ``start`` on


def test_text_stream_equals_a_full_decode(pair):
    """Token by token, the incremental text is the whole sequence's decode, also where a
    multi-byte character is split between tokens or a special token is skipped; and what
    it settles only grows, so the pieces sent join to the full decode."""
    tok = pair.tokenizer
    gen = random.Random(3)
    text = "caf\u00e9 \u4e16\u754c 42 hello \U0001f600 world"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids += [gen.randrange(len(tok)) for _ in range(200)]  # stray bytes, <eos>, <pad>
    ids.insert(5, tok.eos_token_id)
    stream, pieces, settled, held = TextStream(tok), [], "", 0
    for i, t in enumerate(ids):
        now = stream.add(t)
        assert now == tok.decode(ids[:i + 1], skip_special_tokens=True)
        assert stream.text.startswith(settled) and now.startswith(stream.text)
        held += now != stream.text  # an incomplete character, shown but not settled
        pieces.append(stream.text[len(settled):])
        settled = stream.text
    assert held and stream.stream is not None  # the incremental path, split characters seen
    assert "".join(pieces) == stream.text


def test_sampling_is_reproducible_with_a_seed(client):
    a, b = (chat(client, PROMPTS[1], temperature=0.9, top_p=0.9, seed=7, max_tokens=16,
                 method="spd").choices[0].message.content for _ in range(2))
    assert a == b


BAD = [  # (body or raw bytes, status, error code)
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_value"),
    ({"model": "gpt-4o", "prompt": "x"}, 404, "model_not_found"),
    ({"prompt": "x"}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "method": "nope"}, 400, "invalid_method"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "8"}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "hello world " * 400}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "unsupported"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, 400, "unsupported"),
    ({"model": MODEL, "prompt": "x", "logprobs": 0}, 400, "unsupported"),  # chosen tokens'
    ({"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "k": 0}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x", "method": "cospec", "temperature": 0.5}, 400,
     "invalid_value"),
    ({"model": MODEL, "prompt": [10**6]}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "unsupported"),
    ({"model": MODEL, "prompt": ""}, 400, "invalid_prompt"),
    ({"model": MODEL, "prompt": None}, 400, "invalid_value"),
    ({"model": MODEL, "messages": []}, 400, "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ({"model": MODEL, "messages": "hello"}, 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "lone \\udfff surrogate"}', 400, "invalid_value"),
]


@pytest.mark.parametrize("body, status, code", BAD)
def test_bad_input_is_a_clear_4xx(server, body, status, code):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else \
        "/v1/completions"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_random_bodies_never_give_a_5xx(server):
    rng = random.Random(0)
    values = [None, True, -1, 0, 1, 2**64, 1e-30, -0.5, 3.7, "", "x", "hot", "\u0000\udfff",
              [], [1], ["a"], [[1, 2]], {}, {"include_usage": "yes"}, 10**9,
              [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
              [{"role": "user"}], [{"role": "user", "content": [{"type": "image"}]}]]
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
              "stop", "seed", "stream", "n", "method", "k", "ignore_eos", "stream_options",
              "logprobs", "user", "max_completion_tokens"]
    for i in range(80):
        body = {"model": MODEL, "max_tokens": 4, "temperature": 0.5}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if i % 2 else
                    {"prompt": "hi"})
        for name in rng.sample(fields, rng.randint(1, 3)):
            body[name] = rng.choice(values)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
    assert health(server)["errors"] == 0


def test_wrong_routes_and_the_openai_client_errors(server, client):
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="not offered"):
        chat(client, "x", method="draft")
    with pytest.raises(openai.BadRequestError, match="greedy-only"):
        chat(client, "x", method="cospec", temperature=1.0)


def test_concurrent_requests_are_not_mixed_up(client, server):
    prompts = [f"request {i}: {p}" for i, p in enumerate(PROMPTS * 3)]
    want = {p: chat(client, p, max_tokens=16, method="target").choices[0].message.content
            for p in prompts}
    got, errors = {}, []

    def ask(i, p):
        try:
            if i % 2:
                got[p] = "".join(c.choices[0].delta.content or "" for c in
                                 chat(client, p, max_tokens=16, stream=True))
            else:
                got[p] = chat(client, p, max_tokens=16).choices[0].message.content
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want
    h = health(server)
    assert h["errors"] == 0 and h["active"] == 0 and h["queued"] == 0  # never a 500


@pytest.fixture
def slow_server(pair):
    """One batch slot, one round-robin slot (unused: spd is batched) and one queue place: the
    fourth concurrent request gets 429."""
    app = create_app(pair, methods=["target", "spd"], max_active=1, max_queue=1, timeout=60,
                     max_batch=1)
    with BackgroundServer(app) as srv:
        yield srv


LONG = {"model": MODEL, "prompt": "hello", "max_tokens": 480, "ignore_eos": True,
        "temperature": 0, "method": "spd", "k": 1}


def test_full_queue_is_a_429(slow_server):
    statuses, bodies = [], []

    def post():
        r = httpx.post(slow_server.url + "/v1/completions", json=LONG, timeout=60)
        statuses.append(r.status_code)
        bodies.append(r.json())

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses.count(200) == 3 and statuses.count(429) == 2  # 1 + 1 slots, 1 queued
    assert all(b["error"]["code"] == "queue_full" for b in bodies if "error" in b)
    h = health(slow_server)
    assert h["rejected"] == statuses.count(429) and h["completed"] == statuses.count(200)


def wait_idle(server, timeout=10.0, until=lambda h: True) -> dict:
    """The server's health once nothing is active or queued and ``until(health)`` holds (a
    request sent just before may not be admitted yet), or at the timeout."""
    t0 = time.monotonic()
    while True:
        h = health(server)
        if (h["active"] == 0 and h["queued"] == 0 and until(h)) or time.monotonic() - t0 > timeout:
            return h
        time.sleep(0.05)


def test_disconnect_frees_the_slot(slow_server):
    url = slow_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as c, c.stream("POST", url, json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk read, then the client goes away
    t0 = time.monotonic()
    r = httpx.post(url, json={**LONG, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 10
    # a plain request whose client gives up is dropped too (seen by polling the connection)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=LONG, timeout=0.1)
    h = wait_idle(slow_server, until=lambda h: h["cancelled"] >= 2)
    assert h["active"] == 0 and h["queued"] == 0 and h["cancelled"] == 2 and h["errors"] == 0


def test_time_limit_ends_with_length(pair):
    app = create_app(pair, methods=["spd"], timeout=0.2)
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json=LONG, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["metrics"]["timed_out"] and body["usage"]["completion_tokens"] < 480
        assert wait_idle(srv)["timed_out"] == 1


def test_ids_past_the_tokenizer_are_logged_once_a_request(pair, caplog):
    """A target whose output layer has 20 rows past the tokenizer's vocabulary (padding,
    each twice a real row, so greedy decoding picks them): the server keeps the ids as
    generated and logs one line for the request, not one a token."""
    vocab, extra = len(pair.tokenizer), 20
    target = tiny_model(1, vocab=vocab + extra)
    with torch.no_grad():
        w = target.lm_head.weight
        w[vocab:] = 2 * w[2:2 + 3 * extra:3]
    padded = Pair(target, None, pair.tokenizer, MODEL, None)
    with caplog.at_level("WARNING", logger="cospec.server"), \
            BackgroundServer(create_app(padded, methods=["target"])) as srv:
        r = chat(openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0),
                 PROMPTS[1], max_tokens=12)
    ids = build_method("target", padded).run(
        chat_ids(pair.tokenizer, [{"role": "user", "content": PROMPTS[1]}]), k=1,
        max_new_tokens=12, sampling=GREEDY, eos_ids=eos_ids(pair.tokenizer, target))[0]
    outside = sum(i >= vocab for i in ids)
    assert 0 < outside < len(ids) and r.usage.completion_tokens == len(ids)
    said = [rec.getMessage() for rec in caplog.records if "vocabulary" in rec.getMessage()]
    assert said == [f"a request's {outside} generated token id(s) are outside the "
                    f"tokenizer's vocabulary of size {vocab} (the model's output layer is "
                    "larger) and decode to no text"]


def test_cli_serve_refuses_a_missing_model(capsys):
    assert main(["serve", "--target", "/no/such/model", "--port", "0"]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["serve", "--target", "/no/such/model", "--max-active", "0"]) == 2
    assert main(["serve", "--target", "/no/such/model", "--methods", ","]) == 2
    assert "names no method" in capsys.readouterr().err
    assert main(["serve", "--target", "/no/such/model", "--draft-weights", "int8",
                 "--methods", "target,spd,cospec"]) == 2
    err = capsys.readouterr().err
    assert "cospec with --draft-weights int8" in err and "--max-batch 0" in err


def test_cli_serve_end_to_end(tiny_dirs):
    target, draft = tiny_dirs
    proc = subprocess.Popen([sys.executable, "-m", "cospec", "serve", "--target", str(target),
                             "--draft", str(draft), "--port", "0", "--served-model-name",
                             MODEL, "--methods", "target,spd"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving tiny on http://127.0.0.1:PORT (methods: ...)"
        url = re.search(r"http://[\d.:]+", line).group(0)
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() - t0 < 60 and proc.poll() is None
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = chat(c, "hello world", max_tokens=8)  # no chat template: the raw text
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.model_extra["metrics"]["method"] == "spd"
    finally:
        proc.terminate()
        proc.wait(30)
