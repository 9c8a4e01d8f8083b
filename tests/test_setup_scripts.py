"""The README's first two commands each set up what they need, in either order (issue 18,
defect 10): `scripts/test.sh` (what .ci/run runs) and `./demo.sh` share scripts/setup_venv.sh.

Run on a copy of the scripts in a folder with no .venv, with a stand-in `python3` first on
PATH: its `-m venv DIR` makes DIR/bin/python (this interpreter) and a DIR/bin/pip that only
records its arguments, so nothing is installed or downloaded.
"""
import os
import shutil
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def _clone(tmp_path):
    """The scripts, requirements and a two-test suite in a fresh folder; a stand-in python3."""
    repo = tmp_path / "clone"
    for rel in ("scripts/setup_venv.sh", "scripts/test.sh", ".ci/run", "demo.sh", "requirements.txt"):
        os.makedirs(repo / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), repo / rel)
    (repo / "tests").mkdir()
    (repo / "tests" / "test_a.py").write_text("def test_passes():\n    assert 1 + 1 == 2\n")
    (repo / "tests" / "test_b.py").write_text("def test_fails():\n    assert 1 + 1 == 3\n")
    (repo / "pytest.ini").write_text("[pytest]\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    _executable(bin_dir / "python3", f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\nexec {sys.executable} "$@"\\n' > "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "$*" >> {log}\\n' > "$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
  exit 0
fi
exec {sys.executable} "$@"
""")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return repo, env, log


def _run(repo, env, *cmd):
    return subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_test_script_sets_up_the_venv_on_a_fresh_clone_and_returns_pytests_status(tmp_path):
    repo, env, log = _clone(tmp_path)
    assert not (repo / ".venv").exists()
    proc = _run(repo, env, "bash", "scripts/test.sh", "tests/test_a.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "setting up .venv" in proc.stdout
    assert log.read_text().split("\n")[0].endswith("-r requirements.txt")
    stamps = [n for n in os.listdir(repo / ".venv") if n.startswith(".requirements-")]
    assert len(stamps) == 1
    # Second time: no setup; a failing test and an empty selection are failures (exit 1, 5).
    assert _run(repo, env, "bash", "scripts/test.sh", "tests/test_b.py").returncode == 1
    assert _run(repo, env, "bash", "scripts/test.sh", "-k", "no_such_test").returncode == 5
    assert len(log.read_text().splitlines()) == 1  # pip ran once


def test_ci_runs_the_readme_command_and_fails_when_a_test_fails(tmp_path):
    repo, env, _ = _clone(tmp_path)
    proc = _run(repo, env, "bash", ".ci/run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in proc.stdout
    (repo / "tests" / "test_b.py").unlink()
    assert _run(repo, env, "bash", ".ci/run").returncode == 0


def test_demo_and_tests_share_one_setup_in_either_order(tmp_path):
    repo, env, log = _clone(tmp_path)
    # demo.sh first: its setup step (the rest of the demo is not run here: stop after setup).
    demo = (repo / "demo.sh").read_text()
    assert "bash scripts/setup_venv.sh" in demo and "pip install" not in demo
    proc = _run(repo, env, "bash", "scripts/setup_venv.sh")
    assert proc.returncode == 0, proc.stderr
    proc = _run(repo, env, "bash", "scripts/test.sh", "tests/test_a.py")
    assert proc.returncode == 0 and "setting up .venv" not in proc.stdout
    assert len(log.read_text().splitlines()) == 1


def test_readme_names_the_test_script_as_its_second_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].startswith("./demo.sh") and block[1].startswith("scripts/test.sh")
    assert "exec bash scripts/test.sh" in open(os.path.join(ROOT, ".ci", "run")).read()
