"""tools/generate.py end to end: a run directory in, JSONL out; equal to the no-cache reference; the distributed
path with 2 CPU ranks writes the same file; bad input exits 2 naming FILE:LINE."""

import json

import pytest
from dist import run_on_ranks
from helpers import load_tool

from megasynth.checkpoint import save_model_checkpoint
from megasynth.config import ModelConfig
from megasynth.generate import sample_without_cache
from megasynth.hf import config_for_model
from megasynth.model import build_model
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer

PROMPTS = ["Once upon a time", "The capital of", "x", "Two plus two is four and", "Hello"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN_DIR/checkpoints/step_00000007 (weights + config) and RUN_DIR/tokenizer, as the trainer lays them out."""
    root = tmp_path_factory.mktemp("run")
    tok = train_bpe_tokenizer(["Once upon a time there was a capital. Two plus two is four."] * 30,
                              root / "tokenizer", vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=64, rope_theta=10000.0, init_std=0.3)
    model = build_model(cfg, "cpu", seed=1)
    save_model_checkpoint(model, config_for_model(cfg), root / "checkpoints" / "step_00000007", meta={"step": 7})
    return root, model.eval(), tok


def write_prompts(path):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


ARGS = ["--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "40", "--seed", "11"]


def test_output_matches_the_reference_sampler(run_dir, tmp_path):
    root, model, tok = run_dir
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "p.jsonl")
    rc = load_tool("generate").main(["--checkpoint", str(root), "--prompts-file", str(prompts), "--output", str(out),
                                     "--batch-size", "2", *ARGS])
    assert rc == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["id"] for l in lines] == [f"p{i}" for i in range(5)] and [l["prompt"] for l in lines] == PROMPTS
    for i, line in enumerate(lines):
        ref = sample_without_cache(model, [[tok.eod_id] + tok.encode(PROMPTS[i])], max_new_tokens=6, temperature=1.0,
                                   top_k=40, eod_id=tok.eod_id, seed=11, row_ids=[i])[0]
        ended = ref[-1] == tok.eod_id
        assert line["num_tokens"] == len(ref) and line["finish_reason"] == ("eod" if ended else "length")
        assert line["text"] == tok.decode(ref[:-1] if ended else ref)


def generate_main(argv: list[str]) -> int:  # module-level: the ranks import it by name
    return load_tool("generate").main(argv)


def test_two_ranks_write_the_same_file(run_dir, tmp_path):
    root, _, _ = run_dir
    prompts = write_prompts(tmp_path / "p.jsonl")
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["--checkpoint", str(root), "--prompts-file", str(prompts), *ARGS]
    assert load_tool("generate").main([*common, "--output", str(single), "--batch-size", "4"]) == 0
    # Two processes with torchrun's variables (tests/dist.py); the tool makes the process group itself, as
    # under `torchrun --nproc_per_node=2 tools/generate.py ...` (the launcher itself would add seconds of
    # start-up per process and test nothing of the tool's).
    assert run_on_ranks(generate_main, 2, [*common, "--output", str(double), "--batch-size", "1"],
                        init_group=False, timeout=240) == [0, 0]
    assert double.read_text() == single.read_text()


def test_bad_input_exits_2_with_file_and_line(run_dir, tmp_path, capsys):
    root, _, _ = run_dir
    gen = load_tool("generate")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    assert gen.main(["--checkpoint", str(root), "--prompts-file", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert f'{bad}:2: field "prompt"' in capsys.readouterr().err
    assert gen.main(["--checkpoint", str(root), "--prompt", "hi", "--output", str(tmp_path / "o"),
                     "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's max_seq_len 64" in capsys.readouterr().err
    assert gen.main(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi", "--output", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prompts_are_not_truncated_or_padded_by_the_tokenizer_file(tmp_path):
    # A BERT-style tokenizer.json saved with truncation and padding to 16 (issue 10): the prompts must reach the
    # model whole, unpadded, so greedy output equals the reference sampler on an independent whole-text encode.
    from bert_tokenizer import MAX_LENGTH, reference_ids, write_bert_checkpoint

    ckpt, model = write_bert_checkpoint(tmp_path, max_seq_len=64)
    tok = load_tokenizer(ckpt / "tokenizer")
    prompts = ["x", "the list of items is returned in the order given by the key " * 2]
    refs = [reference_ids(ckpt / "tokenizer", p) for p in prompts]
    assert len(refs[0]) == 1 and MAX_LENGTH < len(refs[1]) < 64 - 8 - 1  # fits the model with 8 new tokens
    out = tmp_path / "out.jsonl"
    assert load_tool("generate").main(["--checkpoint", str(ckpt), "--output", str(out), "--max-new-tokens", "8",
                                       "--temperature", "0", "--prompt", *prompts]) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    for i, (line, ref) in enumerate(zip(lines, refs, strict=True)):
        expected = sample_without_cache(model, [[tok.eod_id] + ref], max_new_tokens=8, temperature=0.0,
                                        eod_id=tok.eod_id, seed=0, row_ids=[i])[0]
        ended = expected[-1] == tok.eod_id
        assert line["num_tokens"] == len(expected)
        assert line["text"] == tok.decode(expected[:-1] if ended else expected)


def test_prompt_flag_takes_several_values_and_may_repeat():
    parser = load_tool("generate").build_parser()
    args = parser.parse_args(["--checkpoint", "c", "--output", "o", "--prompt", "a", "b", "--prompt", "c"])
    assert args.prompt == ["a", "b", "c"]
