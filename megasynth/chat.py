"""Chat templates: conversations -> text, with the assistant spans found (docs/sft.md, "How it works").

    template = load_chat_template(tokenizer)       # the tokenizer's own jinja2 template, else the built-in one
    template.render(messages, add_generation_prompt=True)   # the prompt generate.py --chat feeds the model
    template.segments(messages)                   # [(text, is_target), ...] that concatenate to the rendering
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
PAIR_SEPARATOR = "<|sep|>"  # between source and target of a pair record (megasynth.data.sft)
# What tools/train_tokenizer.py --chat-tokens adds: the built-in template's tokens and the pair separator.
TRAINING_SPECIAL_TOKENS = (*CHAT_TOKENS, PAIR_SEPARATOR)
BUILTIN_NAME = "builtin-chatml"
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PROBE_USER, _PROBE_ANSWER = "PROBEQUESTION", "PROBEANSWER"


class ChatTemplateError(ValueError):
    """A template that cannot be used (does not compile, ignores add_generation_prompt, lacks its tokens)."""


class ConversationError(ValueError):
    """One conversation the template cannot render or split into spans; the caller adds FILE:LINE."""


def _compile(text: str):
    """The template compiled in transformers' environment (chat_template_utils._compile_jinja_template)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        # transformers' {% generation %} marks assistant text for its own mask; here it only renders its body,
        # so templates that use it compile (we find the spans by rendering prefixes instead).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


@dataclass
class ChatTemplate:
    """A chat template bound to a tokenizer's special-token strings; docs/sft.md has how it works."""

    text: str  # the jinja2 source
    name: str  # BUILTIN_NAME, or "tokenizer" for a tokenizer's own template
    variables: dict = field(default_factory=dict)  # bos_token, eos_token, ... as the template sees them
    special_tokens: tuple[str, ...] = ()  # strings that must be single tokens (checked by load_chat_template)
    end_of_turn: str = ""  # what the template writes after an assistant message's content (stripped)
    end_of_turn_id: int | None = None  # its id when it is one token (generation stops there), set by the loader
    _compiled: object = field(default=None, repr=False)
    _base: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self._compiled = _compile(self.text)
        self.builtin = self.text == BUILTIN_TEMPLATE
        self.end_of_turn = IM_END if self.builtin else self._probe_end_of_turn()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        """What a dataset's sidecar records about the template (docs/format.md)."""
        return {"name": self.name, "sha256": self.sha256, "text": self.text,
                "special_tokens": list(self.special_tokens), "end_of_turn": self.end_of_turn,
                "end_of_turn_id": self.end_of_turn_id}

    # -- rendering ------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        import jinja2

        compiled = self._compiled
        if self._base is None:  # the template's globals and our variables, merged once
            self._base = {**compiled.globals, **self.variables}
        try:
            # Template.render(**variables) with the merge of its globals (a ChainMap, slow to copy) done once:
            # jinja's documented new_context(shared=True) takes the variables as they are. Same output.
            context = compiled.new_context({**self._base, "messages": messages,
                                            "add_generation_prompt": add_generation_prompt}, shared=True)
            return compiled.environment.concat(compiled.root_render_func(context))
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a template bug
            raise ConversationError(f"the chat template refuses this conversation: {e}") from e
        except (TypeError, KeyError, AttributeError) as e:
            raise ConversationError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from e

    def user_prompt(self, text: str) -> str:
        """The text a model continues to answer one user message (the generation prompt included): how
        generate.py --chat and eval.py --chat ask."""
        return self.render([{"role": "user", "content": text}], add_generation_prompt=True)

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Alternating (text, is_target) pieces whose concatenation is render(messages); the targets are the
        assistant turns (content and end-of-turn marker). The messages must have been checked by check_messages."""
        if self.builtin:
            return _chatml_segments(messages)
        full = self.render(messages)
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])  # a last answer: one render less
            if not upto.startswith(before) or not full.startswith(upto) or len(before) < pos:
                raise ConversationError(
                    f"the chat template renders the turns before assistant message {i + 1} differently depending on "
                    "what follows, so its span cannot be located (the model would train on text it never sees at "
                    "inference)")
            end = len(upto.rstrip())
            if not upto[:end].endswith(self.end_of_turn) or end <= len(before):
                raise ConversationError(f"the chat template renders assistant message {i + 1} without its "
                                        f"end-of-turn marker {self.end_of_turn!r}")
            out += [(full[pos:len(before)], False), (full[len(before):end], True)]
            pos = end
        out.append((full[pos:], False))
        return [(text, target) for text, target in out if text]

    def _probe_end_of_turn(self) -> str:
        """What follows an assistant message's content; also checks the template's prefix behaviour once."""
        user = {"role": "user", "content": _PROBE_USER}
        answer = {"role": "assistant", "content": _PROBE_ANSWER}
        try:
            with_prompt = self.render([user], add_generation_prompt=True)
            without = self.render([user])
            upto = self.render([user, answer])
        except ConversationError as e:
            raise ChatTemplateError(f"the chat template cannot render a user/assistant exchange: {e}") from None
        if with_prompt == without:
            raise ChatTemplateError("the chat template ignores add_generation_prompt, so the assistant header "
                                    "cannot be told from the answer")
        if not upto.startswith(with_prompt) or _PROBE_ANSWER not in upto[len(with_prompt):]:
            raise ChatTemplateError("the chat template's generation prompt is not how it starts an assistant turn "
                                    "(rendering [user] + generation prompt is not a prefix of [user, assistant])")
        tail = upto[len(with_prompt):]
        marker = tail[tail.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):].strip()
        if not marker:
            raise ChatTemplateError("the chat template writes nothing after an assistant message: a model trained "
                                    "on it would never learn to end its turn")
        return marker


def _chatml_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """BUILTIN_TEMPLATE's segments by string concatenation (the jinja path gives the same; tests check it)."""
    out: list[tuple[str, bool]] = []
    context: list[str] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            context.append(f"{IM_START}assistant\n")
            out.append(("".join(context), False))
            out.append((content + IM_END, True))
            context = ["\n"]
        else:
            context.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if context:
        out.append(("".join(context), False))
    return out


def check_messages(messages) -> str | None:
    """What is wrong with an OpenAI-style message list, or None: a non-empty list of {"role", "content"} with
    roles from ROLES, string contents, at least one assistant message and no empty assistant content."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    has_answer = False
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {n} is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {n} has role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            what = "missing" if "content" not in m else f"a {type(content).__name__}, not a string"
            return f"message {n} ({role}): 'content' is {what}"
        if role == "assistant":
            if not content.strip():
                return f"message {n} (assistant) has an empty content: nothing to learn"
            has_answer = True
    if not has_answer:
        return "the conversation has no assistant message: nothing to learn"
    return None


def load_chat_template(tokenizer) -> ChatTemplate:
    """The tokenizer's own template when it carries one, else the built-in ChatML template; either way its
    special tokens are checked to be single tokens of this tokenizer (ChatTemplateError otherwise)."""
    own = getattr(tokenizer, "chat_template", None)
    variables = dict(getattr(tokenizer, "template_tokens", {}) or {})
    if own is None or own == BUILTIN_TEMPLATE:
        template = ChatTemplate(BUILTIN_TEMPLATE, BUILTIN_NAME, variables, CHAT_TOKENS)
    else:
        # The special-token strings the template can emit: those whose variable name or text it mentions.
        used = tuple(dict.fromkeys(v for k, v in variables.items() if isinstance(v, str) and v and (k in own or v in own)))
        template = ChatTemplate(own, "tokenizer", variables, used)
    missing = [t for t in template.special_tokens if special_token_id(tokenizer, t) is None]
    if missing:
        where = "the built-in chat template" if template.builtin else "the tokenizer's chat template"
        raise ChatTemplateError(
            f"{tokenizer.path}: {where} needs {', '.join(missing)} as single tokens, and this tokenizer splits them. "
            "Train one with tools/train_tokenizer.py --chat-tokens, or add them as special tokens, or give the "
            "tokenizer a chat_template in tokenizer_config.json")
    template.end_of_turn_id = special_token_id(tokenizer, template.end_of_turn)
    return template


def special_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer keeps it as one token wherever it stands, else None.

    A SentencePiece model with its default dummy prefix opens every text with a "▁" token, so
    encode("<|im_end|>") is two ids although the marker is one token; what counts is that the text ends in one
    id and that writing it twice adds exactly that id once more (a text the tokenizer merges or splits fails)."""
    ids = tokenizer.encode(text) if text else []
    return ids[-1] if ids and tokenizer.encode(text + text) == [*ids, ids[-1]] else None


def text_start_ids(tokenizer, marker: str) -> list[int]:
    """The ids the tokenizer puts in front of every text (SentencePiece's dummy-prefix "▁"; none for a
    byte-level BPE), found from `marker`, a text special_token_id() accepts."""
    return tokenizer.encode(marker)[:-1]
