"""Import a Hugging Face Qwen3 or Llama directory as a megasynth checkpoint (weights only).

    python tools/import_hf.py --input ~/models/Qwen3-0.6B --output ckpt/qwen3-0.6b
    python -m megasynth.train --config my.toml --train.init_from=ckpt/qwen3-0.6b

Reads config.json and model.safetensors (or shards listed in model.safetensors.index.json); the tokenizer,
when the directory has one, goes to OUTPUT/tokenizer. Unsupported architectures or features (RoPE scaling,
biases, sliding window) and missing or unexpected tensors are errors that name them. The checkpoint is built
beside OUTPUT and moved in with meta.json last; other files in OUTPUT are left alone. An existing checkpoint is
refused unless --overwrite (which replaces only its files and tokenizer/), and an OUTPUT that is, holds or sits
inside --input is refused regardless. Exit code 2 on bad input, with one line naming it.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, check_outputs, directory
from megasynth.hf import DTYPES, IMPORT_FILES, HFError, import_hf_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="HF_DIR",
                        help="a local Hugging Face model directory (config.json + safetensors weights)")
    parser.add_argument("--output", required=True, metavar="CKPT_DIR",
                        help="checkpoint directory to write (config.toml, meta.json, DCP shards, tokenizer/; other "
                             "files there are kept)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype the weights are stored in (default float32, what training expects)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint in --output, not other files there (default: refuse, "
                             "exit 2; an --output that is, holds or sits inside --input is refused regardless)")
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": directory(args.output, IMPORT_FILES)}, {"--input": directory(args.input)},
                  overwrite=args.overwrite)
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
