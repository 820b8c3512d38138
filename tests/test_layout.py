"""The layout promises: one import namespace, the import rules of ARCHITECTURE.md, no cycles, one owner per contract word."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package -> source folder, as pyproject's package-dir maps them.
FOLDERS = {
    "lstm_onnx": ROOT / "lstm_onnx",
    "lstm_onnx.model": ROOT / "model",
    "lstm_onnx.export": ROOT / "export",
    "lstm_onnx.server": ROOT / "server",
    "lstm_onnx.protos": ROOT / "protos",
}
BARE = ("model", "export", "server", "protos")
SCRIPT = Path(sys.executable).with_name("lstm-onnx")


def _modules() -> dict[str, Path]:
    """Every module of the namespace -> its file."""
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(name.startswith(other + ".") or name == other for other in FOLDERS if other != package
                   and other.startswith(package + ".")):
                continue  # lstm_onnx/ holds no model/ etc., but be exact anyway
            found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            # `from . import codec` imports the submodule lstm_onnx.x.codec when there is one.
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


MODULES = _modules()
OURS = set(MODULES)


def _our_imports(name: str) -> set[str]:
    return {m for m in _imports(name, MODULES[name]) if m in OURS and m != name}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# package -> (forbidden third-party top-level modules, forbidden packages of ours)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "lstm_onnx.export.audit": ({"torch", "onnxruntime"}, {"lstm_onnx.model", "lstm_onnx.server", "lstm_onnx.client",
                                                           "lstm_onnx.export.onnx_export", "lstm_onnx.export.parity",
                                                           "lstm_onnx.export.repository",
                                                           "lstm_onnx.export.verification", "lstm_onnx.export.cli"}),
    "lstm_onnx.server": ({"torch"}, {"lstm_onnx.model", "lstm_onnx.export", "lstm_onnx.client"}),
    "lstm_onnx.client": ({"torch", "onnx"}, {"lstm_onnx.server", "lstm_onnx.model", "lstm_onnx.export"}),
    "lstm_onnx.protocol": ({"torch", "onnx", "onnxruntime"}, {"lstm_onnx.server", "lstm_onnx.client",
                                                               "lstm_onnx.model", "lstm_onnx.export"}),
    "lstm_onnx.model": (set(), {"lstm_onnx.export", "lstm_onnx.server", "lstm_onnx.client"}),
    "lstm_onnx.export": (set(), {"lstm_onnx.server", "lstm_onnx.client"}),
    "lstm_onnx.contract": ({"torch", "onnx", "onnxruntime", "grpc"}, OURS - {"lstm_onnx.contract"}),
    "lstm_onnx.errors": ({"torch", "onnx", "onnxruntime", "grpc", "numpy"}, OURS - {"lstm_onnx.errors"}),
    "lstm_onnx.protos": ({"torch", "onnx", "onnxruntime", "numpy"}, OURS - {m for m in OURS
                                                                           if _under(m, "lstm_onnx.protos")}),
}


def test_import_rules_hold_for_every_module():
    broken: list[str] = []
    for name, path in sorted(MODULES.items()):
        imported = _imports(name, path)
        for package, (third_party, ours) in RULES.items():
            if not _under(name, package):
                continue
            for module in sorted(imported):
                if module.split(".")[0] in third_party:
                    broken.append(f"{name} imports {module} (forbidden in {package})")
                if any(_under(module, o) for o in ours) and not _under(module, package):
                    broken.append(f"{name} imports {module} (forbidden in {package})")
    assert not broken, "\n".join(broken)


def test_no_import_cycles():
    graph = {name: _our_imports(name) for name in MODULES}
    # A package's __init__ is imported before its submodules anyway; an edge to it is only a cycle if
    # the __init__ really imports back.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_every_package_says_what_it_owns_and_may_import():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and ("import" in doc), f"{name}: __init__.py needs a docstring saying what it may import"


def test_loading_every_module_imports_no_bare_package():
    code = (
        "import importlib, sys\n"
        f"names = {sorted(n for n in MODULES if not n.endswith('__main__') and not n.endswith('.generate'))!r}\n"
        "for n in names: importlib.import_module(n)\n"
        f"bare = sorted(m for m in sys.modules if m.split('.')[0] in {BARE!r})\n"
        "print(','.join(bare))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def _shadowing_folder(tmp_path: Path) -> Path:
    """A user's project: its own model.py, server.py and export.py, each of which would run `lstm-onnx train`
    (the chain of processes seen before the namespace) and leave a mark if it were ever imported."""
    folder = tmp_path / "user_project"
    folder.mkdir()
    for name in ("model", "server", "export", "protos"):
        (folder / f"{name}.py").write_text(
            "import pathlib, subprocess, sys\n"
            f"pathlib.Path(__file__).with_suffix('.imported').write_text('{name}')\n"
            "raise SystemExit('the user module was imported by lstm-onnx')\n")
    return folder


@pytest.mark.parametrize("how", ["script", "module"])
def test_cli_works_beside_a_users_model_server_and_export_py(tmp_path, how):
    folder = _shadowing_folder(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(folder))
    argv = [str(SCRIPT)] if how == "script" else [sys.executable, "-m", "lstm_onnx"]
    for command in (["serve", "--help"], ["train", "--help"], ["audit", "--help"], ["infer", "--help"]):
        proc = subprocess.run([*argv, *command], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: lstm-onnx " + command[0] in proc.stdout
    assert not list(folder.glob("*.imported"))


def test_notebook_beside_its_own_model_py_can_export(tmp_path, tiny_run_dir):
    folder = _shadowing_folder(tmp_path)
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from lstm_onnx.export.repository import export_to_repository\n"
            f"report = export_to_repository({str(tiny_run_dir)!r}, 'repo', name='m', version=1)\n"
            "print(report['parity']['passed'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=dict(os.environ, PYTHONPATH=str(folder)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"
    assert (folder / "repo" / "m" / "1" / "model.onnx").is_file()
    assert not list(folder.glob("*.imported"))


def test_wheel_holds_only_the_namespace(tmp_path):
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    try:
        import setuptools  # noqa: F401  (the venv's own: no download for an isolated build)

        args.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    build = tmp_path / "build"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build"))
    args[-1] = str(build)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lstm_onnx"}
    for expected in ("lstm_onnx/cli.py", "lstm_onnx/model/train.py", "lstm_onnx/export/audit/graph.py",
                     "lstm_onnx/server/app.py", "lstm_onnx/protos/grpc_service_pb2.py",
                     "lstm_onnx/protos/grpc_service.proto", "lstm_onnx/client/loadgen.py",
                     "lstm_onnx/protocol/codec.py"):
        assert expected in names, expected


def test_a_missing_package_is_named_not_dropped(monkeypatch, capsys):
    from lstm_onnx import cli

    monkeypatch.setitem(cli.COMMANDS, "serve", "lstm_onnx.not_installed")
    assert cli.main(["serve", "--model-repository", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks the package behind `serve`" in err[0] and "lstm_onnx.not_installed" in err[0]


def test_a_missing_extra_ends_in_one_line_with_the_install_hint(tmp_path):
    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    proc = subprocess.run([sys.executable, "-m", "lstm_onnx", "train", "--output", str(tmp_path / "run"), "--dry-run"],
                          env=dict(os.environ, PYTHONPATH=str(blocker.parent)), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "lstm-onnx train: needs 'torch', which is not installed: pip install 'lstm-onnx[train]'"


def test_version_flag_prints_the_version():
    import lstm_onnx

    proc = subprocess.run([sys.executable, "-m", "lstm_onnx", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lstm-onnx {lstm_onnx.__version__}"
    assert lstm_onnx.__version__ != "0+unknown"


# --- one owner per contract word -------------------------------------------------------------------------

# Literals that define the contract's vocabulary: only lstm_onnx/contract.py may spell them.
CONTRACT_WORDS = (
    '"lstm_onnx.contract"', '"model.safetensors"', '"init.safetensors"', '"config.json"', '"metrics.json"',
    '"lstm-onnx-run/1"', '"lstm-onnx/1"', '("LSTM", "GRU")', '("input", "forget", "cell", "output")',
    '("input", "output", "forget", "cell")', '("reset", "update", "hidden")', '("update", "reset", "hidden")',
)


def test_contract_words_are_defined_once():
    owner = ROOT / "lstm_onnx" / "contract.py"
    twice: list[str] = []
    for name, path in MODULES.items():
        if path == owner or name.startswith("lstm_onnx.protos"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for word in CONTRACT_WORDS:
                if word in code and not code.lstrip().startswith(('"""', "f\"", "raise", "audit.add")):
                    twice.append(f"{path.relative_to(ROOT)}:{number}: {word}")
    # The audit's display order happens to spell GRU's ONNX order; it is a separate choice (how people ask).
    twice = [t for t in twice if "DISPLAY_ORDER" not in t and "export/audit/gates.py" not in t]
    assert not twice, "\n".join(twice)


def test_contract_module_agrees_with_docs_contract_md():
    from lstm_onnx import contract

    doc = (ROOT / "docs" / "contract.md").read_text()
    for name in contract.RUN_FILES:
        assert f"`{name}`" in doc, name
    assert f"`{contract.METADATA_KEY}`" in doc
    assert f'"format": "{contract.CONTRACT_FORMAT}"' in doc
    assert f'"format": "{contract.RUN_FORMAT}"' in doc
    letters = {"input": "i", "output": "o", "forget": "f", "cell": "c", "update": "z", "reset": "r", "hidden": "h"}
    torch_letters = {("LSTM", "cell"): "g", ("GRU", "hidden"): "n"}
    for op, order in contract.ONNX_GATE_ORDER.items():
        assert f"{op} `{', '.join(letters[g] for g in order)}`" in doc, op
    for op, order in contract.PYTORCH_GATE_ORDER.items():
        spelled = ", ".join(torch_letters.get((op, g), letters[g]) for g in order)
        assert spelled in doc, (op, spelled)
    assert contract.RECURRENT_OPS == ("LSTM", "GRU") and "`LSTM`/`GRU`" in doc


def test_both_sides_use_the_contract_orders():
    """The torch side's weight report and the audit's gate splitting read the same order tables."""

    from lstm_onnx import contract
    from lstm_onnx.export.audit import gates
    from lstm_onnx.model.config import ModelConfig
    from lstm_onnx.model.network import StackedRNN
    from lstm_onnx.model.report import weight_change_rows

    assert gates.ONNX_ORDER is contract.ONNX_GATE_ORDER
    assert gates.PYTORCH_ORDER is contract.PYTORCH_GATE_ORDER
    for cell in ("lstm", "gru"):
        config = ModelConfig(cell=cell, input_size=1, hidden_size=2, num_layers=1, num_outputs=2)
        state = {k: v.clone() for k, v in StackedRNN(config).state_dict().items()}
        rows = weight_change_rows(state, state, config)
        order = [r["gate"] for r in rows if r["tensor"] == "rnn.weight_ih_l0"]
        assert tuple(order) == contract.PYTORCH_GATE_ORDER[contract.CELL_OPS[cell]]
