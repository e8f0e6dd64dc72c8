"""Package layering and docstring references: `data` never imports `models`, and every dotted
reference to the project's code in a docstring names something that exists."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGES = ("config", "data", "models", "train")
REFERENCE = re.compile(r"`((?:%s)(?:\.[A-Za-z_]\w*)+)(?:\(\))?`" % "|".join(PACKAGES))


def test_data_does_not_import_models() -> None:
    code = "import sys, data; print(sorted(m for m in sys.modules if m == 'models' or m.startswith('models.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def code_references(text: str) -> list[str]:
    """Backticked `package.module...` names; `data.batch_size`-like config keys (no such module) are skipped."""
    refs = []
    for match in REFERENCE.finditer(text):
        parts = match.group(1).split(".")
        if (REPO / parts[0] / f"{parts[1]}.py").is_file() or (REPO / parts[0] / parts[1]).is_dir():
            refs.append(match.group(1))
    return refs


def resolves(reference: str) -> bool:
    parts = reference.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_docstring_references_resolve() -> None:
    broken = []
    for path in sorted(p for root in (*PACKAGES, "scripts") for p in (REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                broken += [f"{path.relative_to(REPO)}: {r}" for r in code_references(ast.get_docstring(node) or "")
                           if not resolves(r)]
    assert not broken, broken
