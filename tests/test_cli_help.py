"""Every option of every command-line tool says what it does, and the usage line shows how to call the tool.

Each tool's parser is captured as it is about to parse (no tool runs); sub-commands are checked too.
"""
from __future__ import annotations

import argparse
import importlib

import pytest

# module -> function that builds the parser and parses argv
CLIS = {
    "finetune.run": "parse_args",
    "finetune.predict": "parse_args",
    "finetune.preflight": "main",
    "pretrain.preflight": "parse_args",
    "finetune.demo": "main",
    "finetune.plots": "main",
    "data_curation.build_ct3m": "parse_args",
    "pretrain.train.__main__": "parse_args",
    "pretrain.pipeline": "parse_args",
    "pretrain.submit": "parse_args",
    "pretrain.visualize.cli": "main",
    "pretrain.models.export": "main",
    "pretrain.models.summary": "main",
}
PROG_OVERRIDE_OK = {"data_curation.build_ct3m", "finetune.predict"}  # named by their file path (README) or meddino-*


class _Captured(Exception):
    pass


def _parser(module: str, fn: str, monkeypatch) -> argparse.ArgumentParser:
    captured: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured):
        getattr(importlib.import_module(module), fn)([])
    return captured[0]


def _undocumented(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sub_parser in action.choices.items():
                missing += _undocumented(sub_parser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("module", sorted(CLIS))
def test_every_option_has_help_and_usage_shows_the_call(module, monkeypatch):
    parser = _parser(module, CLIS[module], monkeypatch)
    assert _undocumented(parser, module) == []
    if module not in PROG_OVERRIDE_OK:
        assert parser.prog.startswith(("python -m ", "meddino-")), parser.prog
