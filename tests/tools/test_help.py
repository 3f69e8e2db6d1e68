"""Every tool's --help explains every flag: each argument of each tools/*.py parser has a help text of its own
(a flag added without one is a defect a user meets as a bare name in --help)."""

from __future__ import annotations

import argparse

import pytest

from helpers import TOOLS, load_tool

TOOL_NAMES = sorted(p.stem for p in TOOLS.glob("*.py") if not p.name.startswith("_"))


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser tools/NAME.py builds, caught where it prints its help (main(["--help"]) runs as a user's would)."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def record(self, file=None):
        seen.append(self)
        original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as exit_info:
        load_tool(name).main(["--help"])
    assert exit_info.value.code in (0, None)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_every_flag_has_its_own_help(name, monkeypatch, capsys):
    parser = _parser_of(name, monkeypatch)
    text = capsys.readouterr().out
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert actions, f"{name}: no arguments"
    for action in actions:
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS, f"{name}: {label} has no help text"
        words = action.help.replace("%(default)s", "").split()
        assert len(words) >= 2, f"{name}: {label}'s help {action.help!r} explains nothing"
        for flag in action.option_strings:
            assert flag in text, f"{name}: {flag} missing from --help"
