"""The real `openai` client against the real engine: chat and completions, streamed or not, n, logprobs, echo,
usage, seeds, and the payloads lm-evaluation-harness and BFCL send."""
from __future__ import annotations

import torch

from tests.server.conftest import MODEL_NAME

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat_prompt_ids(server, messages, **template_kwargs) -> list[int]:
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_every_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME, "alias"]
    assert models.data[0].max_model_len == 1024


def test_chat_usage_matches_the_tokenizer(client, server):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=7, temperature=0,
                                              extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(chat_prompt_ids(server, MESSAGES))
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7
    # the tiny model never closes a think block, so with --reasoning-parser qwen3 all it says is reasoning
    assert choice.message.content is None
    assert choice.message.reasoning_content and choice.message.model_extra["reasoning"] == \
        choice.message.reasoning_content


def test_chat_without_thinking_is_content(client):
    response = client.chat.completions.create(model="alias", messages=MESSAGES, max_tokens=5, temperature=0,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = response.choices[0].message
    assert message.content and message.model_extra.get("reasoning") is None
    assert response.model == "alias"


def test_chat_streamed_equals_not_streamed(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0, n=2,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert texts[0] == texts[1]  # greedy: n copies of the same answer
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = response.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert bytes(entry.bytes).decode() == entry.token


def test_completion_string_and_token_prompts_agree(client, server):
    prompt = "The quick brown fox"
    ids = server.engine.tokenizer(prompt)["input_ids"]
    by_text = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)


def test_completion_default_max_tokens_is_16(client):
    response = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16
    assert response.choices[0].finish_reason == "length"


def test_completion_batch_of_prompts_with_n(client):
    prompts = ["One", "Two three", "Four five six"]
    response = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=3, n=2, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == list(range(6))
    assert response.usage.completion_tokens == 18
    texts = [c.text for c in response.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]


def test_completion_streamed_equals_not_streamed(client):
    kwargs = dict(model=MODEL_NAME, prompt=["Hello there", "General"], max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs)
    texts, tokens, finish = ["", ""], [[], []], [None, None]
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage


def test_seed_reproduces_sampling(client):
    kwargs = dict(model=MODEL_NAME, prompt="Seeded", max_tokens=8, temperature=1.0, n=2, seed=1234)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    second = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == second
    assert first[0] != first[1]  # each choice draws its own stream (seed + index)
    chat = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=99)
    assert client.chat.completions.create(**chat).choices[0].message == \
        client.chat.completions.create(**chat).choices[0].message


def test_lm_eval_loglikelihood_payload(http, server):
    """local-completions' loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1."""
    tokenizer = server.engine.tokenizer
    context, continuation = tokenizer("Paris is the capital of")["input_ids"], tokenizer(" France")["input_ids"]
    prompt = context + continuation
    body = {"model": MODEL_NAME, "prompt": [prompt, prompt[:-1] + [11]], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    response = http.post("/v1/completions", json=body).json()
    for choice in sorted(response["choices"], key=lambda c: c["index"]):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt echoed, then the one generated token
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert choice["text"].startswith(tokenizer.decode(choice_prompt := (prompt if choice["index"] == 0
                                                                            else prompt[:-1] + [11])))
        assert logprobs["tokens"][:len(prompt)] == [tokenizer.decode([t]) for t in choice_prompt]
        ctxlen = len(context)
        # what lm-eval computes from it
        scored = logprobs["token_logprobs"][ctxlen:-1]
        assert len(scored) == len(continuation) and all(lp < 0 for lp in scored)
        for lp, top in zip(scored, logprobs["top_logprobs"][ctxlen:-1]):
            assert max(top.values()) >= lp
        assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])


def test_echoed_logprobs_are_the_models(http, server):
    """The prompt logprobs lm-eval scores with are those of the checkpoint run by transformers."""
    from transformers import AutoModelForCausalLM

    prompt = server.engine.tokenizer("The capital of France is Paris")["input_ids"]
    echoed = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "logprobs": 0, "echo": True,
                                                "temperature": 0}).json()["choices"][0]["logprobs"]
    model = AutoModelForCausalLM.from_pretrained(server.engine.model_path, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    expected = reference.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(echoed["token_logprobs"][1:len(prompt)]), expected, atol=1e-3)


def test_lm_eval_generation_payload(http):
    body = {"prompt": [[9707, 11, 1879], [785, 3974]], "model": MODEL_NAME, "max_tokens": 5, "temperature": 0,
            "stop": ["\n\n", "Question:"], "seed": 1234}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 2


def test_bfcl_style_completion_reads_text_and_usage(http):
    body = {"model": MODEL_NAME, "prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            "temperature": 0.0, "max_tokens": 4, "stop_token_ids": [151645], "skip_special_tokens": False}
    response = http.post("/v1/completions", json=body).json()
    assert isinstance(response["choices"][0]["text"], str)
    assert response["usage"]["prompt_tokens"] > 0 and response["usage"]["completion_tokens"] > 0


def test_stop_string_ends_the_text_before_it(client):
    kwargs = dict(model=MODEL_NAME, prompt="Tell me", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    stopped = client.completions.create(**kwargs, stop=[stop, "never appears"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["stop_reason"] == stop
    assert stopped.text == free[:free.index(stop)]


def test_tokenizer_endpoints(http, server):
    tokenizer = server.engine.tokenizer
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and "<|im_start|>" in info["chat_template"]
    tokens = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokens["tokens"] == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    assert chat["tokens"] == chat_prompt_ids(server, MESSAGES)
    assert chat["token_strs"][0] == "<|im_start|>"


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_choices_that_finish_at_different_times_stream_one_finish_each(client):
    kwargs = dict(model=MODEL_NAME, max_tokens=40, temperature=1.0, n=3, seed=7, stop=" ")
    counts = {}
    for chunk in client.completions.create(prompt="Sample", stream=True, logprobs=0, **kwargs):
        for choice in chunk.choices:
            counts.setdefault(choice.index, [0, 0])
            counts[choice.index][0] += len(choice.logprobs.tokens)
            counts[choice.index][1] += choice.finish_reason is not None
    assert [finishes for _, finishes in counts.values()] == [1, 1, 1]
    assert len({tokens for tokens, _ in counts.values()}) > 1  # they did finish at different steps
    chat_finishes = [0, 0, 0]
    for chunk in client.chat.completions.create(messages=MESSAGES, stream=True, **kwargs):
        for choice in chunk.choices:
            chat_finishes[choice.index] += choice.finish_reason is not None
    assert chat_finishes == [1, 1, 1]
