import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustdistill.data import load_dataset
from robustdistill.recipes import recipe
from robustdistill.training.config import from_dict

torch.set_num_threads(2)


def pytest_collection_modifyitems(items):
    """A test that needs the trained models trains them (or shares their training): it is slow."""
    for item in items:
        if "trained_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def snapshot(root):
    """Every path under root with its content hash: what "nothing created, nothing changed" is checked against."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def digits_config(tmp_path, which="natural", **overrides):
    """A digits recipe shrunk for tests; `overrides` are dotted keys (`train__epochs` -> train.epochs).
    Its final evaluation is clean and PGD-20 unless a test asks for more (the recipes' AutoAttack costs
    a test run about 20 s, and the tests of AutoAttack ask for it)."""
    raw = copy.deepcopy(recipe(which))
    raw["out_dir"] = str(tmp_path / "runs")
    raw["eval"] = {**raw.get("eval", {}), "attacks": ["clean", "pgd20"]}
    extra = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return from_dict(raw, extra)


@pytest.fixture(scope="session")
def digits():
    cfg = from_dict(recipe("natural")).data
    return load_dataset(cfg)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """A natural and a TRADES small CNN on digits, trained briefly once per test session."""
    from robustdistill.training.loop import train

    tmp = tmp_path_factory.mktemp("trained")
    natural = train(digits_config(tmp, "natural", train__epochs=8, train__milestones="[6]"))
    trades = train(digits_config(tmp, "trades", train__epochs=6, train__milestones="[]"))
    return {"natural": natural, "trades": trades}


@pytest.fixture()
def natural_model(trained_runs):
    from robustdistill.models.checkpoint import load_model

    model, _ = load_model(trained_runs["natural"] / "checkpoints" / "best.safetensors")
    return model.eval()


def run_page(page: Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """A documentation page's bash blocks, in order, in `cwd`, through the installed `robustdistill`
    command (as a user runs them); fails the test with the end of stderr if one fails."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    assert blocks, f"{page} lost its example"
    bin_dir = Path(shutil.which("robustdistill") or Path(sys.executable).parent / "robustdistill").parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    script = "set -euo pipefail\n" + "\n".join(blocks)
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
