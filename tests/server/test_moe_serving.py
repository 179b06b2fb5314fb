"""A Qwen3-MoE checkpoint served as a dense Qwen3 is: fp8/bf16 experts, the qwen3 reasoning and hermes tool parsers."""
from __future__ import annotations

from tests.server.conftest import MODEL_NAME, running_server, server_config, tiny_engine
from tests.server.test_chat_template import TOOLS


def test_moe_model_serves_chat_with_tools_streamed_and_not(tiny_qwen3_moe):
    engine = tiny_engine(tiny_qwen3_moe, prefill_precision="fp8", decode_precision="bf16")
    with running_server(engine, server_config(tiny_qwen3_moe)) as server:
        client = server.openai()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=8,
                                               temperature=0)
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=8,
                                                     temperature=0, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == (reply.choices[0].message.content or "")
        metrics = server.http().get("/metrics").text
        assert 'prefill_precision="fp8"' in metrics
        computed = engine.stats()["tokens_computed"]
        assert computed["prefill/fp8"] > 0 and computed["decode/bf16"] == 2 * reply.usage.completion_tokens
