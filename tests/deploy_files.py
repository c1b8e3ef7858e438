"""Reading the deployment files the way their tools do, for test_deploy and test_kubernetes:
the Dockerfile's instructions, the README's shell blocks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
LOCK, BUILD_LOCK = ROOT / "requirements.lock", ROOT / "requirements-build.lock"
Doc = dict[str, Any]
Instructions = list[tuple[str, str]]


def instructions(text: str) -> Instructions:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: Instructions = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, args = (pending + stripped).partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    return out


def dockerfile() -> Instructions:
    return instructions((ROOT / "Dockerfile").read_text())


def final_stage(instrs: Instructions) -> Instructions:
    last_from = max(i for i, (word, _) in enumerate(instrs) if word == "FROM")
    return instrs[last_from:]


def only(instrs: Instructions, word: str) -> str:
    found = [args for w, args in instrs if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## ``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command of the ```sh blocks, continuation lines joined, comments dropped."""
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands
