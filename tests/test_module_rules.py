"""Rooms that fit in a head, and command lines only where commands live, held for every module of the package:

- no module is longer than 400 lines, except the config schema (one dataclass per config group, every field with
  its docstring, read by key rather than top to bottom); the training loop's module stays under 250;
- only the application layer of tests/test_module_graph.py (``pard_train.__main__``, every ``__main__``, the thin
  top-level command modules) defines ``main`` or writes to the terminal (``print``, ``sys.stdout``/``sys.stderr``):
  library modules log through ``logging.getLogger(__name__)``, so the command decides where each line goes.
"""

from __future__ import annotations

import ast

from test_module_graph import _modules, layer

MAX_LINES = 400
LONGER = {"pard_train.base.config": "the typed config schema"}
LOOP, LOOP_MAX_LINES = "pard_train.training.train", 250

TERMINAL_HELPERS = {
    "pard_train.run.cli": "the command modules' own one-line error and exit code 2 (they call it)",
    "pard_train.run.logs": "the console handler every log line goes through (information: stdout, warnings: stderr)",
    "pard_train.vllm_env.worker": "a process vLLM's interpreter runs (VLLM_PYTHON .../worker.py), never imported",
}


def _line_counts() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in _modules().items()}


def _names(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def terminal_uses(tree: ast.AST) -> list[str]:
    """Where ``tree`` acts as a command line: a function named ``main`` at any depth, a call to ``print``, or a use
    of ``sys.stdout`` / ``sys.stderr``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "main":
            found.append(f"line {node.lineno}: def main")
        elif isinstance(node, ast.Call) and _names(node.func, "print"):
            found.append(f"line {node.lineno}: print(...)")
        elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and _names(node.value, "sys"):
            found.append(f"line {node.lineno}: sys.{node.attr}")
    return found


def test_no_module_is_longer_than_a_room():
    counts = _line_counts()
    assert LOOP in counts and set(LONGER) <= set(counts)  # the names are the package's
    too_long = {name: lines for name, lines in counts.items() if lines > MAX_LINES and name not in LONGER}
    assert too_long == {}, f"split these along their jobs: {too_long}"
    assert counts[LOOP] <= LOOP_MAX_LINES, f"{LOOP} has {counts[LOOP]} lines: move a job to its owner"


def test_only_command_modules_hold_a_main_or_write_to_the_terminal():
    offenders = {}
    for name, path in _modules().items():
        if layer(name)[0] == "application" or name in TERMINAL_HELPERS:
            continue
        uses = terminal_uses(ast.parse(path.read_text(), str(path)))
        if uses:
            offenders[name] = uses
    assert offenders == {}, f"log instead, and move main() to a command module: {offenders}"


def test_the_commands_are_in_the_application_layer():
    """Every public ``python -m`` command is a command module, so the rule above leaves it its ``main``."""
    commands = ["pard_train.__main__", "pard_train.export", "pard_train.derive", "pard_train.gguf"]
    commands += ["pard_train.teacher_cache", "pard_train.evaluate.__main__", "pard_train.evaluate.compare.__main__"]
    commands += ["pard_train.data.__main__"]
    modules = _modules()
    for name in commands:
        assert name in modules and layer(name)[0] == "application", name
        assert any("def main" in use for use in terminal_uses(ast.parse(modules[name].read_text()))), name


def test_the_checks_can_fail():
    """A made-up library module with a ``main`` that prints is caught, and so is one that writes to sys.stderr."""
    tree = ast.parse("import sys\ndef main():\n    print('x')\n    sys.stderr.write('y')\n")
    assert terminal_uses(tree) == ["line 2: def main", "line 3: print(...)", "line 4: sys.stderr"]
    assert terminal_uses(ast.parse("import logging\nlogging.getLogger(__name__).info('x')\n")) == []
