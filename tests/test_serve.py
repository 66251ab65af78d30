"""peftlab serve, driven by the real `openai` client over HTTP on loopback, on the tiny model.

One server holds the base model, two LoRAs (every projection; q/v only: both in the shared MultiLoRA lane), a
LoReFT, a Bitune and an IA3 module (lanes of their own). Greedy answers are compared with ``generate`` on the same
module loaded alone, under concurrency (mixed batches, rows joining and leaving).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import peftlab
from peftlab.generation import generate
from peftlab.models import TINY_ARCHITECTURES, tiny_model
from peftlab.serve.app import Limits, create_app
from peftlab.serve.cli import Server, build_engine

openai = pytest.importorskip("openai")

KEY = "test-key"
PROMPTS = ["repeat red", "say something long", "x", "count to three please"]
MODULES = {"lora": ("lora", {"r": 4}), "lora-qv": ("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
           "reft": ("loreft", {"layers": [0, 1], "rank": 2}), "bitune": ("bitune", {}), "ia3": ("ia3", {})}


def _make(method, config, folder, seed):
    """A module whose trained parts are random (so it changes the answers), saved to ``folder``."""
    base, _ = tiny_model()
    model = peftlab.attach(base, method, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    peftlab.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = {name: _make(method, config, root / name, i) for i, (name, (method, config)) in enumerate(MODULES.items())}
    _make("lora", {"r": 3}, root / "later", 99)
    return root, made


@pytest.fixture(scope="module")
def server(folders):
    root, made = folders
    base, tokenizer = tiny_model()
    engine = build_engine(base, tokenizer, "tiny", made, max_batch=6)
    app = create_app(engine, api_key=KEY, adapter_dir=root, limits=Limits(max_tokens=300, max_body_bytes=20_000))
    with Server(app) as running:
        running.engine = engine
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _reference(folder, prompt, max_tokens, completion=False):
    """What ``generate`` answers with the module in ``folder`` (None: the base model) loaded alone."""
    base, tokenizer = tiny_model()
    model = base if folder is None else peftlab.load(folder, base)
    if not completion:
        return generate(model, tokenizer, [prompt], max_new_tokens=max_tokens, strip=False)[0]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.rstrip("\ufffd")  # a character cut by max_tokens is dropped, as generate drops it


def _chat(client, model, prompt, **kw):
    settings = {"max_tokens": 16, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **settings)


def test_models_lists_the_base_and_every_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", *MODULES}
    assert cards["tiny"].parent is None and cards["lora"].parent == "tiny"
    assert cards["reft"].method == "loreft" and cards["lora-qv"].method == "lora"


def test_greedy_answers_equal_generate_under_mixed_concurrent_load(client, folders):
    _, made = folders
    jobs = [(name, prompt) for name in ["tiny", *MODULES] for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # every request at once: rows of all adapters share batches
        replies = list(pool.map(lambda job: _chat(client, *job), jobs))
    answers = {}
    for (name, prompt), reply in zip(jobs, replies, strict=True):
        expected = _reference(made.get(name), prompt, 16)
        assert reply.choices[0].message.content == expected, (name, prompt)
        answers.setdefault(prompt, set()).add(expected)
    assert all(len(a) >= 5 for a in answers.values())  # the modules do change the answers


def test_completions_take_text_lists_and_token_ids(client, folders):
    _, made = folders
    reply = client.completions.create(model="lora", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.text for c in reply.choices] == [_reference(made["lora"], p, 8, completion=True) for p in PROMPTS[:2]]
    ids = tiny_model()[1]("repeat red")["input_ids"]
    by_ids = client.completions.create(model="lora", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    assert reply.usage.prompt_tokens == sum(len(tiny_model()[1](p)["input_ids"]) for p in PROMPTS[:2])


def test_streaming_equals_the_whole_answer_and_ends_with_usage(client):
    whole = _chat(client, "bitune", PROMPTS[1], max_tokens=20)
    chunks = list(_chat(client, "bitune", PROMPTS[1], max_tokens=20, stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_choices_and_seeds(client):
    greedy = _chat(client, "reft", PROMPTS[0], n=3)
    assert len(greedy.choices) == 3 and len({c.message.content for c in greedy.choices}) == 1
    sampled = _chat(client, "lora", PROMPTS[0], n=4, temperature=1.0, seed=7)
    again = _chat(client, "lora", PROMPTS[0], n=4, temperature=1.0, seed=7)
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # a seed makes sampling repeatable
    assert len(set(texts)) > 1  # and the choices differ from each other
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]


def test_stop_strings_and_length(client):
    full = _chat(client, "lora", PROMPTS[1], max_tokens=24).choices[0]
    assert full.finish_reason == "length"
    stop = full.message.content[5:8]
    cut = _chat(client, "lora", PROMPTS[1], max_tokens=24, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full.message.content[:full.message.content.index(stop)]
    streamed = _chat(client, "lora", PROMPTS[1], max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_load_use_unload_an_adapter(client, folders):
    root, _ = folders
    http = httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"})
    assert http.post("load_lora_adapter", json={"lora_name": "later", "lora_path": "later"}).status_code == 200
    assert "later" in {m.id for m in client.models.list().data}
    assert _chat(client, "later", PROMPTS[0]).choices[0].message.content == _reference(root / "later", PROMPTS[0], 16)
    again = http.post("load_lora_adapter", json={"lora_name": "later", "lora_path": "later"})
    assert again.status_code == 400 and "taken" in again.json()["error"]["message"]
    assert http.post("unload_lora_adapter", json={"lora_name": "later"}).status_code == 200
    assert "later" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _chat(client, "later", PROMPTS[0])
    assert http.post("unload_lora_adapter", json={"lora_name": "later"}).status_code == 404
    # the shared lane still answers its other adapters exactly after one left it
    assert _chat(client, "lora-qv", PROMPTS[0]).choices[0].message.content == \
        _reference(folders[1]["lora-qv"], PROMPTS[0], 16)


def test_paths_outside_the_adapter_folder_are_refused(client, folders, tmp_path):
    root, _ = folders
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    http = httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"})
    for path in ("../x", str(tmp_path), "escape", "later/../../x"):
        reply = http.post("load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        assert reply.status_code == 403, path
        assert "outside the adapter folder" in reply.json()["error"]["message"]
    assert http.post("load_lora_adapter", json={"lora_name": "x", "lora_path": "missing"}).status_code == 404


def test_unknown_model_is_404_never_the_base(client):
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(client, "lorax", PROMPTS[0])
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


@pytest.mark.parametrize("body, status, where", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400,
     "temperature"),
    (json.dumps({"model": "tiny", "messages": "x"}), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True}), 400,
     "logprobs"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}), 400,
     "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 1000}]}), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []}), 400, "tools"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]}), 413, None),
])
def test_bad_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(client, body, status, where):
    reply = httpx.post(f"{client.base_url}chat/completions", content=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    if where:
        assert where in (error["param"] or "") + error["message"]
    assert _chat(client, "tiny", PROMPTS[0]).choices[0].finish_reason in ("stop", "length")


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for route in ("/v1/models", "/metrics"):  # no key at all
        reply = httpx.get(f"{server.url}{route}")
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, server):
    before = server.engine.stats.completion_tokens.get("ia3", 0)
    with httpx.stream("POST", f"{client.base_url}chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "ia3", "messages": [{"role": "user", "content": "go"}], "max_tokens": 300,
                            "temperature": 0, "stream": True}, timeout=30) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    deadline = time.monotonic() + 20
    while server.engine.running_rows() or server.engine.queued():
        assert time.monotonic() < deadline, "the disconnected stream kept its row"
        time.sleep(0.05)
    assert server.engine.stats.completion_tokens["ia3"] - before < 300  # stopped early, not run to max_tokens
    assert server.engine.served["ia3"].in_flight == 0
    assert server.engine.stats.requests.get(("ia3", "cancelled"), 0) >= 1


def test_unloading_an_adapter_in_use_finishes_its_requests_first(client, folders):
    http = httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert http.post("load_lora_adapter", json={"lora_name": "busy", "lora_path": "later"}).status_code == 200
    first = threading.Event()
    result = {}

    def stream():
        chunks = _chat(client, "busy", PROMPTS[1], max_tokens=200, stream=True)
        parts = []
        for c in chunks:
            first.set()
            parts.append(c)
        result["text"] = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        result["reason"] = [c.choices[0].finish_reason for c in parts if c.choices][-1]

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(30)
    unloading = threading.Thread(target=lambda: result.setdefault("unload", http.post(
        "unload_lora_adapter", json={"lora_name": "busy"}).status_code))
    unloading.start()
    time.sleep(0.2)
    with pytest.raises(openai.NotFoundError):  # draining: no new requests
        _chat(client, "busy", PROMPTS[0])
    worker.join(60)
    unloading.join(60)
    assert result["unload"] == 200 and result["reason"] == "length"
    assert result["text"] == _reference(folders[0] / "later", PROMPTS[1], 200)


def test_metrics(client, server):
    _chat(client, "lora", PROMPTS[0])
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'peftlab_requests_total{model="lora",outcome="ok"}' in text
    assert "peftlab_queue_sequences" in text and "peftlab_running_sequences" in text


def test_eval_through_the_endpoint_equals_eval_of_the_module(server, folders, tmp_path):
    from peftlab.evals.runner import Candidate, endpoint_candidate, evaluate
    from peftlab.evals.suite import get_suite

    _, made = folders
    suite = get_suite("core")
    families = suite.families_for("test")[:3]
    remote = evaluate(endpoint_candidate(server.url + "/v1", "lora", KEY), suite, n=6, families=families,
                      progress=False)
    base, tokenizer = tiny_model()
    local = evaluate(Candidate("lora", peftlab.load(made["lora"], base), tokenizer), suite, n=6, families=families,
                     progress=False)
    for family in families:
        assert [e["output"] for e in remote["examples"][family]] == [e["output"] for e in local["examples"][family]]
        assert remote["families"][family]["mean"] == local["families"][family]["mean"]


def test_sigterm_finishes_in_flight_requests(tiny_dir, folders, tmp_path):
    """`peftlab serve` as a process: SIGTERM while a stream runs lets it finish, then the server exits."""
    port = 18000 + os.getpid() % 1000
    process = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "serve", "--base", str(tiny_dir), "--port",
                                str(port), "--adapter", f"lora={folders[1]['lora']}", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        chunks = _chat(client, "lora", PROMPTS[1], max_tokens=250, stream=True)
        parts = [next(iter(chunks))]
        process.send_signal(signal.SIGTERM)
        parts += list(chunks)
        assert [c.choices[0].finish_reason for c in parts if c.choices][-1] == "length"
        # uvicorn shuts down gracefully, then re-raises the signal it caught (the exit status says SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        process.kill()


def test_a_plain_request_whose_client_went_away_is_cancelled(client, server):
    import socket
    from urllib.parse import urlparse

    before = server.engine.stats.completion_tokens.get("reft", 0)
    body = json.dumps({"model": "reft", "messages": [{"role": "user", "content": "go"}], "max_tokens": 300,
                       "temperature": 0}).encode()
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                    b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while not server.engine.running_rows():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    while server.engine.running_rows() or server.engine.queued():
        assert time.monotonic() < deadline, "the abandoned request kept its row"
        time.sleep(0.05)
    assert server.engine.stats.completion_tokens["reft"] - before < 300


def test_a_full_queue_answers_429(folders):
    base, tokenizer = tiny_model()
    engine = build_engine(base, tokenizer, "tiny", max_batch=1, max_queue=1)
    with Server(create_app(engine)) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda _: _outcome(client), range(4)))
    assert "ok" in outcomes and "429" in outcomes


def _outcome(client):
    try:
        _chat(client, "tiny", PROMPTS[1], max_tokens=200)
        return "ok"
    except openai.RateLimitError as e:
        assert e.response.headers["retry-after"] == "1"
        return "429"


def test_a_multilora_module_serves_each_adapter(tmp_path):
    from peftlab.methods import get_method

    base, tokenizer = tiny_model()
    method = get_method("multilora")
    model = method.attach_many(base, {n: method.make_config({"r": 2}) for n in ("x", "y")})
    peftlab.save(model, tmp_path / "m")
    engine = build_engine(tiny_model()[0], tokenizer, "tiny", {"team": tmp_path / "m"})
    assert {n: s.lane for n, s in engine.served.items()} == {"tiny": "__lora__", "team/x": "__lora__",
                                                              "team/y": "__lora__"}


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_rows_joining_a_running_batch_decode_as_alone(arch):
    """The lane's left-padded batch on every architecture: rows that join after a few steps, and rows that leave,
    decode exactly as ``generate`` decodes each prompt alone (sliding windows shorter than the answers included)."""
    from peftlab.methods import get_method
    from peftlab.serve.batch import Lane, Row

    overrides = {"sliding_window": 6} if "sliding_window" in TINY_ARCHITECTURES[arch] else {}
    base, tokenizer = tiny_model(arch=arch, **overrides)
    model = get_method("multilora").attach_many(base, {"a": get_method("multilora").make_config({"r": 2})})
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.normal_(std=0.3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30]]
    adapters = ["a", "__base__", "a", "a"]
    steps = 10
    expected = []
    for p, a in zip(prompts, adapters, strict=True):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             do_sample=False, eos_token_id=None, pad_token_id=0, adapter_names=[a],
                             adapter_index=torch.tensor([0]))
        expected.append(out[0, len(p):].tolist())
    lane, got = Lane(model, routable=True), [[] for _ in prompts]

    def take(logits, rows):
        tokens = logits.argmax(-1)
        for i, t in zip(rows, tokens.tolist(), strict=True):
            got[i].append(t)
        return tokens

    order = [0, 1]
    lane.set_pending(take(lane.prefill([Row(prompts[i], adapters[i]) for i in order]), order))
    for step in range(14):
        if not order:
            break
        if step == 3:  # two rows join a running batch
            lane.set_pending(take(lane.prefill([Row(prompts[i], adapters[i]) for i in (2, 3)]), [2, 3]))
            order += [2, 3]
        lane.set_pending(take(lane.decode(), order))
        done = [len(got[i]) >= steps for i in order]
        lane.keep([not d for d in done])  # finished rows leave; the padding they needed goes with them
        order = [i for i, d in zip(order, done, strict=True) if not d]
    assert [g[:steps] for g in got] == expected


def test_reserved_and_taken_names_are_refused(folders):
    base, tokenizer = tiny_model()
    engine = build_engine(base, tokenizer, "tiny")
    module = peftlab.read(folders[1]["lora"])
    for name in ("__lora__", "__base__", "tiny"):
        with pytest.raises(ValueError, match="reserved|taken"):
            engine.add(name, module, None)
    assert set(engine.served) == {"tiny"}


def test_without_max_tokens_a_chat_answer_gets_what_the_context_leaves(folders):
    base, tokenizer = tiny_model()  # a context of 512 positions
    engine = build_engine(base, tokenizer, "tiny")
    with Server(create_app(engine, limits=Limits(max_tokens=1000))) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0)
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 512
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="context length"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=600)


def test_a_dora_module_gets_its_own_lane_and_answers_as_generate(tmp_path):
    folder = _make("lora", {"r": 2, "use_dora": True}, tmp_path / "dora", 5)
    base, tokenizer = tiny_model()
    engine = build_engine(base, tokenizer, "tiny", {"dora": folder})
    assert engine.served["dora"].lane == "dora"  # DoRA's magnitudes are not a stacked LoRA
    with Server(create_app(engine)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        assert _chat(client, "dora", PROMPTS[0]).choices[0].message.content == _reference(folder, PROMPTS[0], 16)


def test_incremental_text_equals_decoding_the_whole_answer_and_decodes_a_few_tokens_per_step():
    """Multi-byte characters cut across tokens wait for their last byte; the text streamed is the text of the whole
    answer; each step decodes a window of tokens, not the answer so far (which made streaming O(n^2))."""
    from peftlab.serve.engine import IncrementalText

    _, tokenizer = tiny_model()
    decoded = []

    class Counting:  # the tokenizer, counting the tokens each decode call is given
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    answer = "naïve café: 日本語 🙂🙂 and a stop-string " * 8
    tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(tokens) > len(answer)  # the byte-level tokens cut multi-byte characters
    text, seen = IncrementalText(), []
    for n in range(1, len(tokens) + 1):
        seen.append(text.update(Counting(), tokens[:n], final=n == len(tokens)))
        assert "\ufffd" not in seen[-1]
        assert answer.startswith(seen[-1])
    assert seen[-1] == tokenizer.decode(tokens, skip_special_tokens=True) == answer
    assert max(decoded) <= 8  # a window of a few tokens per call, however long the answer
