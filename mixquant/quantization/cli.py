"""`mixquant quantize MODEL OUT --scheme nvfp4|fp8`."""
from __future__ import annotations

from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser("quantize", help="write a compressed-tensors NVFP4 or FP8 checkpoint of a model")
    p.add_argument("model", help="BF16 checkpoint: a local folder or a Hugging Face id")
    p.add_argument("output", help="folder to write the quantized checkpoint to")
    p.add_argument("--scheme", choices=["nvfp4", "fp8"], required=True)
    p.add_argument("--calibration-file", help="text file (one sample per paragraph) or .jsonl with a 'text' field; "
                                              "NVFP4 activation scales are calibrated on it")
    p.add_argument("--ignore", nargs="*", default=[], help="module names (or re:regex) to leave unquantized")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def read_calibration(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        import json

        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [part for part in text.split("\n\n") if part.strip()]


def run(args) -> int:
    from mixquant.quantization.quantize import quantize_checkpoint

    texts = read_calibration(args.calibration_file) if args.calibration_file else None
    out = quantize_checkpoint(args.model, args.output, args.scheme, texts, args.ignore, args.device)
    print(f"wrote a compressed-tensors {args.scheme} checkpoint to {out}")
    return 0
