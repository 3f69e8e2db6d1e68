"""Export a megasynth checkpoint as a Hugging Face directory that transformers (and vLLM) load.

    python tools/export_hf.py --checkpoint runs/tiny --output hf/tiny
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf/tiny')"

Writes model.safetensors (sharded with an index above --max-shard-gb), config.json, generation_config.json
and the tokenizer files. A model with QK-norm exports as Qwen3ForCausalLM, one without as LlamaForCausalLM.
The files are built beside --output and moved in with config.json last, so a reader sees the complete old or
the complete new export; other files there (a README, a model card) are left alone. An existing export is
refused unless --overwrite (which replaces only these files, stale shards of an earlier export included), and
an --output that is, holds or sits inside the checkpoint or the tokenizer is refused regardless. Exit code 2 on
bad input, with one line naming it.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, check_outputs, directory, positive_float, run_dir
from megasynth.hf import DTYPES, EXPORT_FILES, HFError, export_hf


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_STEP_DIR",
                        help="a run directory (its newest complete checkpoint) or one step_XXXXXXXX directory")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="the Hugging Face directory to write (other files there are kept)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the exported weights (default float32)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer to include (default: the checkpoint's tokenizer/, else RUN_DIR/tokenizer)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="export the weights without tokenizer files (bos/eos ids then come from meta.json)")
    parser.add_argument("--max-shard-gb", type=positive_float, default=5.0,
                        help="largest safetensors file in GiB before the weights are split into shards (default 5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export in --output: the weights, configs and tokenizer files, not "
                             "other files there (default: refuse, exit 2; an --output that is, holds or sits inside "
                             "the checkpoint or the tokenizer is refused regardless)")
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": directory(args.output, EXPORT_FILES)},
                  {"--checkpoint": run_dir(args.checkpoint), "--tokenizer": args.tokenizer}, overwrite=args.overwrite)

    from megasynth.checkpoint import CheckpointError, load_for_inference, read_meta, resolve_checkpoint  # noqa: PLC0415
    from megasynth.generate import find_tokenizer_dir  # noqa: PLC0415
    from megasynth.tokenizer import load_tokenizer  # noqa: PLC0415

    try:
        step_dir = resolve_checkpoint(args.checkpoint)
        tokenizer, bos_id, eos_id = None, None, None
        if not args.no_tokenizer:
            tok_dir = args.tokenizer or find_tokenizer_dir(args.checkpoint, step_dir)
            if tok_dir is None:
                raise FileNotFoundError(f"{args.checkpoint}: no tokenizer/ in the checkpoint or its run directory; "
                                        "pass --tokenizer DIR, or --no-tokenizer to export the weights alone")
            tokenizer = load_tokenizer(tok_dir)
        else:
            ident = read_meta(step_dir).get("tokenizer") or {}
            bos_id, eos_id = ident.get("bos_id"), ident.get("eod_id")
        model, cfg = load_for_inference(step_dir, device="cpu", dtype=DTYPES[args.dtype])
        out = export_hf(model, cfg, args.output, tokenizer=tokenizer, dtype=DTYPES[args.dtype], bos_id=bos_id,
                        eos_id=eos_id, max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    except (CheckpointError, HFError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arch = "Qwen3ForCausalLM" if cfg.model.qk_norm else "LlamaForCausalLM"
    print(f"exported {step_dir} -> {out} ({arch}, {model.num_params():,} parameters, {args.dtype}"
          f"{', with tokenizer' if tokenizer is not None else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
