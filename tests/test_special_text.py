"""Issue 19, case 14: text from data or an LLM is tokenised as text. The literal strings of special tokens
("<|endoftext|>", "<|im_end|>", "<|sep|>", "[SEP]", "</s>") never become special ids, whatever the tokenizer kind
(a byte-level BPE with added special tokens, a WordPiece file, SentencePiece with control and user-defined
symbols), and so a document's only EOD is the one the pipeline appends: preprocess_data, an LLM reply written by
rephrase (through the local scripted server), a synthesize --endpoint reply, and SFT content (refused, while the
chat template's own markers stay special ids). Ordinary text gets the same ids as before."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from bert_tokenizer import SPECIALS as BERT_SPECIALS
from bert_tokenizer import write_bert_tokenizer
from sbp_helpers import CORPUS_TEXTS
from synth.openai_server import TEST_API_KEY_ENV

from megasynth.chat import IM_START, TRAINING_SPECIAL_TOKENS
from megasynth.data.indexed import IndexedDataset
from megasynth.data.preprocess import preprocess
from megasynth.data.readers import BadInputError
from megasynth.data.sft import preprocess_sft
from megasynth.data.stdlib_corpus import iter_stdlib_documents
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer, train_sentencepiece_tokenizer

LITERALS = "a <|endoftext|> b<|im_end|>\n<|im_start|>user <|sep|>[SEP] [CLS] </s><s> end"


def stdlib(n: int) -> list[str]:
    out = []
    for _, text in iter_stdlib_documents():
        out.append(text)
        if len(out) == n:
            return out
    return out


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    texts = stdlib(60)
    return {
        "bpe": train_bpe_tokenizer(texts, d / "bpe", vocab_size=500, special_tokens=TRAINING_SPECIAL_TOKENS),
        "sp": train_sentencepiece_tokenizer(texts, d / "sp", vocab_size=500, special_tokens=TRAINING_SPECIAL_TOKENS,
                                            threads=1),
        "wordpiece": load_tokenizer(write_bert_tokenizer(d / "bert")),
    }


def special_ids(tok) -> set[int]:
    """Every id a text must not produce: EOD, BOS and the ids of the strings the tokenizer treats as special."""
    ids = {tok.eod_id, *([tok.bos_id] if tok.bos_id is not None else [])}
    return ids | {tok.encode(s)[-1] for s in tok.special_texts}


def test_special_texts_per_tokenizer_kind(toks):
    assert set(toks["bpe"].special_texts) == {"<|endoftext|>", *TRAINING_SPECIAL_TOKENS}
    # SentencePiece: the chat tokens are user-defined pieces (a text would produce them); <s> and </s> are
    # control pieces, which no text produces in the first place.
    assert set(toks["sp"].special_texts) == set(TRAINING_SPECIAL_TOKENS)
    assert set(toks["wordpiece"].special_texts) == set(BERT_SPECIALS)


@pytest.mark.parametrize("kind", ["bpe", "sp", "wordpiece"])
def test_literal_special_strings_are_text(toks, kind):
    tok = toks[kind]
    parsed = tok.encode(LITERALS)
    as_text = tok.encode(LITERALS, parse_special=False)
    banned = special_ids(tok)
    assert set(parsed) & banned  # the default (templates) still parses them ...
    assert not set(as_text) & banned  # ... text never does
    assert tok.encode_batch([LITERALS], parse_special=False, append_eod=True) == [[*as_text, tok.eod_id]]
    flat, lengths = tok.encode_batch_array([LITERALS, "x"], parse_special=False)
    assert flat[:lengths[0]].tolist() == as_text
    if kind != "wordpiece":  # WordPiece lowercases and respaces: not lossless to begin with
        assert tok.decode(as_text) == LITERALS


@pytest.mark.parametrize("kind", ["bpe", "sp", "wordpiece"])
def test_ordinary_text_gets_the_same_ids(toks, kind):
    tok = toks[kind]
    texts = stdlib(120)
    assert tok.encode_batch(texts, parse_special=False) == tok.encode_batch(texts)
    a, la = tok.encode_batch_array(texts, parse_special=False, append_eod=True, dtype=np.uint16)
    b, lb = tok.encode_batch_array(texts, append_eod=True, dtype=np.uint16)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_preprocess_gives_one_eod_per_document(toks, tmp_path, kind):
    tok = toks[kind]
    texts = [LITERALS, "plain text", f"ends with {tok.decode([tok.eod_id])}", "<|endoftext|><|endoftext|>"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(src)], tmp_path / "out", tok.path, workers=0, progress=False)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        doc = ds[i].tolist()
        assert doc.count(tok.eod_id) == 1 and doc[-1] == tok.eod_id
        assert not set(doc[:-1]) & special_ids(tok)
        assert tok.decode(doc[:-1]) == text


def test_rephrase_reply_holding_eod_text_is_one_document(tmp_path, openai_server):
    from megasynth.synth.llm import LLMSettings  # noqa: PLC0415
    from megasynth.synth.rephrase import RephraseConfig, run_rephrase  # noqa: PLC0415

    tok = train_bpe_tokenizer(CORPUS_TEXTS * 4, tmp_path / "tok", vocab_size=300)
    openai_server.reply = lambda body: "Retold.<|endoftext|>And more <|endoftext|> after it."
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": t}) + "\n"
                            for i, t in enumerate(CORPUS_TEXTS[:3])))
    llm = LLMSettings(base_url=openai_server.base_url, model="test-model", api_key_env=TEST_API_KEY_ENV,
                      concurrency=2, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=10)
    run_rephrase(RephraseConfig(input=str(docs), work_dir=str(tmp_path / "W"), output_prefix=str(tmp_path / "rp"),
                                tokenizer=str(tmp_path / "tok"), llm=llm, progress=False, styles=["plain"]))
    ds = IndexedDataset(str(tmp_path / "rp"))
    assert len(ds) == 3
    for i in range(len(ds)):
        doc = ds[i].tolist()
        assert doc.count(tok.eod_id) == 1 and doc[-1] == tok.eod_id  # only the appended EOD
        assert tok.decode(doc[:-1]) == "Retold.<|endoftext|>And more <|endoftext|> after it."


def test_endpoint_reply_holding_eod_text_is_not_cut(toks):
    from megasynth.synth.llm import LLMSettings  # noqa: PLC0415
    from megasynth.synth.sbp.samplers import EndpointSampler, Sampling  # noqa: PLC0415

    tok = toks["bpe"]
    sampler = EndpointSampler(LLMSettings("http://unused", "m"), tok, Sampling(0, 1.0, 0, 1.0, 64), "ledger")
    reply = "first part <|endoftext|> second part"
    ids, ended = sampler._document(SimpleNamespace(ok=True, text=reply, finish_reason="stop"), 0)
    assert ended and tok.eod_id not in ids and tok.decode(ids) == reply


def test_sft_content_never_produces_special_ids(toks, tmp_path):
    tok = toks["bpe"]
    good = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]}
    bad = {"messages": [{"role": "user", "content": "What does <|sep|> mean?"},  # not a marker of the template
                        {"role": "assistant", "content": "A separator."}]}
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadInputError, match=r"chat\.jsonl:2: .*'<\|sep\|>', a special token of the tokenizer"):
        preprocess_sft([str(src)], tmp_path / "sft", tok.path, workers=0, progress=False)
    summary = preprocess_sft([str(src)], tmp_path / "sft", tok.path, skip_bad=True, workers=0, progress=False)
    assert summary["records"] == 1 and summary["skipped_bad"] == 1
    doc = IndexedDataset(str(tmp_path / "sft"))[0].tolist()
    # The template's markers are still special ids: two <|im_start|>, two <|im_end|>, one EOD.
    im_start, sep = tok.encode(IM_START)[0], tok.encode("<|sep|>")[0]
    assert doc.count(im_start) == 2 and doc.count(tok.eod_id) == 1 and sep not in doc
