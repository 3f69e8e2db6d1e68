"""Import a Hugging Face Qwen3 or Llama directory as a megasynth checkpoint (weights only).

    python tools/import_hf.py --input ~/models/Qwen3-0.6B --output ckpt/qwen3-0.6b
    python -m megasynth.train --config my.toml --train.init_from=ckpt/qwen3-0.6b

Reads config.json and model.safetensors (or shards listed in model.safetensors.index.json); the tokenizer,
when the directory has one, goes to OUTPUT/tokenizer. Unsupported architectures or features (RoPE scaling,
biases, sliding window) and missing or unexpected tensors are errors that name them. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, check_outputs, directory
from megasynth.hf import DTYPES, HFError, import_hf_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="HF_DIR",
                        help="a local Hugging Face model directory (config.json + safetensors weights)")
    parser.add_argument("--output", required=True, metavar="CKPT_DIR",
                        help="checkpoint directory to create (config.toml, meta.json, DCP shards, tokenizer/)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype the weights are stored in (default float32, what training expects)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it already exists (an --output that is, holds or sits inside "
                             "--input is refused regardless)")
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": directory(args.output)}, {"--input": directory(args.input)})
    try:
        out, warning = import_hf_checkpoint(args.input, args.output, dtype=DTYPES[args.dtype],
                                            overwrite=args.overwrite)
    except (HFError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"imported {args.input} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
