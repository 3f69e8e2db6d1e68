"""Checkpoints for the vLLM tests, made with the tools a user runs (called in-process), exported for vLLM.

    with one_torch_thread():
        base = build_base(tmp / "models")           # a run directory with its tokenizer (chat tokens)
        sft = build_sft(tmp / "models", base)        # a few SFT steps of it on chat records
    export(base, tmp / "hf_base")                      # tools/export_hf.py

The base model is the SFT example's tiny shape (examples/sft/run.py --tiny: 2 layers, dim 64, QK-norm, tied
embeddings, so it exports as Qwen3ForCausalLM) trained until it has memorised a dozen sentences, so that it
writes varied text (different prompts, different continuations, not one token repeated), which a greedy parity
test needs. The SFT model is a few steps of it on chat records (the built-in ChatML template, which
tools/train_tokenizer.py --chat-tokens writes into tokenizer_config.json, so vLLM serves it too). Built in two
steps so that the base model's users (its server, the synthesis runs) start while the SFT model trains.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from helpers import load_tool
from sbp_helpers import CORPUS_TEXTS

from megasynth.config import DataSource, load_config, save_config

REPO = Path(__file__).resolve().parents[2]
# A small corpus the model memorises in a few dozen steps: greedy continuations of different prompts then
# differ and run over many tokens (a barely trained model on varied text writes "s.<|endoftext|>" whatever the
# prompt, and every engine agrees on that).
TEXTS = [t for t in CORPUS_TEXTS if not t.startswith("def ")] + ["Sorting is stable: equal items keep their order."]
QUESTIONS = ["What is a fox?", "What does a list keep?", "Tell me about dictionaries.", "What is json for?",
             "What are tuples?", "What does a generator do?", "Where do exceptions go?", "What is os?",
             "What is a string?", "What is a class?", "What do iterators remember?", "Is sorting stable?"]
BASE_STEPS = 80
SFT_STEPS = 8
MODEL = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
         "--model.ffn_dim=128", "--model.max_seq_len=128", "--data.seq_len=32"]


@contextmanager
def one_torch_thread():
    """torch on one intra-op thread inside the block: these models are so small that a second thread only waits
    for the first (80 training steps took 36 s of CPU on two threads, 3 s on one, on the loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(args: list) -> None:
    """tools/NAME.py ARGS (args[0] = NAME) or `-m megasynth.train ARGS`, in this process (no interpreter start)."""
    name, argv = args[0], [str(a) for a in args[1:]]
    if name == "-m megasynth.train":
        from megasynth.train import main  # noqa: PLC0415
    else:
        main = load_tool(name).main
    code = main(argv)
    if code:
        raise RuntimeError(f"{name} {' '.join(argv)}: exit code {code}")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_base(out: Path) -> Path:
    """The base run directory, with tokenizer/ (its chat_template the built-in ChatML); OUT/data holds its corpus
    (data/text, what the synthesis tests seed from)."""
    out = Path(out)
    data, tok = out / "data", out / "tokenizer"
    corpus = _jsonl(out / "corpus.jsonl", [{"text": t} for t in TEXTS * 4])
    _run(["train_tokenizer", "--input", corpus, "--output", tok, "--type", "bpe", "--vocab-size", "320",
          "--chat-tokens", "--no-progress"])
    # --workers 0: tokenized in this process (a worker process would cost an interpreter start and its imports).
    _run(["preprocess_data", "--input", corpus, "--output-prefix", data / "text", "--tokenizer", tok,
          "--workers", "0", "--no-progress"])
    vocab = json.loads((data / "text.json").read_text())["vocab_size"]
    base = out / "base"
    _run(["-m megasynth.train", "--config", REPO / "examples" / "configs" / "demo.toml",
          f"--data.data_path={data / 'text'}", f"--model.vocab_size={vocab}", f"--train.run_dir={base}",
          "--train.resume=none", f"--train.steps={BASE_STEPS}", "--train.eval_every=0", "--train.checkpoint_every=0",
          "--train.global_batch_size=8", "--train.micro_batch_size=8", "--optim.warmup_steps=5", "--optim.lr=1e-2",
          "--optim.weight_decay=0", *MODEL])
    return base


def build_sft(out: Path, base: Path) -> Path:
    """The SFT run directory: SFT_STEPS of BASE (build_base(OUT)'s) on chat records."""
    out = Path(out)
    data, tok = out / "data", out / "tokenizer"
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(QUESTIONS, TEXTS)]
    chat = _jsonl(out / "chat.jsonl", chats * 4)
    _run(["preprocess_sft", "--input", chat, "--tokenizer", tok, "--output-prefix", data / "chat",
          "--format", "chat", "--workers", "0", "--no-progress"])
    cfg = load_config(base / "config.toml")
    cfg.data.data_path, cfg.data.valid_paths, cfg.data.cache_dir = "", [], ""
    cfg.data.seq_len = 64
    cfg.data.sources = [DataSource(path=str(data / "chat"), weight=1.0, name="chat", packing="pack")]
    sft = out / "sft"
    t = cfg.train
    t.run_dir, t.resume, t.init_from, t.steps = str(sft), "none", str(base), SFT_STEPS
    t.eval_every, t.checkpoint_every, t.log_every = 0, 0, 1
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    save_config(cfg, out / "sft.toml")
    _run(["-m megasynth.train", "--config", out / "sft.toml"])
    return sft


def export(run_dir: Path, out: Path) -> Path:
    """tools/export_hf.py --checkpoint RUN_DIR --output OUT (float32, with the run's tokenizer)."""
    _run(["export_hf", "--checkpoint", run_dir, "--output", out])
    return Path(out)
