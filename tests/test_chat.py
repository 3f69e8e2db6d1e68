"""megasynth.chat: the built-in template and a tokenizer's jinja2 chat_template render as transformers renders
them (transformers' apply_chat_template is the reference), assistant spans are found, bad templates refused."""

import json

import pytest

from megasynth.chat import (
    BUILTIN_NAME,
    BUILTIN_TEMPLATE,
    IM_END,
    TRAINING_SPECIAL_TOKENS,
    ChatTemplate,
    ChatTemplateError,
    ConversationError,
    check_messages,
    load_chat_template,
    special_token_id,
    text_start_ids,
)
from megasynth.tokenizer import HF_CONFIG, load_tokenizer, train_bpe_tokenizer, train_sentencepiece_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is two plus two? It is four.",
          "def f(x):\n    return x + 1\n", "Answer briefly, please.", "Hello there! How are you?"] * 4

# Qwen2.5's chat template without its tool-calling branches: a default system message, ChatML turns.
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama 3's shape: a BOS from the bos_token variable, trimmed contents, <|eot_id|> ends every turn.
LLAMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                  "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"},
     {"role": "assistant", "content": " Fine,\nthanks. "}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe_tokenizer(CORPUS, out, vocab_size=400, special_tokens=[*TRAINING_SPECIAL_TOKENS, *LLAMA_TOKENS])
    return out


def with_template(tok_dir, tmp_path, template, **config_extra):
    """A copy of the tokenizer whose tokenizer_config.json carries `template`."""
    tok = load_tokenizer(tok_dir)
    tok.save(tmp_path)
    config = json.loads((tmp_path / HF_CONFIG).read_text())
    config.update(chat_template=template, **config_extra)
    (tmp_path / HF_CONFIG).write_text(json.dumps(config))
    return load_tokenizer(tmp_path)


def hf_render(path, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_builtin_template_without_one_in_the_tokenizer(tok_dir):
    template = load_chat_template(load_tokenizer(tok_dir))
    assert template.name == BUILTIN_NAME and template.builtin
    assert template.end_of_turn == IM_END and template.end_of_turn_id == load_tokenizer(tok_dir).encode(IM_END)[0]
    assert template.user_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_builtin_fast_path_equals_its_jinja_rendering(tok_dir, messages):
    fast = load_chat_template(load_tokenizer(tok_dir))
    slow = ChatTemplate(BUILTIN_TEMPLATE, "slow")
    slow.builtin = False  # force the jinja path: render prefixes, find the spans
    assert fast.segments(messages) == slow.segments(messages)
    assert "".join(t for t, _ in fast.segments(messages)) == slow.render(messages)
    targets = [t for t, is_target in fast.segments(messages) if is_target]
    assert targets == [m["content"] + IM_END for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("template", [BUILTIN_TEMPLATE, QWEN_TEMPLATE, LLAMA_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_matches_transformers(tok_dir, tmp_path, template, messages):
    tok = with_template(tok_dir, tmp_path, template, bos_token="<|begin_of_text|>")
    ours = load_chat_template(tok)
    for gen in (False, True):
        assert ours.render(messages, add_generation_prompt=gen) == hf_render(tmp_path, messages, gen)
    # the segments tile the rendering and their targets are the rendered assistant turns with their marker
    assert "".join(t for t, _ in ours.segments(messages)) == hf_render(tmp_path, messages, False)


def test_jinja_spans_follow_the_template(tok_dir, tmp_path):
    qwen = load_chat_template(with_template(tok_dir, tmp_path / "q", QWEN_TEMPLATE))
    assert qwen.name == "tokenizer" and qwen.end_of_turn == IM_END
    segments = qwen.segments(CONVERSATIONS[0])
    assert segments[0] == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False)
    assert segments[1:] == [("4.<|im_end|>", True), ("\n", False)]
    llama = load_chat_template(with_template(tok_dir, tmp_path / "l", LLAMA_TEMPLATE, bos_token="<|begin_of_text|>"))
    assert llama.end_of_turn == "<|eot_id|>" and llama.end_of_turn_id is not None
    targets = [t for t, is_target in llama.segments(CONVERSATIONS[1]) if is_target]
    assert targets == ["Hello!<|eot_id|>", "Fine,\nthanks.<|eot_id|>"]  # the template trims contents
    assert llama.segments(CONVERSATIONS[0])[0][0].startswith("<|begin_of_text|><|start_header_id|>user")


def test_a_template_that_rewrites_earlier_turns_is_refused_per_conversation(tok_dir, tmp_path):
    # Like "thinking" templates: the last assistant turn is rendered differently from earlier ones.
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                "{% if loop.last and m['role'] == 'assistant' %}{{ 'LAST ' }}{% endif %}"
                "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\nLAST ' }}{% endif %}")
    ours = load_chat_template(with_template(tok_dir, tmp_path, template))
    assert [t for t, target in ours.segments(CONVERSATIONS[0]) if target] == ["4.<|im_end|>"]
    with pytest.raises(ConversationError, match="differently depending on what follows"):
        ours.segments(CONVERSATIONS[1])


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}", "ignores add_generation_prompt"),
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}A:{% endif %}{{ m['content'] }}{% endfor %}"
     "{% if add_generation_prompt %}A:{% endif %}",
     "writes nothing after an assistant message"),
    ("{% for m in messages %}{{ m['content'] ", "does not compile"),
])
def test_unusable_templates_are_refused(tok_dir, tmp_path, template, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        load_chat_template(with_template(tok_dir, tmp_path, template))


def test_raise_exception_in_a_template_names_the_problem(tok_dir, tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations start with a user') }}{% endif %}"
                + BUILTIN_TEMPLATE)
    ours = load_chat_template(with_template(tok_dir, tmp_path, template))
    with pytest.raises(ConversationError, match="conversations start with a user"):
        ours.segments(CONVERSATIONS[1])


def test_builtin_template_needs_its_tokens(tmp_path):
    plain = train_bpe_tokenizer(CORPUS, tmp_path / "plain", vocab_size=300)
    with pytest.raises(ChatTemplateError, match="--chat-tokens"):
        load_chat_template(plain)


def test_special_tokens_of_a_sentencepiece_model_with_a_dummy_prefix(tmp_path):
    # Every encoded text opens with "\u2581", so <|im_end|> encodes to two ids and is still one token.
    sp = train_sentencepiece_tokenizer(CORPUS, tmp_path / "sp", vocab_size=310,
                                       special_tokens=list(TRAINING_SPECIAL_TOKENS), threads=1)
    ids = sp.encode(IM_END)
    assert len(ids) == 2 and sp.decode(ids[:1]) == "" and special_token_id(sp, IM_END) == ids[1]
    assert text_start_ids(sp, IM_END) == ids[:1]
    assert special_token_id(sp, "fox") is None  # several tokens
    template = load_chat_template(sp)
    assert template.builtin and template.end_of_turn_id == ids[1]
    bpe = train_bpe_tokenizer(CORPUS, tmp_path / "bpe", vocab_size=300, special_tokens=list(TRAINING_SPECIAL_TOKENS))
    assert text_start_ids(bpe, IM_END) == [] and special_token_id(bpe, IM_END) == bpe.encode(IM_END)[0]


def test_tokenizer_reads_the_template_from_a_jinja_file_and_keeps_it_on_save(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template is None and tok.template_tokens["eos_token"] == "<|endoftext|>"
    tok.save(tmp_path / "a")
    (tmp_path / "a" / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    loaded = load_tokenizer(tmp_path / "a")
    assert loaded.chat_template == QWEN_TEMPLATE
    loaded.save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").chat_template == QWEN_TEMPLATE


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "q"}], "no assistant message"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty content"),
    ([{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}], "list, not a string"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "'content' is missing"),
])
def test_check_messages_names_the_problem(messages, problem):
    assert problem in check_messages(messages)


def test_generate_chat_formats_prompts_with_the_template_and_stops_at_end_of_turn(tmp_path):
    from helpers import load_tool

    from megasynth.checkpoint import save_model_checkpoint
    from megasynth.config import ModelConfig
    from megasynth.generate import sample_without_cache
    from megasynth.hf import config_for_model
    from megasynth.model import build_model

    tok = train_bpe_tokenizer(CORPUS, tmp_path / "tokenizer", vocab_size=300, special_tokens=list(TRAINING_SPECIAL_TOKENS))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=64, rope_theta=10000.0, init_std=0.3)
    model = build_model(cfg, "cpu", seed=1)
    save_model_checkpoint(model, config_for_model(cfg), tmp_path / "checkpoints" / "step_00000001", meta={"step": 1})
    out = tmp_path / "out.jsonl"
    args = ["--checkpoint", str(tmp_path), "--prompt", "Hi", "What is two plus two?", "--output", str(out),
            "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3", "--chat"]
    assert load_tool("generate").main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    end = tok.encode(IM_END)[0]
    for i, (line, prompt) in enumerate(zip(lines, ["Hi", "What is two plus two?"])):
        ids = tok.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")  # no start token
        ref = sample_without_cache(model.eval(), [ids], max_new_tokens=8, temperature=1.0, top_k=0, eod_id=end,
                                   seed=3, row_ids=[i])[0]
        ended = ref[-1] == end
        assert line["finish_reason"] == ("eod" if ended else "length")
        assert line["text"] == tok.decode(ref[:-1] if ended else ref)
