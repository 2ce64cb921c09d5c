"""The console scripts pyproject.toml declares (installed by ``pip install .``) run: each target
answers ``--help`` in a fresh interpreter, ``python -m protozoo`` dispatches its sub-commands,
and a mistake is one line with status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 reads pyproject.toml itself

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

# What an installed script does -- sys.exit(<function>()) with sys.argv[1:] as its flags --
# for every script and flags, in one interpreter (importing torch once); prints JSON.
RUNNER = """
import contextlib, io, json, sys
from importlib import import_module
results = []
for name, target, flags in json.loads(sys.argv[1]):
    module, _, function = target.partition(":")
    sys.argv = [name, *flags]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = getattr(import_module(module), function)()
        except SystemExit as exc:
            code = exc.code
    results.append([name, flags, code, out.getvalue()])
print(json.dumps(results))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=300)


def test_every_console_script_answers_help_in_a_fresh_interpreter():
    assert set(SCRIPTS) == {"protozoo", "protozoo-train", "protozoo-evaluate"}
    calls = [[name, target, ["--help"]] for name, target in sorted(SCRIPTS.items())]
    calls += [["protozoo", SCRIPTS["protozoo"], [command, "--help"]]
              for command in ("train", "evaluate")]
    proc = _run("-c", RUNNER, json.dumps(calls))
    assert proc.returncode == 0, proc.stderr
    pages = {}
    for name, flags, code, out in json.loads(proc.stdout):
        assert code in (0, None), (name, flags, code)
        usage = f"usage: {name}" + (f" {flags[0]}" if flags[0] != "--help" else "")
        assert usage in out, (name, flags, out[:200])
        pages[" ".join([name, *flags])] = out
    assert "--image-size" in pages["protozoo train --help"]
    assert "train" in pages["protozoo --help"] and "evaluate" in pages["protozoo --help"]


def test_python_dash_m_protozoo_fails_in_one_line():
    proc = _run("-m", "protozoo", "fit")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown command 'fit': use protozoo train ... or protozoo evaluate ... "
        "(protozoo --help)"]
