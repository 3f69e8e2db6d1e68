"""megasynth.tokenizer: both backends behind one interface, specials only when asked, stable identity, clear errors.

Tokenizers are trained here on Python's own help text (pydoc_data), a few hundred KB of real English and code.
"""

import json
import os
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
from tokenizers import Tokenizer as HFCore
from tokenizers import models, pre_tokenizers, processors

from megasynth.tokenizer import (
    TokenizerError,
    load_tokenizer,
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
)

CORPUS = [topics[k] for k in sorted(topics)][:40]
TRICKY = [
    "Hello, world.",
    "  two leading spaces, two  inner,\ttab and trailing  ",
    "lines\n\n\nand blank lines\r\nwith CRLF\n",
    "ünïcödé, 中文, emoji 🎉 and a zero-width\u200bspace",
    "def f(x):\n    return x ** 2  # code\n",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tok"
    return train_bpe_tokenizer(CORPUS, out, vocab_size=600, special_tokens=["<|sep|>"])


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "tok"
    return train_sentencepiece_tokenizer(CORPUS, out, vocab_size=500, threads=1)


@pytest.fixture(params=["bpe", "sp"])
def tok(request, bpe, sp):
    return {"bpe": bpe, "sp": sp}[request.param]


def test_loads_from_directory_and_from_file(bpe, sp):
    assert bpe.type == "huggingface" and sp.type == "sentencepiece"
    for tok, file in ((bpe, "tokenizer.json"), (sp, "tokenizer.model")):
        again = load_tokenizer(Path(tok.path) / file)
        assert type(again) is type(tok)
        assert (again.vocab_size, again.eod_id, again.bos_id) == (tok.vocab_size, tok.eod_id, tok.bos_id)
        assert again.encode(TRICKY[0]) == tok.encode(TRICKY[0])
    # The trainers' conventions: BPE's EOD is <|endoftext|> at id 0, no BOS; SentencePiece unk 0, BOS 1, EOS 2.
    assert (bpe.vocab_size, bpe.eod_id, bpe.bos_id) == (600, 0, None)
    assert bpe.decode([bpe.eod_id]) == "<|endoftext|>"
    assert (sp.vocab_size, sp.eod_id, sp.bos_id) == (500, 2, 1)


def test_decode_inverts_encode(tok):
    for text in TRICKY + CORPUS[:5]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # It learned multi-character pieces: fewer ids than bytes, even at these tiny vocabularies (SentencePiece
    # spends 256 of its 500 ids on byte fallback; it lands near 0.55 ids per byte here, BPE lower).
    assert len(tok.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode())


def test_batch_equals_single(tok):
    texts = TRICKY + CORPUS[:3]
    single = [tok.encode(t, append_eod=True) for t in texts]
    assert tok.encode_batch(texts, append_eod=True) == single
    flat, lengths = tok.encode_batch_array(texts, append_eod=True, dtype=np.uint16)
    assert flat.dtype == np.uint16 and lengths.dtype == np.int64
    assert lengths.tolist() == [len(s) for s in single]
    assert flat.tolist() == [i for s in single for i in s]
    empty_flat, empty_lengths = tok.encode_batch_array([], append_eod=True)
    assert empty_flat.size == 0 and empty_lengths.size == 0
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("not a list")


def test_specials_only_when_asked(bpe, sp):
    text = CORPUS[1][:300]
    for tok in (bpe, sp):
        plain = tok.encode(text)
        assert tok.eod_id not in plain and (tok.bos_id is None or tok.bos_id not in plain)
        assert tok.encode(text, append_eod=True) == plain + [tok.eod_id]
        assert tok.encode("", append_eod=True) == [tok.eod_id]
    assert sp.encode(text, add_bos=True, append_eod=True) == [sp.bos_id] + sp.encode(text) + [sp.eod_id]
    with pytest.raises(TokenizerError, match="no BOS"):
        bpe.encode(text, add_bos=True)
    with pytest.raises(TokenizerError, match="no BOS"):
        bpe.encode_batch_array([text], add_bos=True)


def test_a_post_processor_that_adds_bos_is_bypassed(tmp_path):
    # A Llama-3-style tokenizer.json whose post-processor prepends <|begin_of_text|> on every encode.
    core = HFCore(models.WordLevel({"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2, "a": 3, "b": 4},
                                   unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", 0)])
    assert core.encode("a b").ids == [0, 3, 4]  # the library alone adds BOS
    core.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.eod_id, tok.bos_id) == (1, 0)  # found by the common names
    assert tok.encode("a b") == [3, 4]
    assert tok.encode("a b", add_bos=True, append_eod=True) == [0, 3, 4, 1]


def _word_level(tmp_path, vocab, config=None, special_map=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    core = HFCore(models.WordLevel(vocab, unk_token="[UNK]"))
    core.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return tmp_path


def test_hf_eod_comes_from_the_config_first_then_common_names(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, "<END>": 2, "<|endoftext|>": 3}
    assert load_tokenizer(_word_level(tmp_path / "a", vocab)).eod_id == 3  # <|endoftext|> before </s>
    assert load_tokenizer(_word_level(tmp_path / "b", vocab, {"eos_token": "<END>"})).eod_id == 2
    # Older configs store AddedToken dicts; special_tokens_map.json is read too (the config wins).
    assert load_tokenizer(_word_level(tmp_path / "c", vocab, {"eos_token": {"content": "</s>"}})).eod_id == 1
    assert load_tokenizer(_word_level(tmp_path / "d", vocab, None, {"eos_token": "<END>"})).eod_id == 2
    assert load_tokenizer(_word_level(tmp_path / "e", vocab, {"eos_token": "</s>"}, {"eos_token": "<END>"})).eod_id == 1


def test_hf_without_eod_is_an_error_that_says_how_to_add_one(tmp_path):
    d = _word_level(tmp_path / "a", {"[UNK]": 0, "a": 1})
    with pytest.raises(TokenizerError, match=r"no end-of-document token.*add_special_tokens") as e:
        load_tokenizer(d)
    assert str(d / "tokenizer.json") in str(e.value)
    d = _word_level(tmp_path / "b", {"[UNK]": 0, "a": 1}, {"eos_token": "<missing>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<missing>' is not a token"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not readable JSON"):
        load_tokenizer(d)


def test_sentencepiece_without_eos_is_an_error(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[0].split("\n")), model_prefix=str(tmp_path / "m"),
                                   vocab_size=100, eos_id=-1, minloglevel=2, num_threads=1)
    with pytest.raises(TokenizerError, match=r"m.model: .*no EOS piece.*Retrain"):
        load_tokenizer(tmp_path / "m.model")


def test_identity_is_stable_across_copies_and_saves_and_changes_with_the_files(tok, tmp_path):
    ident = tok.identity()
    assert set(ident) == {"type", "path", "sha256", "vocab_size", "eod_id", "bos_id", "whole_text"}
    assert ident["whole_text"] is True  # no truncation or padding configured here: nothing ignored
    assert ident["path"] == tok.path and os.path.isabs(tok.path)
    copy = shutil.copytree(tok.path, tmp_path / "copy")
    for f in Path(copy).iterdir():
        os.utime(f, (1, 1))  # mtimes must not matter
    copied = load_tokenizer(copy).identity()
    assert copied["sha256"] == ident["sha256"] and copied["path"] == str(Path(copy).resolve())
    tok.save(tmp_path / "saved")
    saved = load_tokenizer(tmp_path / "saved")
    assert saved.identity()["sha256"] == ident["sha256"]
    assert saved.encode(TRICKY[3]) == tok.encode(TRICKY[3])
    # Change the defining file: one more special token (HF) / one flipped byte in a piece's score (SP).
    if tok.type == "huggingface":
        core = HFCore.from_file(str(Path(copy) / "tokenizer.json"))
        core.add_special_tokens(["<|new|>"])
        core.save(str(Path(copy) / "tokenizer.json"))
    else:
        data = bytearray((Path(copy) / "tokenizer.model").read_bytes())
        data[-10] ^= 1
        (Path(copy) / "tokenizer.model").write_bytes(bytes(data))
    assert load_tokenizer(copy).identity()["sha256"] != ident["sha256"]


def test_hf_eod_choice_enters_the_hash(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, "<|endoftext|>": 2}
    a = load_tokenizer(_word_level(tmp_path / "a", vocab))
    b = load_tokenizer(_word_level(tmp_path / "b", vocab, {"eos_token": "</s>"}))
    assert (a.eod_id, b.eod_id) == (2, 1) and a.identity()["sha256"] != b.identity()["sha256"]
    b.save(tmp_path / "c")  # the saved config names the same EOD, so the copy hashes the same
    c = load_tokenizer(tmp_path / "c")
    assert c.eod_id == 1 and c.identity()["sha256"] == b.identity()["sha256"]
    assert json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_vocab_size_covers_added_tokens(tmp_path):
    core = HFCore(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    core.add_special_tokens(["<|endoftext|>", "<x>"])
    core.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 4 and tok.eod_id == 2


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="id -1"):
        tok.decode([-1])


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'nope'}: no such tokenizer"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: a tokenizer directory must hold tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match=r"vocab.txt: not a tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"\x00not a model")
    with pytest.raises(TokenizerError, match=r"bad.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_training_into_an_existing_directory_replaces_the_other_type(tmp_path):
    out = tmp_path / "tok"
    train_bpe_tokenizer(CORPUS[:10], out, vocab_size=300)
    assert load_tokenizer(out).type == "huggingface"
    assert train_sentencepiece_tokenizer(CORPUS[:10], out, vocab_size=500, threads=1).type == "sentencepiece"
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left
    # And back: the SentencePiece files go, a file of the user's in the directory stays.
    (out / "notes.txt").write_text("mine")
    assert train_bpe_tokenizer(CORPUS[:10], out, vocab_size=300).type == "huggingface"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in [*tmp_path.iterdir(), *out.iterdir()] if p.name.startswith(".")]
    with pytest.raises(TokenizerError, match="below the 256 byte symbols"):
        train_bpe_tokenizer(CORPUS[:1], tmp_path / "small", vocab_size=200)
    with pytest.raises(TokenizerError, match="SentencePiece training failed"):
        train_sentencepiece_tokenizer(["tiny text"], tmp_path / "sp", vocab_size=5000, threads=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored(tmp_path):
    # A BERT-style tokenizer.json saved with truncation to 16 and fixed padding to 16 (issue 10): every encode
    # path must give the whole text's ids, neither cut nor padded, equal to an independent whole-text encode.
    from bert_tokenizer import MAX_LENGTH, reference_ids, write_bert_tokenizer

    directory = write_bert_tokenizer(tmp_path / "bert")
    tok = load_tokenizer(directory)
    texts = ["x", CORPUS[1][:2000], "two words", CORPUS[2][:500]]
    refs = [reference_ids(directory, t) for t in texts]
    assert len(refs[0]) == 1 and len(refs[1]) > 10 * MAX_LENGTH  # one short text and one long one
    assert [tok.encode(t) for t in texts] == refs
    assert tok.encode_batch(texts, append_eod=True) == [r + [tok.eod_id] for r in refs]
    flat, lengths = tok.encode_batch_array(texts, append_eod=True, dtype=np.uint16)
    assert lengths.tolist() == [len(r) + 1 for r in refs]
    assert flat.tolist() == [i for r in refs for i in r + [tok.eod_id]]
    # The identity says the texts are whole and which settings of the file were switched off.
    ident = tok.identity()
    assert ident["whole_text"] is True
    assert ident["ignored_from_file"]["truncation"]["max_length"] == MAX_LENGTH
    assert ident["ignored_from_file"]["padding"]["length"] == MAX_LENGTH
    # save() keeps the file's bytes (same hash); the copy loads with the same whole-text behaviour.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.identity()["sha256"] == ident["sha256"] and again.encode(texts[1]) == refs[1]
