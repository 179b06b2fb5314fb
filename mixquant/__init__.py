"""mixquant: LLM inference where precision is decided per phase (low-precision prefill, BF16 decode)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixquant")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from mixquant.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from mixquant.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from mixquant.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]
