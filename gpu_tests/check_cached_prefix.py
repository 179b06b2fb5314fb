"""A prompt whose prefix is in the prefix cache (its chunk attends to cached K/V through the lower-right causal
SDPA) against the same prompt computed fresh, on the bundled model: same greedy tokens, logprobs close.

Usage: PYTHONPATH=. python3 gpu_tests/check_cached_prefix.py
"""
import torch
from mixquant import LLM, SamplingParams
from mixquant.tiny import tasks
ex = tasks.generate("retrieval", 5)
llm0 = LLM("mixquant/tiny/checkpoint", enable_prefix_caching=False)
tok = llm0.get_tokenizer()
base = tok(ex.render_prompt(tok), add_special_tokens=False)["input_ids"]
prompts = [base[:-40] , base]
p = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
def run(llm):
    outs = [llm.generate([q], p, use_tqdm=False)[0].outputs[0] for q in prompts]
    return [(o.token_ids, [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]) for o in outs]
fresh = run(llm0)
del llm0; torch.cuda.empty_cache()
llm1 = LLM("mixquant/tiny/checkpoint", enable_prefix_caching=True)
cached = run(llm1)
hit = llm1.engine.block_manager.prefix_cache_hits
print("prompt tokens", len(base), "prefix hits", hit, "same tokens", [a[0] == b[0] for a, b in zip(fresh, cached)],
      "max logprob diff", max(abs(x - y) for a, b in zip(fresh, cached) for x, y in zip(a[1], b[1])))
