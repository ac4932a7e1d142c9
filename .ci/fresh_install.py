"""What the README's `pip install -e ".[dev]"` would give a fresh machine, against what the tests ran on.

CI installs torch's pinned CPU build first (a bare requirement would fetch a multi-GB CUDA build), so
the test run sees that torch and never the newest one the requirements admit, which is what a newcomer
gets. A newer torch once added a warning line to the one-line CLI errors and two tests failed on a
fresh machine while CI was green. This script closes that gap as far as it can without fetching a CUDA
build:

1. it asks pip which torch a fresh install resolves (a dry run: metadata only, nothing installed);
2. it fails when the installed torch lies outside the project's own requirement range (the tests
   would then vouch for a torch no user gets);
3. when the fresh install would get a newer torch, it looks for that version's CPU build (about 200 MB)
   and, if pip can get it, runs the torch-sensitive tests (detector loading, the CLI's one-line errors)
   with it in a throwaway virtual environment; if only the CUDA build exists, it says so in one line
   and passes: that torch is then untested here, and the line says which.

CI_FRESH_TORCH=REQUIREMENT (e.g. "torch==2.13.0") resolves that instead and runs step 3 even when the
versions agree, to exercise it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The tests that depend on torch's own behaviour at the CLI's edges (warnings, TorchScript, messages).
SENSITIVE_TESTS = ["tests/metrics/test_metrics_detector.py", "tests/test_bad_inputs.py"]


def torch_requirement() -> Requirement:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the copy pip carries
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == "torch")


def resolve(requirement: str) -> dict | None:
    """pip's dry-run choice for one requirement, ignoring what is installed: {'version', 'url'} or None."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps"]
    cmd += ["--quiet", "--disable-pip-version-check", "--report", "-", requirement]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        return None
    (item,) = json.loads(run.stdout)["install"]
    return dict(version=item["metadata"]["version"], url=item["download_info"]["url"])


def check_with(wheel_requirement: str) -> int:
    """Run the torch-sensitive tests with another torch in a throwaway venv that sees everything else."""
    with tempfile.TemporaryDirectory(prefix="fresh-torch-") as folder:
        venv = Path(folder) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, wheel_requirement], check=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        cmd = [python, "-m", "pytest", "-x", "-p", "no:cacheprovider", *SENSITIVE_TESTS]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main() -> int:
    import torch

    installed = Version(torch.__version__)
    requirement = torch_requirement()
    if not requirement.specifier.contains(installed, prereleases=True):
        print(
            f"fresh-install check: FAILED: the tests ran on torch {installed}, outside pyproject's {requirement}"
        )
        return 1
    override = os.environ.get("CI_FRESH_TORCH")
    fresh = resolve(override or str(requirement))
    if fresh is None:
        print(f"fresh-install check: pip could not resolve {requirement} (offline?); not checked")
        return 0
    newest = Version(fresh["version"])
    if newest.public == installed.public and not override:
        print(f"fresh-install check: a fresh install gets torch {newest}, the version the tests ran on")
        return 0
    cpu = resolve(f"torch=={newest.public}+cpu")
    if cpu is None:
        print(
            f"fresh-install check: a fresh install gets torch {newest} (tests ran on {installed}); only its "
            "CUDA build is available here, which is not installed for CI, so that torch is untested"
        )
        return 0
    print(
        f"fresh-install check: a fresh install gets torch {newest}; running {SENSITIVE_TESTS} with its CPU build"
    )
    code = check_with(f"torch=={cpu['version']}")
    print(f"fresh-install check: {'passed' if code == 0 else 'FAILED'} with torch {cpu['version']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
