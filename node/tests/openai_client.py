"""Drives the node's local OpenAI-compatible endpoint with the real `openai` client (PyPI).

    python openai_client.py BASE_URL API_KEY LLM_MODEL EMBED_MODEL TRUNCATABLE_EMBED_MODEL

TRUNCATABLE_EMBED_MODEL is EMBED_MODEL's files under a manifest that declares truncated sizes
64 and 128.

The endpoint must run with [inference] queue_bound = 1 and concurrency = 1. Prints one line per
check and "ALL OK" at the end; any failed check raises.
"""

import sys
import threading
import time

import urllib.request

import openai

base, key, llm, emb, mrl = sys.argv[1:6]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def metrics():
    req = urllib.request.Request(base + "/metrics", headers={"authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()


def check(name):
    print("ok:", name, flush=True)


ids = [m.id for m in client.models.list().data]
assert llm in ids and emb in ids, ids
check("models lists both imported models")
assert client.models.retrieve(llm).id == llm
assert client.models.retrieve(llm.split("@")[0]).id == llm, "by name, as requests may name it"
try:
    client.models.retrieve("no-such-model@1")
    raise AssertionError("an absent model was retrieved")
except openai.NotFoundError:
    check("GET /v1/models/{id} answers one model, 404 for another")

with urllib.request.urlopen(base + "/health", timeout=30) as resp:
    assert resp.status == 200 and b"ok" in resp.read()
req = urllib.request.Request(base + "/v1/models", headers={"authorization": "bearer " + key})
with urllib.request.urlopen(req, timeout=30) as resp:
    assert resp.status == 200
check("/health answers without a key; the bearer scheme is case-insensitive")

a = client.completions.create(model=llm, prompt="Hello", max_tokens=12, temperature=0)
b = client.completions.create(model=llm, prompt="Hello", max_tokens=12, temperature=0)
assert a.choices[0].text == b.choices[0].text, (a, b)
assert 1 <= a.usage.completion_tokens <= 12, a.usage
assert a.usage.prompt_tokens >= 1
assert a.choices[0].finish_reason in ("stop", "length"), a.choices[0].finish_reason
assert a.system_fingerprint.startswith("llama:"), a.system_fingerprint
check("greedy completions repeat, with usage and the model's digest")

streamed = client.completions.create(model=llm, prompt="Hello", max_tokens=12, temperature=0, stream=True)
text = "".join(c.choices[0].text for c in streamed if c.choices)
assert text == a.choices[0].text, (text, a.choices[0].text)
check("a streamed completion equals the whole one")

msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
chat = client.chat.completions.create(model=llm, messages=msgs, max_tokens=8, temperature=0)
stream = client.chat.completions.create(model=llm, messages=msgs, max_tokens=8, temperature=0, stream=True)
roles, parts, finish = [], [], None
for c in stream:
    if not c.choices:
        continue
    d = c.choices[0].delta
    roles.append(d.role)
    parts.append(d.content or "")
    finish = c.choices[0].finish_reason or finish
assert roles[0] == "assistant", roles
assert "".join(parts) == chat.choices[0].message.content, (parts, chat)
assert finish == chat.choices[0].finish_reason, (finish, chat)
check("chat completions, whole and streamed, agree")

stream = client.chat.completions.create(model=llm, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
chunks = list(stream)
assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, (chunks[-1].usage, chat.usage)
assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
check("stream_options.include_usage ends the stream with the usage")

lp = client.chat.completions.create(model=llm, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=3)
content = lp.choices[0].logprobs.content
# Tokens may split a character: their bytes, joined, are the text.
assert bytes(b for t in content for b in t.bytes).decode(errors="replace") == lp.choices[0].message.content, lp
assert lp.choices[0].message.content == chat.choices[0].message.content, (lp, chat)
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True), t
    # Greedy: the token taken is the most likely one.
    assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t
legacy = client.completions.create(model=llm, prompt="Hello", max_tokens=12, temperature=0, logprobs=2)
assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens, legacy
assert legacy.choices[0].text == a.choices[0].text, legacy
assert all(len(t) == 2 for t in legacy.choices[0].logprobs.top_logprobs), legacy
check("logprobs and top_logprobs (chat) and logprobs (completions) match the text, greedy takes the top token")

for kwargs, field in (
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
):
    try:
        client.chat.completions.create(model=llm, messages=msgs, max_tokens=4, **kwargs)
        raise AssertionError(f"{field} was silently ignored")
    except openai.BadRequestError as err:
        assert err.body["param"] == field, err.body
try:
    client.embeddings.create(model=emb, input="x", dimensions=64)
    raise AssertionError("dimensions was silently ignored")
except openai.BadRequestError as err:
    assert err.body["param"] == "dimensions", err.body
check("fields the endpoint cannot honour are 400s naming them (streamed logprobs, functions, dimensions)")

e = client.embeddings.create(model=emb, input=["a cat sits on the mat", "stock prices fell"])
assert len(e.data) == 2 and len(e.data[0].embedding) == 384, e
f = client.embeddings.create(model=emb, input="a cat sits on the mat", encoding_format="float")
assert max(abs(x - y) for x, y in zip(e.data[0].embedding, f.data[0].embedding)) < 1e-6
assert abs(sum(x * x for x in f.data[0].embedding) - 1.0) < 1e-4
assert e.usage.prompt_tokens > 0
check("embeddings in base64 (the client's default) and float agree and are unit length")

full = client.embeddings.create(model=mrl, input=["a cat sits on the mat"], encoding_format="float").data[0].embedding
cut = client.embeddings.create(model=mrl, input=["a cat sits on the mat"], dimensions=64).data[0].embedding
assert len(full) == 384 and len(cut) == 64, (len(full), len(cut))
norm = sum(x * x for x in full[:64]) ** 0.5
assert max(abs(c - f / norm) for c, f in zip(cut, full)) < 1e-5
assert abs(sum(x * x for x in cut) - 1.0) < 1e-4
try:
    client.embeddings.create(model=mrl, input="x", dimensions=100)
    raise AssertionError("an undeclared size was accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "dimensions" and "64, 128" in err.body["message"], err.body
check("dimensions: a size the manifest declares gives the vector's head at unit length; others are 400s")

try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    check("a wrong API key is refused (401)")

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an absent model answered")
except openai.NotFoundError as err:
    assert "models import" in str(err), err
    check("a model not in the store is a 404")

for stream in (False, True):
    try:
        r = client.completions.create(model=llm, prompt="x" * 3000, max_tokens=4, temperature=0, stream=stream)
        list(r) if stream else None
        raise AssertionError("a prompt longer than the context was accepted")
    except openai.BadRequestError as err:
        assert "context" in str(err), err
        assert err.body["code"] == "context_length_exceeded", err.body
check("a prompt longer than the context is a 400, streamed or not")

# The test model's context is 512 tokens: a short prompt with max_tokens 600 does not fit.
for stream in (False, True):
    try:
        r = client.completions.create(model=llm, prompt="Hello", max_tokens=600, temperature=0, stream=stream)
        list(r) if stream else None
        raise AssertionError("a prompt and max_tokens over the context were accepted")
    except openai.BadRequestError as err:
        assert err.body["code"] == "context_length_exceeded", err.body
        assert "512" in err.body["message"] and "600" in err.body["message"], err.body
cut = client.completions.create(model=llm, prompt="Hello", max_tokens=600, temperature=0, extra_body={"truncate": True})
# The last token sampled needs no slot in the context: 513 tokens at most in all.
assert cut.usage.prompt_tokens + cut.usage.completion_tokens <= 513, cut.usage
assert cut.choices[0].finish_reason in ("length", "stop"), cut.choices[0]
check("prompt + max_tokens over the context is a 400 naming both numbers; \"truncate\": true stops at the context")

# Back-pressure: one long embedding computes, one request may wait, the rest get 429 at once.
blocker = {}


def long_embedding():
    texts = [f"sentence number {i} about the weather and the sea" for i in range(2048)]
    blocker["r"] = client.embeddings.create(model=emb, input=texts)


t = threading.Thread(target=long_embedding)
t.start()
deadline = time.time() + 60
while time.time() < deadline:
    if "outpost_inference_running 1" in metrics():
        break
    time.sleep(0.05)
outcomes = []


def small(stream):
    # Streamed or not, a refusal before the first token is an HTTP 429 the SDK raises as such
    # (and would retry after Retry-After), never a 200 with an error inside the stream.
    try:
        r = client.completions.create(model=llm, prompt="Hi", max_tokens=2, temperature=0, stream=stream)
        if stream:
            assert "".join(c.choices[0].text for c in r if c.choices) is not None
        outcomes.append("ok")
    except openai.RateLimitError as err:
        assert err.response.headers.get("retry-after") == "1", err.response.headers
        outcomes.append("429")


smalls = [threading.Thread(target=small, args=(i % 2 == 1,)) for i in range(8)]
for s in smalls:
    s.start()
for s in smalls:
    s.join()
t.join()
assert len(blocker["r"].data) == 2048
assert len(outcomes) == 8, outcomes  # a thread that raised anything else left no outcome
assert outcomes.count("429") >= 2 and "ok" in outcomes, outcomes
m = metrics()
refused = [line for line in m.splitlines() if line.startswith("outpost_inference_refused_queue_full_total ")]
assert refused and float(refused[0].split()[1]) >= 2, refused
check(f"requests beyond the queue bound get 429 with Retry-After ({outcomes})")

print("ALL OK", flush=True)
