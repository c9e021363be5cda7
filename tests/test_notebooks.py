"""The notebooks under notebooks/ execute end to end against a tiny run and a tiny sweep.

Each notebook is a jupytext py:percent file; it is converted in memory and executed by nbclient
in a fresh kernel of this very interpreter (a kernelspec written to a temporary directory, so no
user or system kernel is picked up by mistake). The kernel is a separate process with one CPU
device, as a user's notebook would be. Any cell error fails the test.
"""

import os
import shutil
import sys

import jupytext
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from tiny import tiny_config

from switchmoe.training.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("restore_and_evaluate", "expert_analysis", "sweep_results", "fill_in_the_blanks",
             "imported_routing")  # fmt: skip
KERNEL = "switchmoe-test"

quiet = lambda line: None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run, and a 2-trial sweep: that run (4 experts) and a dense one."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    root = tmp_path_factory.mktemp("notebook_runs")
    workdir = str(root / "run")
    train_and_evaluate(tiny_config(data_dir), workdir, log=quiet)
    sweep = root / "sweep"
    shutil.copytree(workdir, sweep / "num_experts=4")
    dense = tiny_config(data_dir, **{"model.moe.num_experts": 0})
    train_and_evaluate(dense, str(sweep / "num_experts=0"), log=quiet)
    t5 = tiny_config(data_dir, **{"model.arch": "encoder_decoder", "data.num_sentinels": 16})
    train_and_evaluate(t5, str(root / "t5"), log=quiet)
    return {
        "SWITCHMOE_WORKDIR": workdir,
        "SWITCHMOE_SWEEP_DIR": str(sweep),
        "SWITCHMOE_T5_WORKDIR": str(root / "t5"),
    }


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernelspec that starts `sys.executable -m ipykernel_launcher` (no network needed)."""
    prefix = tmp_path_factory.mktemp("jupyter")
    install_kernelspec(kernel_name=KERNEL, prefix=str(prefix))
    kernels = os.path.join(prefix, "share", "jupyter", "kernels")
    spec = KernelSpecManager(kernel_dirs=[kernels]).get_kernel_spec(KERNEL)
    assert spec.argv[0] == sys.executable
    return [kernels]


def execute(path: str, env: dict, kernel_dirs: list) -> list:
    """Runs the notebook at `path`; returns its executed cells. Raises on any cell error."""
    notebook = jupytext.read(path)
    manager = KernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    client = NotebookClient(
        notebook,
        km=manager,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": NOTEBOOK_DIR}},  # the kernel starts in notebooks/
    )
    client.execute(env=env)
    return notebook.cells


def text_output(cells) -> str:
    return "".join(
        out.get("text", "") for cell in cells if cell.cell_type == "code" for out in cell.outputs
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_states_its_purpose_and_setting(name):
    notebook = jupytext.read(os.path.join(NOTEBOOK_DIR, f"{name}.py"))
    first, setup = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown" and "one setting to change" in first.source
    assert setup.cell_type == "code"
    assert "flags.FLAGS.mark_as_parsed()" in setup.source
    assert 'os.environ.get("SWITCHMOE_' in setup.source


def test_every_notebook_is_executed_here():
    found = sorted(f[:-3] for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".py"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("restore_and_evaluate", ["dropless", "logged final eval/loss"]),
        ("expert_analysis", ["block_1: H(expert)", "expert  3"]),
        ("sweep_results", ["num_experts=0", "num_experts=4"]),
        ("fill_in_the_blanks", ["greedy token accuracy", "decoder_1: first-choice tokens"]),
        # Unset SWITCHMOE_HF_DIR: a tiny random OLMoE-style checkpoint, exported then imported.
        ("imported_routing", ["2 blocks, 8 experts, top-2", "block_1: H(expert)", "dropless"]),
    ],
)
def test_notebook_executes(name, expected, runs, kernel_dirs):
    env = {**os.environ, **runs, "MPLBACKEND": "Agg"}
    cells = execute(os.path.join(NOTEBOOK_DIR, f"{name}.py"), env, kernel_dirs)
    output = text_output(cells)
    for text in expected:
        assert text in output
