"""The README documents every config key and every command."""

import dataclasses
from pathlib import Path

from lora_cli.config import SECTIONS, TOP_KEYS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [k for k in TOP_KEYS if f"`{k}`" not in README]
    for section, cls in SECTIONS.items():
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f"`{section}.{f.name}`" not in README]
    assert missing == []


def test_every_command_is_documented():

    from lora_cli.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names and all(f"`lora {n}" in README for n in names)
