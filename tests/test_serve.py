"""`lora serve`: the real server in a subprocess on 127.0.0.1 (a free port), called with the real `openai` client
and raw HTTP: answers equal `lora generate`'s, streams equal whole answers, concurrent clients get their own
answers, bad requests get OpenAI error objects and leave the server serving, a client gone mid-stream frees
the model, SIGTERM stops it with exit code 0. In process: adapters share the base's tensors."""

import json
import queue
import signal
import socket
import threading

import pytest
import torch

from lora_cli.adapter import attach_adapter
from lora_cli.lora import lora_layers
from lora_cli.pretrained import load_model
from lora_cli.generate import StopText
from lora_cli.serve import adapter_flags, load_models
from lora_cli.tokenizer import encode

from helpers import TIMEOUT_S, assert_one_line_error, cli, child_env, make_hf_gpt2, python, train_run

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
CONTEXT = 512  # room for the long generation that a client abandons
INSTRUCTION = "Repeat the word apple."
N = 12  # tokens per answer
CHAT_ROWS = [[{"role": "user", "content": f"Repeat {w}."}, {"role": "assistant", "content": f"{w} {w}"}]
             for w in ("apple", "river", "stone", "cloud", "green", "quick", "north", "paper")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base directory, instruction adapter, a second adapter) over one tiny GPT-2."""
    root = tmp_path_factory.mktemp("serve")
    make_hf_gpt2(root / "base", seed=5, n_positions=CONTEXT)
    train_run(root / "inst", root / "base", steps=3, lr=1e-3)  # a light touch: answers do not end at once
    train_run(root / "other", root / "base", steps=2, lr=3e-2,  # 5e-2: its answers ended at once
              lora="{r: 2, alpha: 4, dropout: 0.0, targets: [attn.c_attn], bias: lora_only}")  # writes base biases
    train_run(root / "chat", root / "base", steps=3, lr=5e-2, rows=[{"messages": m} for m in CHAT_ROWS],
              data_keys=", chat_template: chatml")  # a chat adapter: its template rides in its metadata
    return root / "base", root / "inst" / "out" / "adapter.safetensors", root / "other" / "out"


@pytest.fixture(scope="module")
def server(runs):
    """The running server: (url, Popen, stderr lines so far), its API key from LORA_API_KEY (--api-key is the
    same setting). Stopped with SIGTERM by the last test."""
    base, inst, other = runs
    chat = base.parent / "chat" / "out" / "adapter.safetensors"
    proc = python("-m", "lora_cli", "serve", "--adapter", f"inst={inst}", "--adapter", other, "--adapter",
                  f"chat={chat}", "--port", "0",
                  "--device", "cpu", env=child_env(LORA_API_KEY=KEY), popen=True)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def drain(pipe):  # read the server's output to the end, so its pipes never fill up
        for line in pipe:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    url = None
    while url is None:
        line = lines.get(timeout=TIMEOUT_S)
        assert line is not None, "".join(log)
        if line.startswith("serving http://"):
            url = line.split()[1]
    # the socket is listening already: poll /health until it answers
    for attempt in range(100):
        try:
            assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"
            break
        except httpx.TransportError:
            assert proc.poll() is None, "".join(log)
    else:
        pytest.fail("the server does not answer /health:\n" + "".join(log))
    yield url, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def base_name(runs) -> str:
    return str(runs[0].resolve())


def gen(adapter, *args) -> str:
    code, out, err = cli("generate", "--adapter", adapter, *args, "--device", "cpu")
    assert code == 0, err
    return out.removesuffix("\n")


def complete(client, model, prompt, **kw):
    kw = {"max_tokens": N, "temperature": 0, **kw}
    return client.completions.create(model=model, prompt=prompt, **kw)


def streamed(client, model, prompt, **kw) -> tuple[str, str]:
    """(the concatenated text of a streamed completion, its finish_reason)"""
    kw = {"max_tokens": N, "temperature": 0, **kw}
    pieces, finish = [], None
    for chunk in client.completions.create(model=model, prompt=prompt, stream=True, **kw):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


# ------------------------------------------------------------------------------------------------ in process


def test_adapters_share_the_base_tensors_and_compute_as_attached_alone(runs):
    base, inst, other = runs
    models = load_models([f"inst={inst}", str(other)], device=torch.device("cpu"))
    name = base_name(runs)
    assert sorted(models) == sorted(["inst", "out", name]) and models["inst"].parent == name
    bare, adapted = models[name].loaded.model, models["inst"].loaded.model
    assert lora_layers(bare) == [] and len(lora_layers(adapted)) > 0
    assert adapted.transformer.wte.weight is bare.transformer.wte.weight  # one copy of the base weights
    assert adapted.transformer.h[0].attn.c_attn.base_layer.weight is bare.transformer.h[0].attn.c_attn.weight
    # the blocks' weights are packed for decoding (inference.pack_for_decoding) once, shared by every copy; the
    # head (tied to the input embedding) keeps its plain weight, with one packed copy beside it for all
    assert bare.transformer.h[1].mlp.c_fc.weight.is_mkldnn and not bare.lm_head.weight.is_mkldnn
    assert bare.lm_head.packed is not None and models["inst"].loaded.model.lm_head.packed is bare.lm_head.packed
    assert models["out"].loaded.model.transformer.h[1].mlp.c_fc.weight is bare.transformer.h[1].mlp.c_fc.weight
    # an adapter that trains base tensors (here the biases of the layers it adapts) gets its own copies of them
    other_bias = models["out"].loaded.model.transformer.h[0].attn.c_attn.base_layer.bias
    assert other_bias is not bare.transformer.h[0].attn.c_attn.bias
    assert not torch.equal(other_bias, bare.transformer.h[0].attn.c_attn.bias)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    for key, path in (("inst", inst), ("out", other)):
        alone = attach_adapter(load_model(str(base)), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(models[key].loaded.model(ids), alone(ids), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(bare(ids), load_model(str(base)).model.eval()(ids), rtol=0, atol=0)


def test_bf16_models_share_one_packed_head(runs):
    """In bf16 the tied head is packed too (inference.pack_for_decoding, where oneDNN runs bf16 natively): the base
    and every adapter over it have their own head module over the one embedding weight, and they share one packed
    copy of it, not one each (fp32: test_models_share_base_weights)."""
    from lora_cli.models import PACKED_DTYPES

    base, inst, other = runs
    models = load_models([f"inst={inst}", str(other)], device=torch.device("cpu"), dtype=torch.bfloat16)
    heads = [served.loaded.model.lm_head for served in models.values()]
    assert len(heads) == 3 and len({id(h) for h in heads}) == 3
    assert all(h.weight is heads[0].weight and h.weight.dtype == torch.bfloat16 for h in heads)
    assert all(h.packed is heads[0].packed for h in heads)
    assert (heads[0].packed is not None) == (torch.bfloat16 in PACKED_DTYPES)


def test_the_engine_thread_can_have_the_only_openmp_team():
    """Engine releases the caller's OpenMP workers before its thread decodes (runtime.release_openmp_threads): torch's
    Linux build exposes OpenMP 5.0's omp_pause_resource_all, and torch computes as before after the release."""
    import sys

    from lora_cli.runtime import release_openmp_threads

    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    before = x @ x
    released = release_openmp_threads()
    if sys.platform.startswith("linux"):
        assert released
    torch.testing.assert_close(x @ x, before, rtol=0, atol=0)


def test_adapter_flags_and_stop_strings(tmp_path):
    run = tmp_path / "support"
    run.mkdir()
    (run / "adapter.safetensors").write_bytes(b"")
    assert adapter_flags([f"x={run}", str(run / "adapter.safetensors"), str(tmp_path / "b.safetensors")]) == \
        [("x", str(run)), ("support", str(run / "adapter.safetensors")), ("b", str(tmp_path / "b.safetensors"))]
    with pytest.raises(Exception, match="two adapters are named 'support'"):
        adapter_flags([str(run), str(run / "adapter.safetensors")])
    stop = StopText(["END", "\n\n"])
    assert [stop.feed(p) for p in ["ab", "cE", "N", "xE", "ND tail"]] == \
        [("ab", False), ("c", False), ("", False), ("ENx", False), ("", True)]
    assert StopText(["zz"]).feed("az") == ("a", False)


def test_bad_flags_are_one_line_errors(runs):
    base, inst, other = runs
    line = assert_one_line_error(*cli("serve", "--port", "0"), expected_code=2)
    assert "name a model: --model MODEL and/or --adapter" in line
    line = assert_one_line_error(*cli("serve", "--adapter", f"a={inst}", "--adapter", f"a={other}", "--port", "0"),
                                 expected_code=2)
    assert "two adapters are named 'a'" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = assert_one_line_error(*cli("serve", "--model", base, "--port", port), expected_code=2)
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in line
    for port in ("65536", "-1"):
        line = assert_one_line_error(*cli("serve", "--model", base, "--port", port), expected_code=2)
        assert line == f"error: --port must be 0-65535 (0: any free port), got {port}"
    # `--api-key "$KEY"` with KEY unset: refused, not an open server (nor one that refuses every request)
    line = assert_one_line_error(*cli("serve", "--model", base, "--port", "0", "--api-key", ""), expected_code=2)
    assert line == ("error: --api-key is empty; give the key clients must send, or leave --api-key out to serve "
                    "without one")


# ------------------------------------------------------------------------------------------------ the server


def test_models_and_health(server, client, runs):
    ids = {m.id for m in client.models.list()}
    assert ids == {"inst", "out", "chat", base_name(runs)}
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0


def test_completions_equal_lora_generate_and_streams_concatenate(client, runs):
    base, inst, other = runs
    prompt = "The river and the stone"
    for model, adapter in (("inst", inst), ("out", other)):
        answer = complete(client, model, prompt)
        want = gen(adapter, prompt, "--no-template", "--max-new-tokens", N)
        assert answer.choices[0].text == want
        assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == N
        assert answer.choices[0].finish_reason == "length"
        assert streamed(client, model, prompt) == (want, "length")
    # a list of prompts (text, token ids) gets one choice each, in order
    both = complete(client, "out", [prompt, encode(prompt)])
    assert [c.text for c in both.choices] == [want, want] and both.usage.prompt_tokens == 10
    # the base answers to its own name, and differs from the adapter
    plain = complete(client, base_name(runs), prompt).choices[0].text
    assert plain != complete(client, "inst", prompt).choices[0].text
    # seeded sampling is lora generate's sampling
    sampled = complete(client, "inst", prompt, temperature=1.0, top_p=0.9, seed=7).choices[0].text
    assert sampled == gen(inst, prompt, "--no-template", "--max-new-tokens", N, "--temperature", 1.0,
                          "--top-p", 0.9, "--seed", 7)


def test_stop_strings_cut_the_answer(client):
    prompt = "The river and the stone"
    whole = complete(client, "inst", prompt, max_tokens=N).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = complete(client, "inst", prompt, stop=[stop, "never appears"]).choices[0]
    assert (cut.text, cut.finish_reason) == (whole[:whole.find(stop)], "stop")
    assert streamed(client, "inst", prompt, stop=stop) == (whole[:whole.find(stop)], "stop")


def test_chat_uses_the_adapters_prompt_template(client, runs):
    base, inst, other = runs
    answer = client.chat.completions.create(model="inst", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": INSTRUCTION}],
        max_tokens=N, temperature=0)
    want = gen(inst, INSTRUCTION, "--max-new-tokens", N)
    assert answer.choices[0].message.content == want and answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="inst", messages=[{"role": "user", "content": INSTRUCTION}],
                                                 max_tokens=N, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens == N
    # its messages are read as a chat adapter's are: an unknown role is a 400, not left out
    with pytest.raises(openai.BadRequestError, match="unknown role 'bot'"):
        client.chat.completions.create(model="inst", messages=[{"role": "user", "content": INSTRUCTION},
                                                               {"role": "bot", "content": "hi"}])
    # an empty question, as `lora generate` refuses an empty prompt
    with pytest.raises(openai.BadRequestError, match="the last user message is empty; give some text to continue"):
        client.chat.completions.create(model="inst", messages=[{"role": "user", "content": " "}])
    # a model without a prompt template (the base, or a `text` adapter) cannot chat: a 400 that says so
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        client.chat.completions.create(model=base_name(runs), messages=[{"role": "user", "content": "hi"}])


def test_chat_adapter_answers_as_lora_generate_chat(client, runs):
    """A chat adapter's conversation goes through the ChatML template it was trained with, and the reply ends at
    the template's end of turn, exactly as `lora generate --chat` answers the same conversation."""
    chat = runs[0].parent / "chat" / "out" / "adapter.safetensors"
    messages = [{"role": "user", "content": "Repeat river."}, {"role": "assistant", "content": "river river"},
                {"role": "user", "content": "Repeat stone."}]
    want = gen(chat, "--chat", json.dumps(messages), "--max-new-tokens", 24)
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    with pytest.raises(openai.BadRequestError, match="role"):  # the template's conversation checks: a 400
        client.chat.completions.create(model="chat", messages=[{"content": "no role"}])
    # OpenAI's tool-call turn (an assistant with tool_calls and content null, as the openai client replays it) is
    # read as `lora generate --chat` reads it; tools themselves the server cannot call: a 400, not ignored
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    turn = [messages[0], {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "42"}]
    want = gen(chat, "--chat", json.dumps(turn), "--max-new-tokens", 4)
    assert client.chat.completions.create(model="chat", messages=turn, max_tokens=4,
                                          temperature=0).choices[0].message.content == want
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in (({"tools": tools}, "tools"), ({"functions": [tools[0]["function"]]}, "functions"),
                         ({"tool_choice": "required"}, "tool_choice"), ({"function_call": {"name": "f"}}, "function_call")):
        with pytest.raises(openai.BadRequestError, match=f"this server does not call tools; leave {param} out"):
            client.chat.completions.create(model="chat", messages=messages, max_tokens=2, extra_body=extra)
    for noop in ({"tools": [], "tool_choice": "none"}, {"functions": [], "function_call": "auto"}):
        assert client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0,
                                              extra_body=noop).choices[0].message.content == answer.choices[0].message.content
    # a limit too long for the context is named as the client sent it
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens=100000 plus the chat prompt"):
        client.chat.completions.create(model="chat", messages=messages, max_completion_tokens=100000)


def test_four_concurrent_clients_get_their_own_answers(client, runs):
    asks = [("inst", "Seven green tables", False), ("out", "The river and the stone", True),
            (base_name(runs), "North light on paper", False), ("inst", "Quick music", True)]
    want = [complete(client, m, p).choices[0].text for m, p, _ in asks]
    got: list = [None] * len(asks)
    barrier = threading.Barrier(len(asks))

    def ask(i):
        model, prompt, stream = asks[i]
        barrier.wait(timeout=60)
        got[i] = streamed(client, model, prompt)[0] if stream else complete(client, model, prompt).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want and len(set(want)) == 4


def test_concurrent_streams_are_decoded_together_and_get_their_own_answers(server, client):
    """Continuous batching: a long stream runs; three more streams (greedy and seeded sampling, prompts of other
    lengths) join its batch while it decodes. Each gets the answer it gets alone; /health's counters show the rows
    shared decoding steps."""
    long = 256
    asks = [("The river and the stone", dict(max_tokens=long, stop="never appears")),
            ("Quick music", {}), ("Seven green tables stand in the hall", dict(temperature=1.0, seed=11)),
            ("North", dict(max_tokens=2 * N, temperature=0.7, top_p=0.9, seed=3))]
    want = [streamed(client, "inst", p, **kw) for p, kw in asks]  # one at a time
    assert len(set(want)) == 4
    before = httpx.get(server[0] + "/health").json()
    got: list = [None] * len(asks)
    running = threading.Event()

    def ask(i):
        pieces, finish = [], None
        for chunk in complete(client, "inst", asks[i][0], stream=True, **asks[i][1]):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            running.set()  # the first stream is decoding: the others may start
        got[i] = ("".join(pieces), finish)

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    assert running.wait(timeout=120)
    others = [threading.Thread(target=ask, args=(i,)) for i in range(1, len(asks))]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(timeout=120)
    assert got == want
    after = httpx.get(server[0] + "/health").json()
    # the long stream (256 steps) outlives the others (at most 2 N steps): each of their steps is shared
    assert after["batched_steps"] - before["batched_steps"] >= N and after["max_batch"] >= 2
    assert after["active"] == 0


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": "inst", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    long_prompt = " ".join(["word"] * CONTEXT)
    cases = [
        # (body or raw bytes, headers, status, param, code)
        (b'{"model": "inst", "prompt": ', auth, 400, None, None),
        ({**good, "model": "nope"}, auth, 404, "model", "model_not_found"),
        ({**good, "max_tokens": -1}, auth, 400, "max_tokens", None),
        ({**good, "max_tokens": 10**9}, auth, 400, "max_tokens", "context_length_exceeded"),
        ({**good, "prompt": long_prompt}, auth, 400, "prompt", "context_length_exceeded"),
        ({**good, "prompt": [60000]}, auth, 400, "prompt", None),
        ({**good, "temperature": -1}, auth, 400, "temperature", None),
        (b'{"model": "inst", "prompt": "Hello", "temperature": 1e309}', auth, 400, "temperature", None),  # inf
        ({**good, "max_tokens": True}, auth, 400, "max_tokens", None),
        ({**good, "max_tokens": "5"}, auth, 400, "max_tokens", None),
        ({**good, "n": 3}, auth, 400, "n", None),
        ({**good, "n": True}, auth, 400, "n", None),  # true == 1, but not the integer 1
        ({**good, "n": 1.0}, auth, 400, "n", None),
        ({**good, "best_of": True}, auth, 400, "best_of", None),
        ({**good, "top_logprobs": 5}, auth, 400, "top_logprobs", None),  # would be ignored
        ({**good, "max_completion_tokens": 10**9}, auth, 400, "max_completion_tokens", "context_length_exceeded"),
        ({**good, "seed": 2**64}, auth, 400, "seed", None),  # beyond what torch's generators take
        ({**good, "stream": True, "stream_options": {"include_usage": "yes"}}, auth, 400, "stream_options", None),
        ({**good, "prompt": 5}, auth, 400, "prompt", None),
        ({**good, "prompt": ["Hello", " "]}, auth, 400, "prompt", None),  # empty text, as lora generate refuses it
        ({**good, "stop": [""]}, auth, 400, "stop", None),
        ({**good, "frequency_penalty": 2.0}, auth, 400, "frequency_penalty", None),  # would be ignored
        ({**good, "presence_penalty": -0.5}, auth, 400, "presence_penalty", None),
        ({**good, "logit_bias": {"44160": -100}}, auth, 400, "logit_bias", None),
        ({**good, "response_format": {"type": "json_object"}}, auth, 400, "response_format", None),
        ({**good, "prompt": "x" * (8 * 2**20)}, auth, 413, None, "request_too_large"),
        ({**good, "logprobs": 0}, auth, 400, "logprobs", None),  # 0 == False, but OpenAI's 0 asks for them
        ({**good, "echo": 0}, auth, 400, "echo", None),
        ([good], auth, 400, None, None),
        (good, {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key"),
        (good, {}, 401, None, "invalid_api_key"),
    ]
    for body, headers, status, param, code in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + "/v1/completions", content=content,
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        assert (err["param"], err["code"]) == (param, code), r.text
        r = httpx.post(url + "/v1/completions", json=good, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # several prompts: a bad one refuses the request, named by its place, before any of them starts decoding (the
    # good ones before it decoded to max_tokens for nobody)
    before = httpx.get(url + "/health").json()
    r = httpx.post(url + "/v1/completions", json={**good, "prompt": [[5, 6], [7, 8], [60000]], "max_tokens": 40},
                   headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt 3 holds token id 60000"), r.text
    after = httpx.get(url + "/health").json()
    assert (after["running"], after["tokens"]) == (0, before["tokens"]), (before, after)
    r = httpx.post(url + "/v1/completions", json={**good, "prompt": ["Hello", long_prompt]}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        f"prompt 2 has {CONTEXT} tokens; model 'inst' has a context of {CONTEXT} tokens: shorten it"), r.text
    # max_completion_tokens (OpenAI's newer name) counts on /v1/completions too
    r = httpx.post(url + "/v1/completions", json={**good, "max_tokens": 5, "max_completion_tokens": 1}, headers=auth)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    # a body without a Content-Length (chunked) is counted as it arrives: refused once past the limit
    def chunks():
        yield b'{"model": "inst", "prompt": "'
        for _ in range(9):
            yield b"x" * 2**20
        yield b'"}'
    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == {
        "message": "the request body passed the 8,388,608 bytes this server reads; send a shorter prompt",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}, r.text
    small = iter([json.dumps(good).encode()])
    r = httpx.post(url + "/v1/completions", content=small, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # null is the default for every optional field, as OpenAI's API takes it
    nulls = {**good, "temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
             "frequency_penalty": None, "presence_penalty": None, "logprobs": None, "echo": None}
    r = httpx.post(url + "/v1/completions", json={**nulls, "temperature": 0}, headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == httpx.post(
        url + "/v1/completions", json=good, headers=auth).json()["choices"][0]["text"]
    # their no-op values are fine, as OpenAI's clients send them
    noop = {**good, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}}
    r = httpx.post(url + "/v1/completions", json=noop, headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == httpx.post(
        url + "/v1/completions", json=good, headers=auth).json()["choices"][0]["text"]
    # the openai client sees the same errors as its exception classes
    with pytest.raises(openai.NotFoundError):
        complete(client, "nope", "Hello")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="inst", messages=[{"role": "user", "content": long_prompt}])
    assert httpx.get(url + "/health").json()["active"] == 0


def test_a_tiny_temperature_samples_the_top_token(client):
    """logits / 1e-45 would overflow to inf and NaN probabilities: the answer is the greedy one, streamed or not,
    and the request (decoded in the same batch as others) breaks nothing."""
    greedy = complete(client, "inst", "Hello").choices[0].text
    assert complete(client, "inst", "Hello", temperature=1e-45, seed=1).choices[0].text == greedy
    assert streamed(client, "inst", "Hello", temperature=1e-300, seed=1)[0] == greedy


def test_a_client_gone_mid_stream_frees_the_model(server, client):
    """Five streams abandoned one after another: before the stream response closed its body generator itself, 3 in
    25 ran their whole generation (the generator, left suspended at a yield, waited for the garbage collector)."""
    url = server[0]
    body = {"model": "out", "prompt": "Once", "max_tokens": CONTEXT - 4, "temperature": 0, "stream": True}
    for attempt in range(5):
        before = httpx.get(url + "/health").json()
        with httpx.stream("POST", url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: {")
        # The abandoned generation notices at its next token and leaves its batch. Poll /health until no request is
        # active: the generation either saw the disconnect (counted before it stops being active) or, wrongly, ran
        # to its end; the bound is the generation's length, not a number of polls that a loaded machine could
        # outlast.
        for _ in range(1_000_000):
            after = httpx.get(url + "/health").json()
            if after["active"] == 0:
                break
        assert (after["disconnected"], after["completed"]) == (before["disconnected"] + 1, before["completed"]), \
            (attempt, before, after)
    assert complete(client, "inst", "Hello", max_tokens=2).usage.completion_tokens == 2  # and the next is served


def _until_idle(poll) -> dict:
    """/health once no generation runs; bounded by the generations' length, not by a count of polls."""
    for _ in range(1_000_000):
        now = poll()
        if now["running"] == 0 and now["active"] == 0:
            return now
    raise AssertionError("generations never ended")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_takes_every_generation_of_its_request_out(server, client, stream):
    """A request of two prompts whose client leaves once the first is decoding: neither runs to its end, streamed
    or not (a non-streaming request decoded both to the end; a stream, the prompt it had not reached)."""
    import socket

    url = server[0]
    host, port = url.removeprefix("http://").split(":")
    max_tokens = CONTEXT - 4
    with httpx.Client(base_url=url) as health:
        poll = lambda: health.get("/health").json()  # noqa: E731
        before = _until_idle(poll)
        body = json.dumps({"model": "out", "prompt": ["Once", "Twice"], "max_tokens": max_tokens,
                           "temperature": 0, "stream": stream}).encode()
        request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request)
            for _ in range(1_000_000):  # the first prompt decodes (a 508-token answer takes about a second)
                if poll()["tokens"] > before["tokens"]:
                    break
        after = _until_idle(poll)
    assert after["tokens"] - before["tokens"] < max_tokens, (before, after)  # "Once" alone runs 508
    assert after["completed"] == before["completed"]
    assert complete(client, "inst", "Hello", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_stops_the_server_cleanly(server):
    url, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(log)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)
