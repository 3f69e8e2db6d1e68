"""A BERT-style Hugging Face tokenizer saved the way BERT-family tokenizer.json files ship: with truncation and
fixed-length padding configured in the file (issue 10: such settings silently cut and padded every document).

    tok_dir = write_bert_tokenizer(tmp_path / "bert")          # tokenizer.json + tokenizer_config.json
    reference_ids(tok_dir, "some text")                         # an independent whole-text encode
    ckpt, model = write_bert_checkpoint(tmp_path)               # a tiny model over it; ckpt/tokenizer inside

Built here with `tokenizers` (WordPiece trained on Python's own help text), nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

MAX_LENGTH = 16  # the file's truncation max_length and fixed padding length
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = [topics[k] for k in sorted(topics)][:30]


def write_bert_tokenizer(directory: str | Path, *, vocab_size: int = 400) -> Path:
    """WordPiece with BERT's normalizer, pre-tokenizer and [CLS] $A [SEP] template, truncation to MAX_LENGTH and
    padding to MAX_LENGTH with [PAD] saved in tokenizer.json; tokenizer_config.json names [SEP] as eos_token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                               show_progress=False))
    ids = {t: core.token_to_id(t) for t in SPECIALS}
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    core.enable_truncation(max_length=MAX_LENGTH)
    core.enable_padding(length=MAX_LENGTH, pad_id=ids["[PAD]"], pad_token="[PAD]")
    core.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]", "model_max_length": MAX_LENGTH}))
    saved = json.loads((directory / "tokenizer.json").read_text())
    assert saved["truncation"]["max_length"] == MAX_LENGTH and saved["padding"]["strategy"] == {"Fixed": MAX_LENGTH}
    return directory


def reference_ids(directory: str | Path, text: str) -> list[int]:
    """The ids of the whole text, no special tokens: the file loaded anew with truncation and padding off."""
    core = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    core.no_truncation()
    core.no_padding()
    return core.encode(text, add_special_tokens=False).ids


def write_bert_checkpoint(root: str | Path, *, max_seq_len: int = 128, seed: int = 3):
    """A tiny random model over this tokenizer's vocabulary saved as a checkpoint step directory with the
    tokenizer inside (ROOT/ckpt, ROOT/ckpt/tokenizer), as tools/generate.py and tools/eval.py read it.
    Returns (checkpoint dir, the model in eval mode)."""
    from megasynth.checkpoint import save_model_checkpoint  # noqa: PLC0415 - torch only for the tests that need it
    from megasynth.config import ModelConfig  # noqa: PLC0415
    from megasynth.hf import config_for_model  # noqa: PLC0415
    from megasynth.model import build_model  # noqa: PLC0415
    from megasynth.tokenizer import load_tokenizer  # noqa: PLC0415

    ckpt = Path(root) / "ckpt"
    tok = load_tokenizer(write_bert_tokenizer(Path(root) / "bert"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=max_seq_len, rope_theta=10000.0, init_std=0.3)
    model = build_model(cfg, "cpu", seed=seed)
    save_model_checkpoint(model, config_for_model(cfg), ckpt)
    tok.save(ckpt / "tokenizer")  # tokenizer.json copied byte for byte: truncation and padding still in it
    assert json.loads((ckpt / "tokenizer" / "tokenizer.json").read_text())["truncation"] is not None
    return ckpt, model.eval()
