"""An offline stand-in for an LLM endpoint: an OpenAI-compatible server that answers the EntiGraph and rephrase
prompts by extracting from the document in the prompt. It is not a language model and writes no new insight; it
lets the recipe run end to end where no endpoint is reachable (CI, a laptop without a GPU), through exactly the
same HTTP client, retries, work dir and ledger as a real endpoint.

    python examples/entigraph/offline_llm.py [--port 0]      # prints its base URL, serves until killed

How it answers (deterministically, so reruns give the same corpus): it recognises which of the current prompt
templates (megasynth/synth/llm/prompts) a request was rendered from and recovers the title and the document;
 - entities: {"summary": the first sentences, "entities": dotted identifiers (json.dumps) and capitalised
   names, most frequent first};
 - an entity, a pair or a triple: a short passage joining the document's sentences that mention them;
 - a rephrase: the document's sentences in the requested style (plain, encyclopedic, question-answer),
   rotated by the request's `seed` so that several samples of one document differ.
A request it does not recognise gets HTTP 400. Usage is counted as ceil(characters / 4) tokens per side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megasynth.synth.llm.prompts import CURRENT, load_prompt  # noqa: E402

MAX_ENTITIES = 12
_IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*")
_STOP = {"The", "A", "An", "This", "That", "These", "Those", "It", "If", "In", "On", "For", "When", "Return",
         "Returns", "Note", "See", "Use", "And", "But", "Or", "Otherwise", "Each", "Any", "All", "With", "As",
         "None", "True", "False"}
_PAIR_LEADS = ("In {title}, {names} are connected.", "{title} links {names}.",
               "How do {names} relate in {title}?")


def _template_regex(template: str) -> re.Pattern:
    """A regex matching `template` rendered with any values; a placeholder's first use captures it, later uses
    must repeat the same text."""
    parts, used, pos = [], set(), 0
    for match in string.Template.pattern.finditer(template):
        parts.append(re.escape(template[pos:match.start()]))
        name = match.group("named") or match.group("braced")
        if name is None:  # "$$": a literal dollar
            parts.append(re.escape("$"))
        elif name in used:
            parts.append(f"(?P={name})")
        else:
            used.add(name)
            parts.append(f"(?P<{name}>.*?)")
        pos = match.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts), re.DOTALL)


_TEMPLATES = None
_TEMPLATES_LOCK = threading.Lock()


def _templates() -> list[tuple[str, re.Pattern]]:
    global _TEMPLATES
    with _TEMPLATES_LOCK:
        if _TEMPLATES is None:
            _TEMPLATES = [(name, _template_regex(load_prompt(name).user)) for name in CURRENT]
    return _TEMPLATES


def recognise(user: str) -> tuple[str, dict]:
    """(template name, placeholder values) of a rendered user message; ValueError when none matches."""
    for name, regex in _templates():
        match = regex.fullmatch(user)
        if match:
            return name, match.groupdict()
    raise ValueError("the request matches none of the current prompt templates")


def sentences(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line) if s.strip()]
    return out


def entities(title: str, text: str) -> list[str]:
    counts: dict[str, list[int]] = {}
    # A capitalised word counts as a name only inside a sentence: at a sentence start it is just capitalised.
    names = [m for m in _NAME.finditer(text) if re.search(r"[a-z,;]\s*$", text[max(0, m.start() - 3):m.start()])]
    for i, match in enumerate([*_IDENTIFIER.finditer(text), *names]):
        name = match.group(0).rstrip(".")
        if name in _STOP or len(name) < 3 or name in title:
            continue
        entry = counts.setdefault(name, [0, i])
        entry[0] += 1
    return sorted(counts, key=lambda n: (-counts[n][0], counts[n][1]))[:MAX_ENTITIES]


def _pick(options: tuple[str, ...], *keys: str) -> str:
    return options[int(hashlib.sha256("\0".join(keys).encode()).hexdigest(), 16) % len(options)]


def relation(title: str, text: str, names: list[str]) -> str:
    sents = sentences(text)
    lead = _pick(_PAIR_LEADS, title, *names).format(title=f'"{title}"', names=" and ".join(names))
    body = []
    for name in names:
        mentions = [s for s in sents if name.lower() in s.lower() and s not in body]
        body += mentions[:2] or [f"{name} is named in {title}."]
    return " ".join([lead, *body])


def rephrase(style: str, title: str, text: str, sample: int = 0) -> str:
    sents = sentences(text)
    if sample and sents:  # another sample of the same (document, style): the sentences from another start
        k = sample % len(sents)
        sents = sents[k:] + sents[:k]
    if style == "rephrase_qa":
        return "\n\n".join(f"Question: What does {title} say about {' '.join(s.split()[:4]).rstrip(':,.')}?\n"
                           f"Answer: {s}" for s in sents if s != title)
    if style == "rephrase_encyclopedic":
        return f"{title}.\n\n" + " ".join(sents)
    return " ".join(sents)


def reply(body: dict) -> str:
    """The reply text for one chat-completion request body (ValueError for an unrecognised request)."""
    messages = body.get("messages") or []
    user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
    if not isinstance(user, str):
        raise ValueError("no user message")
    name, values = recognise(user)
    title, text = values["title"], values["text"]
    if name == "entigraph_entities":
        return json.dumps({"summary": " ".join(sentences(text)[:2]), "entities": entities(title, text)})
    if name in ("entigraph_entity", "entigraph_pair", "entigraph_triple"):
        names = [values[k] for k in ("entity", "entity_a", "entity_b", "entity_c") if k in values]
        return relation(title, text, names)
    seed = body.get("seed")
    return rephrase(name, title, text, seed if isinstance(seed, int) else 0)


# -- the HTTP side --------------------------------------------------------------------------------------------------
def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the client's ledger is the record
        pass

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "offline-extractive", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._send(400, {"error": {"message": "the body is not JSON", "type": "invalid_request_error"}})
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        try:
            text = reply(body)
        except ValueError as e:
            return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
        prompt = sum(_tokens(str(m.get("content") or "")) for m in body.get("messages", []))
        completion = _tokens(text)
        self._send(200, {"id": "offline", "object": "chat.completion", "created": int(time.time()),
                         "model": body.get("model", "offline-extractive"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    args = parser.parse_args(argv)
    _templates()  # fail before serving if a template cannot be read
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}/v1", flush=True)  # the recipe reads the URL from this line
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
