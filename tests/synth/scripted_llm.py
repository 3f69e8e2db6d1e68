"""Scripted EntiGraph / rephrase replies for the local test server (tests/synth/openai_server.py).

    llm = ScriptedLLM()                 # openai_server.reply = llm
    llm.malformed.add("Salt Roads")     # that document's entity replies are never valid JSON
    request_id(recorded.json)           # ("The Lighthouse", "pair", ("Mara", "Storm Bay")): what a request asked

The replies are a pure function of the request, so two runs over the same documents get the same texts.
"""

from __future__ import annotations

import json
import re

DOCS = [
    {"id": "b1", "title": "The Lighthouse", "text": "Mara keeps the lamp of the lighthouse above Storm Bay. "
                                                    "The keeper before her vanished in a storm."},
    {"id": "b2", "title": "Salt Roads", "text": "Tomas leads the caravan that carries salt across the desert."},
    {"id": "b3", "title": "Quiet Orbit", "text": "Nothing happens for a long time, and then nothing again."},
]
# What the model "finds" per title: b1 has a case/space duplicate (4 entities after normalising), b3 none.
ENTITIES = {"The Lighthouse": ["Mara", "the keeper", "Storm  Bay", "the lamp", " mara "],
            "Salt Roads": ["Tomas", "salt", "the caravan"],
            "Quiet Orbit": []}
NORMALISED = {"The Lighthouse": ["Mara", "the keeper", "Storm Bay", "the lamp"],
              "Salt Roads": ["Tomas", "salt", "the caravan"], "Quiet Orbit": []}


def first_user(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def request_id(body: dict) -> tuple:
    """(title, step, entities) of an EntiGraph request; (title, "rephrase", style) of a rephrase request."""
    user = first_user(body)
    title = re.search(r"^Title: (.*)$", user, re.MULTILINE).group(1)
    if '"entities"' in user:
        return title, "entities", ()
    entity = re.search(r"^Entity: (.*)$", user, re.MULTILINE)
    if entity:
        return title, "entity", (entity.group(1),)
    ents = tuple(re.findall(r"^\d\. (.*)$", user, re.MULTILINE))
    if ents:
        return title, "pair" if len(ents) == 2 else "triple", ents
    style = "qa" if "Question:" in user else "encyclopedic" if "encyclopedia" in user else "plain"
    return title, "rephrase", style


class ScriptedLLM:
    def __init__(self):
        self.malformed: set[str] = set()  # titles whose entity replies are broken JSON

    def __call__(self, body: dict) -> str:
        title, step, what = request_id(body)
        if step == "entities":
            if title in self.malformed:
                return '{"summary": "cut off'
            reply = json.dumps({"summary": f"A summary of {title}.", "entities": ENTITIES[title]})
            return "```json\n" + reply + "\n```"  # fenced, as chat models often answer
        if step == "entity":
            return f"Q: What is {what[0]} in {title}?\nA: {what[0]} is part of {title}."
        if step == "rephrase":
            return f"[{what} {body.get('seed')}] {title} retold: " + first_user(body).rsplit("\n\n", 1)[-1]
        return f"In {title}, " + " and ".join(what) + " are connected."
