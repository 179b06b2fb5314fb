"""The agentic workload of `mixquant bench serve`, replayed offline against an engine in this process.

No server and no timing: this measures what the prefix cache does with the workload's prompts (a session's turn is
sent once its previous turn has finished, sessions interleaved in the engine as a server would run them), so that a
model with recurrent state (snapshots on a block grid) and a dense model can be compared on CPU-sized workloads.
"""
from __future__ import annotations

from dataclasses import dataclass

from mixquant.bench.serve import AgenticWorkload
from mixquant.engine.llm_engine import LLMEngine
from mixquant.sampling_params import SamplingParams


@dataclass
class ReplayResult:
    prefix_cache_queries: int
    prefix_cache_hits: int
    steps: int
    tokens_computed: int  # prompt and generated tokens the model ran (hits excluded, recomputation included)

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def replay(engine: LLMEngine, workload: AgenticWorkload) -> ReplayResult:
    """Every session's turns in order, all sessions at once; the engine's counters before the replay are not
    counted."""
    before = engine.stats()
    params = SamplingParams(max_tokens=workload.output_tokens, ignore_eos=True)
    prompts = {session: workload.first_prompt(session) for session in range(workload.sessions)}
    for session, prompt in prompts.items():
        engine.add_request(f"{session}:0", prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for output in engine.step():
            if not output.finished:
                continue
            session, turn = map(int, output.request_id.split(":"))
            if turn + 1 < workload.turns:
                generated = len(output.outputs[0].token_ids)
                prompts[session] = workload.next_prompt(prompts[session], session, turn, generated)
                engine.add_request(f"{session}:{turn + 1}", prompts[session], params)
    after = engine.stats()
    computed = sum(after["tokens_computed"].values()) - sum(before["tokens_computed"].values())
    return ReplayResult(after["prefix_cache_queries"] - before["prefix_cache_queries"],
                        after["prefix_cache_hits"] - before["prefix_cache_hits"], steps, computed)
