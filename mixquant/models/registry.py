from __future__ import annotations

from mixquant.models.decoder import CausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from mixquant.models.gemma4 import Gemma4ForCausalLM
from mixquant.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from mixquant.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    # the hub's multimodal checkpoints, served text-only
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5MoeForCausalLM,
    "Qwen3_5MoeForCausalLM": Qwen3_5MoeForCausalLM,
    "Gemma4ForConditionalGeneration": Gemma4ForCausalLM,
    "Gemma4ForCausalLM": Gemma4ForCausalLM,
}


def model_class(config) -> type[CausalLM]:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {architectures or '(none in config.json)'}; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )
