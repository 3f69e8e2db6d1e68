"""megasynth.data.sft: every record format round-trips through a real trained tokenizer into a loss-masked prefix
(targets decode to exactly the answer as tokenized, plus its end-of-turn token or EOD; the context to the rest),
with the built-in template and with a jinja chat_template; truncation keeps the mask aligned."""

import json

import numpy as np
import pytest

from megasynth.chat import IM_END, IM_START, PAIR_SEPARATOR, TRAINING_SPECIAL_TOKENS
from megasynth.data.indexed import IndexedDataset
from megasynth.data.readers import BadInputError
from megasynth.data.sft import (
    SftEncoder,
    SftOptions,
    detect_format,
    preprocess_sft,
    resolve_format,
)
from megasynth.tokenizer import (
    HF_CONFIG,
    SP_FILE,
    load_tokenizer,
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
)

CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is two plus two? It is four.",
          "def f(x):\n    return x + 1\n", "Ünïcödé text, émojis 🎉 and tabs\tare fine.",
          "Summarise the paragraph in one sentence."] * 5
EOD = "<|endoftext|>"

PROMPT_RESPONSE = [{"prompt": "What is two plus two?", "response": "It is four."},
                   {"prompt": "Write f.", "response": "def f(x):\n    return x + 1\n", "id": 7},
                   {"prompt": "Say it with ünïcödé", "response": "🎉 Ünïcödé!"}]
ALPACA = [{"instruction": "Summarise the paragraph.", "input": "The quick brown fox jumps.", "output": "A fox jumps."},
          {"instruction": "Name a dog.", "input": "", "output": "Rex"},
          {"instruction": "Name a cat.", "output": "Tom"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4, it is four."}]},
        {"messages": [{"role": "user", "content": "Only one turn"}, {"role": "assistant", "content": "Fine.\n"},
                      {"role": "user", "content": "a trailing question stays context"}]}]
PAIR = [{"source": "The quick brown fox jumps over the lazy dog.", "target": "A lazy dog lies under a fox."},
        {"source": "def f(x): return x", "target": "def g(y):\n    return f(y) + 1"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe_tokenizer(CORPUS, out, vocab_size=420, special_tokens=list(TRAINING_SPECIAL_TOKENS))
    return out


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A real SentencePiece unigram model with the default dummy prefix (every encoded text opens with "\u2581")."""
    out = tmp_path_factory.mktemp("tok") / "sp"
    train_sentencepiece_tokenizer(CORPUS, out, vocab_size=320, special_tokens=list(TRAINING_SPECIAL_TOKENS), threads=1)
    return out


def continuation_encoder(tok_dir):
    """Tokens of a text that continues another: plain encode for the byte-level BPE; for SentencePiece the same
    model with its dummy prefix switched off in the model proto (independent of megasynth's anchor trick)."""
    tok = load_tokenizer(tok_dir)
    if tok.type != "sentencepiece":
        return tok.encode
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tok_dir / SP_FILE).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return lambda text: sp.encode(text)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chatml(messages):
    """[(text, is_target)] of a conversation in ChatML, written out independently of megasynth.chat."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out += [(f"{IM_START}assistant\n", False), (m["content"] + IM_END, True), ("\n", False)]
        else:
            out.append((f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n", False))
    return out


def expected_pieces(fmt, record):
    if fmt == "pair":
        return [(record["source"] + PAIR_SEPARATOR, False), (record["target"] + EOD, True)]
    if fmt == "prompt_response":
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    elif fmt == "alpaca":
        prompt = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = record["messages"]
    return chatml(messages) + [(EOD, False)]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("fmt, records", [("prompt_response", PROMPT_RESPONSE), ("alpaca", ALPACA), ("chat", CHAT),
                                          ("pair", PAIR)])
def test_round_trip_every_format(tmp_path, tok_dir, sp_dir, kind, fmt, records):
    tok_dir = {"bpe": tok_dir, "sp": sp_dir}[kind]
    tok, continued = load_tokenizer(tok_dir), continuation_encoder(tok_dir)
    eod_text = tok.decode([tok.eod_id])  # SentencePiece's </s> is a control id: it decodes to ""
    src = write_jsonl(tmp_path / "in.jsonl", records)
    summary = preprocess_sft([src], tmp_path / "out" / "p", tok_dir, workers=0, progress=False)
    assert summary["format"] == fmt and summary["records"] == len(records)
    ds = IndexedDataset(tmp_path / "out" / "p")
    assert ds.has_loss_mask and len(ds) == len(records)
    total_targets = 0
    for i, record in enumerate(records):
        tokens, mask = ds[i].astype(np.int64), ds.loss_mask(i)
        pieces = [(text.replace(EOD, eod_text), target) for text, target in expected_pieces(fmt, record)]
        # targets: each answer tokenized as the text it continues, with its end-of-turn token (EOD for pairs)
        want_targets = [t for text, target in pieces if target for t in continued(text.removesuffix(eod_text))]
        if fmt == "pair":
            want_targets.append(tok.eod_id)
        assert tokens[mask].tolist() == want_targets
        assert tok.decode(tokens[mask]) == "".join(text for text, target in pieces if target)
        # context: everything else, in order
        assert tok.decode(tokens[~mask]) == "".join(text for text, target in pieces if not target)
        # and the record is the whole text tokenized at once (a SentencePiece record opens with its "\u2581")
        assert tokens[:-1].tolist() == tok.encode("".join(text for text, _ in pieces).removesuffix(eod_text))
        assert tokens[-1] == tok.eod_id
        total_targets += int(mask.sum())
    assert summary["target_tokens"] == total_targets == ds.metadata["stats"]["target_tokens"]
    sft = ds.metadata["sft"]
    assert sft["format"] == fmt and ds.metadata["created_by"] == "preprocess_sft"
    if fmt == "pair":
        assert sft["pair_separator"] == {"text": PAIR_SEPARATOR, "id": tok.encode(PAIR_SEPARATOR)[-1]}
    else:
        assert sft["template"]["name"] == "builtin-chatml" and sft["template"]["special_tokens"] == [IM_START, IM_END]


QWEN_LIKE = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
             "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def with_template(tok_dir, out, template):
    """A copy of the tokenizer whose tokenizer_config.json carries `template` (a SentencePiece one gets a config
    beside its model: that is where the loader looks for a chat_template)."""
    load_tokenizer(tok_dir).save(out)
    config = json.loads((out / HF_CONFIG).read_text()) if (out / HF_CONFIG).exists() else {}
    (out / HF_CONFIG).write_text(json.dumps({**config, "chat_template": template}))
    return out


def test_jinja_chat_template_from_the_tokenizer(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    with_template(tok_dir, tmp_path / "tok", QWEN_LIKE)
    src = write_jsonl(tmp_path / "in.jsonl", PROMPT_RESPONSE)
    preprocess_sft([src], tmp_path / "p", tmp_path / "tok", workers=0, progress=False)
    ds = IndexedDataset(tmp_path / "p")
    for i, record in enumerate(PROMPT_RESPONSE):
        tokens, mask = ds[i], ds.loss_mask(i)
        assert tok.decode(tokens[mask]) == record["response"] + IM_END
        assert tok.decode(tokens[~mask]) == (f"{IM_START}system\nYou are helpful.{IM_END}\n{IM_START}user\n"
                                             f"{record['prompt']}{IM_END}\n{IM_START}assistant\n\n{EOD}")
    template = ds.metadata["sft"]["template"]
    assert template["name"] == "tokenizer" and template["text"] == QWEN_LIKE and template["end_of_turn"] == IM_END


def test_truncate_keeps_the_mask_aligned_and_refuses_records_left_without_targets(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    long_answer = "The quick brown fox jumps over the lazy dog. " * 8
    records = [{"prompt": "Hi", "response": long_answer}, {"prompt": "Hi", "response": "Hello"}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    n_prompt = len(tok.encode(f"{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"))
    max_len = n_prompt + 10
    with pytest.raises(BadInputError, match=r"in.jsonl:1: .*more than --max-len"):
        preprocess_sft([src], tmp_path / "refused", tok_dir, max_len=max_len, workers=0, progress=False)
    summary = preprocess_sft([src], tmp_path / "p", tok_dir, max_len=max_len, truncate=True, workers=0, progress=False)
    assert summary["truncated"] == 1 and summary["records"] == 2
    ds = IndexedDataset(tmp_path / "p")
    tokens, mask = ds[0].astype(np.int64), ds.loss_mask(0)
    assert len(tokens) == max_len and tokens[-1] == tok.eod_id and not mask[-1]  # the cut text never "ends"
    assert tokens[mask].tolist() == tok.encode(long_answer)[:max_len - 1 - n_prompt]
    assert not mask[:n_prompt].any() and mask[n_prompt:max_len - 1].all()
    with pytest.raises(BadInputError, match=r"in.jsonl:1: no target token left"):
        preprocess_sft([src], tmp_path / "none", tok_dir, max_len=n_prompt, truncate=True, workers=0, progress=False)


@pytest.mark.parametrize("template", [None, QWEN_LIKE])
def test_records_the_tokens_would_not_reproduce_are_refused(tmp_path, tok_dir, template):
    # After the template's "\n", leading spaces merge with it when the whole text is tokenized: no token boundary
    # falls where the answer starts, on the whole-text path (built-in) and on the pieces path (jinja) alike.
    if template:
        tok_dir = with_template(tok_dir, tmp_path / "tok", template)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "response": "   indented"},
                                              {"prompt": "q", "response": "fine"}])
    with pytest.raises(BadInputError, match=r"in.jsonl:1: tokenizing the record in one go puts no token boundary"):
        preprocess_sft([src], tmp_path / "p", tok_dir, workers=0, progress=False)
    summary = preprocess_sft([src], tmp_path / "p", tok_dir, workers=0, progress=False, skip_bad=True)
    assert summary["records"] == 1 and summary["skipped_bad"] == 1
    ds = IndexedDataset(tmp_path / "p")
    assert load_tokenizer(tok_dir).decode(ds[0][ds.loss_mask(0)]) == "fine" + IM_END


def test_sentencepiece_with_a_jinja_template(sp_dir):
    # The pieces path: each piece that continues a record is tokenized without the dummy-prefix space. (Only a
    # Hugging Face directory carries a chat_template on disk; the SentencePiece tokenizer is given one here.)
    tok, continued = load_tokenizer(sp_dir), continuation_encoder(sp_dir)
    tok.chat_template = QWEN_LIKE
    encoder = SftEncoder(tok, SftOptions("prompt_response"), np.uint16)
    assert not encoder.whole and encoder.lead == tok.encode(IM_END)[:-1] != []
    records = [encoder.convert(record, "") for record in PROMPT_RESPONSE]
    for record, (runs, flags, problem) in zip(PROMPT_RESPONSE, encoder.encode_records(records)):
        assert problem is None
        tokens = [t for run in runs for t in run]
        targets = [t for run, flag in zip(runs, flags) if flag for t in run]
        assert targets == continued(record["response"] + IM_END)
        context = (f"{IM_START}system\nYou are helpful.{IM_END}\n{IM_START}user\n{record['prompt']}{IM_END}\n"
                   f"{IM_START}assistant\n")
        assert tokens == tok.encode(context + record["response"] + IM_END + "\n") + [tok.eod_id]


def test_format_detection(tmp_path):
    assert [detect_format(r) for r in (PROMPT_RESPONSE[0], ALPACA[0], CHAT[0], PAIR[0], {"text": "x"})] == [
        "prompt_response", "alpaca", "chat", "pair", None]
    src = tmp_path / "in.jsonl"
    src.write_text("\nnot json\n" + json.dumps(ALPACA[0]) + "\n")
    with pytest.raises(BadInputError, match=r"in.jsonl:2: invalid JSON"):
        resolve_format([src])
    assert resolve_format([src], skip_bad=True) == ("alpaca", f"{src}:3")
    write_jsonl(src, [{"text": "plain"}])
    with pytest.raises(BadInputError, match=r"in.jsonl:1: cannot tell the record format .*'text'"):
        resolve_format([src])
