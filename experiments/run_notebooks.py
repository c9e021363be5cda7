"""Executes the notebooks headless and keeps what they drew.

  make notebooks-run                      # installs the notebook extra, then runs this
  python -m experiments.run_notebooks [--only=expert_analysis] [--out=runs/notebooks]

Each notebooks/<name>.py (a jupytext py:percent file) is executed by nbclient in a kernel that
starts in notebooks/, as Jupyter's would, and saved with its outputs and figures as
<out>/<name>.ipynb. A notebook's setting comes from its environment variable (SWITCHMOE_WORKDIR,
SWITCHMOE_SWEEP_DIR, SWITCHMOE_T5_WORKDIR, SWITCHMOE_HF_DIR) or its default, resolved against
the repository. The first failing cell stops that notebook with its error; the others still run.
"""

import os
import sys

from absl import flags

from switchmoe import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")

_ONLY = flags.DEFINE_list("only", None, "Notebook names (default: every one under notebooks/).")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "runs", "notebooks"), "Where to save them.")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds a cell may take.")


def main(argv):
    del argv
    try:
        import jupytext  # noqa: PLC0415  (the notebook extra)
        import nbformat  # noqa: PLC0415
        from nbclient import NotebookClient  # noqa: PLC0415
        from nbclient.exceptions import CellExecutionError  # noqa: PLC0415
    except ImportError as e:
        raise OSError(
            f"{e.name} is missing: `make notebooks-run` installs the notebook extra "
            "(pip install -e '.[notebook]')."
        ) from None
    found = sorted(f[:-3] for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".py"))
    names = _ONLY.value or found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"--only={','.join(unknown)}: no such notebook; allowed: {found}.")
    os.makedirs(_OUT.value, exist_ok=True)
    failed = []
    for name in names:
        notebook = jupytext.read(os.path.join(NOTEBOOK_DIR, f"{name}.py"))
        client = NotebookClient(
            notebook, timeout=_TIMEOUT.value, kernel_name="python3",
            resources={"metadata": {"path": NOTEBOOK_DIR}},
        )  # fmt: skip
        try:
            client.execute(
                env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
            )
            status = "ok"
        except CellExecutionError as e:
            failed.append(name)
            status = f"FAILED: {str(e).strip().splitlines()[-1][:200]}"
        out = os.path.join(_OUT.value, f"{name}.ipynb")
        nbformat.write(notebook, out)
        print(f"[{status}] {name} -> {out}", flush=True)
    if failed:
        sys.exit(f"{len(failed)} notebook(s) failed: {failed}")


if __name__ == "__main__":
    cli.run(main)
