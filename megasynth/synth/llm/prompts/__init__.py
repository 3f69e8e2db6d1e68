"""Versioned prompt templates (NAME.vN.txt in this folder) for the synthetic-data pipelines.

    prompt = load_prompt("entigraph_pair")                 # Prompt(name, version, system, user, sha256)
    messages = prompt.messages(title=..., text=..., entity_a=..., entity_b=...)
    prompts_hash([prompt, ...])                            # recorded in the work dir and the output sidecar

The file format, versioning and what the hash covers: docs/synth.md, "Prompts"."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent

# Each template: the version the pipelines use now (bump it when adding NAME.v(N+1).txt), and the placeholders it
# must use, exactly these, so that a typo in a template fails at load, not mid-run.
TEMPLATES = {
    "entigraph_entities": (1, {"title", "text"}),
    "entigraph_pair": (1, {"title", "text", "entity_a", "entity_b"}),
    "entigraph_triple": (1, {"title", "text", "entity_a", "entity_b", "entity_c"}),
    "entigraph_entity": (1, {"title", "text", "entity"}),
    "rephrase_plain": (1, {"title", "text"}),
    "rephrase_encyclopedic": (1, {"title", "text"}),
    "rephrase_qa": (1, {"title", "text"}),
    "quality_judge": (1, {"text"}),
}
CURRENT = {name: version for name, (version, _) in TEMPLATES.items()}
PLACEHOLDERS = {name: names for name, (_, names) in TEMPLATES.items()}

_SECTIONS = ("system", "user")


class PromptError(ValueError):
    """A template file that is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    system: str
    user: str
    sha256: str  # of the file's bytes

    def messages(self, **values: str) -> list[dict]:
        """Chat messages with every placeholder filled; a missing or unexpected value is a KeyError."""
        expected = PLACEHOLDERS[self.name]
        if set(values) != expected:
            raise KeyError(f"prompt {self.name}: expected values for {sorted(expected)}, got {sorted(values)}")
        return [{"role": "system", "content": string.Template(self.system).substitute(values)},
                {"role": "user", "content": string.Template(self.user).substitute(values)}]

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def load_prompt(name: str, version: int | None = None) -> Prompt:
    """The template NAME at `version` (default: CURRENT[name]), parsed and checked."""
    if name not in CURRENT:
        raise PromptError(f"unknown prompt {name!r}; known: {', '.join(sorted(CURRENT))}")
    version = CURRENT[name] if version is None else version
    path = PROMPT_DIR / f"{name}.v{version}.txt"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptError(f"{path}: cannot read the prompt template ({e.strerror or e})") from None
    sections = _parse(path, raw.decode("utf-8"))
    used: dict[str, set[str]] = {}
    for section in _SECTIONS:
        used[section] = _placeholders(path, section, sections[section])
        unknown = used[section] - PLACEHOLDERS[name]
        if unknown:
            raise PromptError(f"{path}: the {section} section uses unknown placeholders {sorted(unknown)}; "
                              f"allowed: {sorted(PLACEHOLDERS[name])}")
    missing = PLACEHOLDERS[name] - used["user"] - used["system"]
    if missing:
        raise PromptError(f"{path}: the template never uses {sorted(missing)}")
    return Prompt(name, version, sections["system"], sections["user"], hashlib.sha256(raw).hexdigest())


def prompts_hash(prompts) -> str:
    """sha256 over (name, version, file sha256) of the given prompts, in name order."""
    digest = hashlib.sha256()
    for p in sorted(prompts, key=lambda p: (p.name, p.version)):
        digest.update(f"{p.name}\0{p.version}\0{p.sha256}\n".encode())
    return digest.hexdigest()


def _parse(path: Path, text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line_no, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith("===") and stripped.endswith("===") and len(stripped) > 6:
            current = stripped.strip("=").strip()
            if current not in _SECTIONS:
                raise PromptError(f"{path}:{line_no}: unknown section {current!r}; expected {_SECTIONS}")
            if current in sections:
                raise PromptError(f"{path}:{line_no}: section {current!r} appears twice")
            sections[current] = []
        elif current is None:
            if stripped and not stripped.startswith("#"):
                raise PromptError(f"{path}:{line_no}: text before the first section (only '#' comments may "
                                  "come first)")
        else:
            sections[current].append(line)
    missing = [s for s in _SECTIONS if s not in sections]
    if missing:
        raise PromptError(f"{path}: missing section(s) {missing}")
    out = {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}
    for name, body in out.items():
        if not body.strip():
            raise PromptError(f"{path}: the {name} section is empty")
    return out


def _placeholders(path: Path, section: str, body: str) -> set[str]:
    names = set()
    for match in string.Template.pattern.finditer(body):
        if match.group("invalid") is not None:
            raise PromptError(f"{path}: the {section} section has a stray '$' (write '$$' for a literal dollar)")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names
