"""`mixquant eval`: the paper's benchmarks against any OpenAI-compatible endpoint (see docs/eval.md).

client.py   HTTP to the endpoint: retries, reasoning split from the answer, the server's reported precisions
data.py     datasets from a local file or the Hugging Face hub
scoring.py  answer extraction (the last \\boxed{}, a choice letter) and comparison (math-verify, numbers)
text.py     fitting long prompts into a token budget
runner.py   one benchmark at one seed: concurrency, JSONL records, --resume
metrics.py  accuracy, extraction rate, length, breakdowns, and their tables
reasoning.py, longbench.py, longmemeval.py   the benchmarks
compare.py  accuracy of several result directories side by side
cli.py      the `mixquant eval` subcommands
"""
