"""`make mutation`: mutmut over the critical modules, one module at a time with only the tests that cover it.

mutmut runs tests against a copy of the package in `mutants/`, found by import path; our folders map onto the
`lstm_onnx` namespace (setuptools package-dir), so the copy is staged in the installed layout first
(build/mutation/lstm_onnx/server/... for server/...). Usage: python tests/mutation/run.py [module ...] (default: all).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "build" / "mutation"
FOLDERS = {"model": "model", "export": "export", "server": "server", "protos": "protos"}  # pyproject package-dir
FAST = ["-p", "no:cacheprovider", "-x", "-q"]

# module (installed path) -> the tests that cover it, kept to those that run in seconds (no training fixtures).
MODULES: dict[str, list[str]] = {
    "lstm_onnx/protocol/errors.py": ["--noconftest", "tests/test_protocol_errors.py"],
    "lstm_onnx/export/audit/gates.py": [
        "--noconftest", "tests/test_audit_gates.py", "tests/test_audit.py", "tests/test_audit_foreign.py", "-k",
        "not exported and not plot and not missing_model and not runs_without_torch and not checkpoint "
        "and not untrained"],
    "lstm_onnx/protocol/codec.py": ["--noconftest", "tests/test_protocol_codec.py"],
    "lstm_onnx/server/sequences.py": ["--noconftest", "tests/test_server_sequence_store.py"],
    "lstm_onnx/server/batcher.py": ["--noconftest", "tests/test_batcher_lanes.py"],
    "lstm_onnx/server/model_file.py": ["--noconftest", "tests/test_model_file_checks.py"],
    "lstm_onnx/export/audit/external.py": ["--noconftest", "tests/test_external_data.py", "-k", "audit or external_reader"],
    "lstm_onnx/export/parity.py": ["--noconftest", "tests/test_parity_checks.py"],
}


def stage() -> None:
    """The source tree as it installs: lstm_onnx/ with each mapped folder inside it; tests and config beside."""
    shutil.rmtree(STAGE, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "lstm_onnx", STAGE / "lstm_onnx", ignore=ignore)
    for name, folder in FOLDERS.items():
        shutil.copytree(ROOT / folder, STAGE / "lstm_onnx" / name, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=ignore)


def run(module: str) -> str:
    """Mutate one module; mutmut's summary line for it."""
    args = MODULES[module]
    select = [a for a in args if a.startswith("tests/")]
    options = FAST + [a for a in args if a not in select]
    config = (ROOT / "pyproject.toml").read_text().split("[tool.mutmut]")[0]
    config += ("\n[tool.mutmut]\nsource_paths = [\"lstm_onnx\"]\n"
               f"only_mutate = [{module!r}]\n".replace("'", '"')
               + "pytest_add_cli_args_test_selection = [" + ", ".join(f'"{a}"' for a in select) + "]\n"
               + "pytest_add_cli_args = [" + ", ".join('"' + a.replace('"', '\\"') + '"' for a in options) + "]\n")
    (STAGE / "pyproject.toml").write_text(config)
    shutil.rmtree(STAGE / "mutants", ignore_errors=True)
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1"], cwd=STAGE,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=STAGE,
                             capture_output=True, text=True).stdout
    outcomes = re.findall(r"^\s*(\S+): (\w[\w ]*)$", results, re.M)
    killed = sum(1 for _, o in outcomes if o == "killed")
    survivors = [name for name, o in outcomes if o != "killed"]
    report = [f"{module}: {killed}/{len(outcomes)} killed in {time.monotonic() - began:.0f} s"]
    for name in survivors:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=STAGE, capture_output=True,
                              text=True).stdout
        changed = [line for line in diff.splitlines() if line[:2] in ("- ", "+ ")]
        report.append(f"  {name} ({dict(outcomes)[name]}): " + " | ".join(changed))
    return "\n".join(report)


def main(argv: list[str]) -> int:
    modules = argv or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}, expected some of {list(MODULES)}", file=sys.stderr)
        return 2
    stage()
    for module in modules:
        print(run(module), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
