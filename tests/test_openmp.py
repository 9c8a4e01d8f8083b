"""The entry scripts set OpenMP's spin count before torch loads (utils/openmp.py says why)."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints GOMP_SPINCOUNT and OMP_WAIT_POLICY as they are when torch is first imported (or at the end).
PROBE = """
import os, sys
def show():
    print("AT_TORCH", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"), flush=True)
class AtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            show()
            sys.exit(0)
        return None
sys.meta_path.insert(0, AtTorch())
import {module}
show()
"""


def _at_torch(module: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[1:3]


def test_spin_count_is_set_before_torch_loads():
    assert _at_torch("train_advanced") == ["10000", "None"]


@pytest.mark.parametrize("script", ["train_advanced.py", "predict_advanced.py", "diagnose.py", "evaluate.py"])
def test_scripts_import_it_before_anything_else(script):
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    modules = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in imports]
    first_project = next(m for m in modules if m.split(".")[0] not in ("os", "typing", "time"))
    assert first_project == "utils.openmp", f"{script} imports {first_project} first"


def test_an_explicit_setting_wins():
    assert _at_torch("utils.openmp", GOMP_SPINCOUNT="500") == ["500", "None"]
    # a wait policy of the user's own: no spin count of ours beside it
    assert _at_torch("utils.openmp", OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE"]
