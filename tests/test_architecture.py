"""The package's layers (README "Architecture"): the import graph of lora_cli, read with `ast` from every module
(imports inside functions included), has no cycle, and no module imports one of a higher layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_cli"

# Bottom to top; a module may import its own layer and the ones below. A package (e.g. lora_cli.data) places
# every module inside it.
LAYERS = {
    "foundation": ["errors", "jsonvalues", "fsutil", "runtime", "config"],
    "models": ["models", "tokenizer", "chat_template", "pretrained"],
    "lora": ["lora"],
    "adapters": ["adapter", "inference"],
    "data": ["data", "prompts"],
    "evaluation": ["loss", "generate", "metrics", "evaluation", "samples"],
    "training": ["train", "rundir", "distributed", "optim", "trackers"],
    "commands": ["evaluate", "merge", "predict", "info", "chat", "answer", "serve", "gguf_export"],
    "cli": ["cli", "__main__", "__init__"],
}
LEVEL = {name: i for i, names in enumerate(LAYERS.values()) for name in names}


def modules() -> dict[str, Path]:
    """Dotted name below lora_cli ("train", "data.io", a package's own name for its __init__) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the lora_cli modules it imports anywhere in its file."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                dotted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from lora_cli.data import io` imports the module lora_cli.data.io when there is one
                dotted = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[len("lora_cli."):] in mods
                          else node.module for a in node.names]
            else:
                continue
            for d in dotted:
                if d.startswith("lora_cli.") and d[len("lora_cli."):] in mods:
                    targets.add(d[len("lora_cli."):])
        graph[name] = targets - {name}
    return graph


def level(module: str) -> int:
    top = module.split(".")[0]
    assert top in LEVEL, f"lora_cli.{module} has no layer: add it to LAYERS in tests/test_architecture.py"
    return LEVEL[top]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "evaluation" in graph["train"] and "runtime" in graph["train"] and "rundir" in graph["train"]
    assert "evaluate" in graph["cli"]  # imports inside functions count


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_higher_layer():
    upward = [f"lora_cli.{m} ({level(m)}) imports lora_cli.{t} ({level(t)})"
              for m, targets in sorted(import_graph().items()) for t in sorted(targets) if level(t) > level(m)]
    assert upward == []


def test_cli_imports_nothing_heavy():
    """`lora --help` answers at once: the cli module imports no torch (the commands import it when they run)."""
    code = "import sys, lora_cli.cli; print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
