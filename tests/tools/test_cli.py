"""Bad command lines get one clear message: the setting, what is allowed, exit status 2, no
traceback and nothing written; `--debug` shows the traceback."""

import contextlib
import os
import subprocess
import sys

import pytest
from tiny import tiny_config

from switchmoe import cli
from switchmoe.config import default_config, validate_config
from switchmoe.runs import checkpoints, config_files, read_metrics, restore_run
from switchmoe.runs.workdir_lock import WorkdirLock, WorkdirLocked
from switchmoe.training.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (arguments after the entry point, what the message must say)
BAD = {
    "typo_in_a_config_key": (
        ["--config=configs/demo.py", "--config.model.moe.num_expert=4"],
        "--config.model.moe.num_expert: no such setting; did you mean num_experts?",
    ),
    "variant_with_an_underscore": (
        ["--config=configs/switch.py:base_8"],
        "unknown variant 'base_8'; allowed: base8, base16",
    ),
    "a_variant_not_listed": (["--config=configs/switch.py:base7"], "unknown variant 'base7'"),
    "config_without_py": (
        ["--config=configs/switch"],
        "--config=configs/switch: no such config file. Did you mean configs/switch.py?",
    ),
    "config_key_as_a_flag": (
        ["--config=configs/demo.py", "--num_train_steps=3"],
        "did you mean --config.num_train_steps?",
    ),
    "unknown_router": (
        ["--config=configs/demo.py", "--config.model.moe.router=foo"],
        "model.moe.router must be one of ('top_k'",
    ),
    "not_a_number": (
        ["--config=configs/demo.py", "--config.model.moe.num_experts=abc"],
        "--config.model.moe.num_experts=abc: invalid literal",
    ),
    "bad_value": (
        ["--config=configs/demo.py", "--config.model.moe.group_size=0"],
        "model.moe.group_size must be > 0; got 0.",
    ),
}


def run(module, args, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def test_a_bad_command_line_gets_one_clear_message(tmp_path):
    # All cases at once (each is a fresh interpreter importing JAX): the suite's time budget.
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-m", "experiments.train", *args, f"--workdir={tmp_path / case}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for case, (args, _) in BAD.items()
    }
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out = (stdout + stderr).strip().splitlines()
        assert proc.returncode == 2, (case, out)
        assert len(out) <= 5, (case, out)
        assert "Traceback" not in stderr, case
        assert any(BAD[case][1] in line for line in out), (case, out)
        assert not (tmp_path / case).exists(), case


def test_debug_shows_the_traceback_and_other_entry_points_report_alike(tmp_path):
    args, _ = BAD["variant_with_an_underscore"]
    proc = run("experiments.train", [*args, f"--workdir={tmp_path}", "--debug"])
    assert "Traceback" in proc.stderr and proc.returncode != 0
    proc = run("experiments.train", [*args, f"--workdir={tmp_path}"], {"SWITCHMOE_DEBUG": "1"})
    assert "Traceback" in proc.stderr
    proc = run("experiments.param_count", ["--config=configs/switch"])
    assert proc.returncode == 2 and "Did you mean configs/switch.py?" in proc.stderr
    proc = run("experiments.report", [f"--workdir={tmp_path / 'none'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


# -- The line each refusal prints: the project's own message (cli.describe on the real errors) --


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs directory mounted with them (needs root: else skipped)."""
    mounted = []

    def make(options):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True)  # fmt: skip
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_refusal_prints_the_projects_own_message_with_its_quotes(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirLocked) as held:
            WorkdirLock(str(tmp_path)).acquire()
    assert cli.describe(held.value, []) == (
        f"workdir {tmp_path} is held by a running trainer: process {os.getpid()} on this host "
        f"(since {held.value.args[0].split('(since ')[1].split(')')[0]}). Wait for it, stop it, "
        "or use another workdir."
    )
    config = default_config()
    config.model.moe.group_size = 0
    with pytest.raises(ValueError) as bad:
        validate_config(config)
    assert cli.describe(bad.value, []) == "model.moe.group_size must be > 0; got 0."
    missing = FileNotFoundError(2, "No such file or directory", "/no/such/file")
    assert cli.describe(missing, []) == "[Errno 2] No such file or directory: '/no/such/file'"


def test_an_unwritable_or_full_workdir_is_named_and_nothing_is_left_behind(mount):
    read_only = mount("ro,size=64k")
    with pytest.raises(OSError) as refused:
        WorkdirLock(str(read_only / "run")).acquire()
    assert cli.describe(refused.value, []) == (
        f"cannot write {read_only}/run/LOCK (Read-only file system): the workdir must be writable"
    )
    full = mount("size=64k")
    ckpt = checkpoints.Checkpointer(str(full))  # made before the disk fills up
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to its last block
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)
    with pytest.raises(OSError) as no_space:
        WorkdirLock(str(full)).acquire()
    assert cli.describe(no_space.value, []) == (
        f"cannot write {full}/LOCK (No space left on device): the workdir must be writable"
    )
    with pytest.raises(OSError) as no_space:
        config_files.write_config(str(full), default_config())
    assert cli.describe(no_space.value, []) == (
        f"cannot write {full}/config.json (No space left on device)"
    )
    with pytest.raises(OSError) as no_space:
        ckpt.check_writable(5)
    assert cli.describe(no_space.value, []) == (
        f"cannot write checkpoint 5 under {full}/checkpoints (OSError: [Errno 28] No space left "
        "on device); the latest intact checkpoint: none. Training stopped."
    )
    ckpt.close()
    # No lock, no temporary config, no write probe left behind.
    assert sorted(os.listdir(full)) == ["checkpoints", "filler"]
    assert os.listdir(full / "checkpoints") == []


def test_a_rerun_takes_the_recorded_config_and_changes_only_what_it_names(data_dir, tmp_path):
    # Started with two overrides; the rerun names only the new step count, and trains on with
    # the recorded expert count (the config file's own would be refused as another model).
    config = os.path.join(ROOT, "tests", "training", "preempt_config.py")
    env = {"SWITCHMOE_TEST_DATA_DIR": data_dir,
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])}  # fmt: skip
    workdir = str(tmp_path / "run")
    common = [f"--config={config}", f"--workdir={workdir}", "--config.final_eval=sample"]
    # The first run in-process (what experiments.train records is the config it trains; the
    # command line of a rerun is what is under test), the rerun through the command line.
    first = tiny_config(data_dir, num_train_steps=6, final_eval="sample")
    first.log_every, first.eval_every, first.checkpoint_every = 5, 40, 40
    first.model.moe.num_experts = 2
    train_and_evaluate(first, workdir, log=lambda line: None)
    again = run("experiments.train", [*common, "--config.num_train_steps=8"], env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "its recorded config, with the settings given here (final_eval, num_train_steps)" in (
        again.stdout
    )
    config, _ = restore_run(workdir)
    assert (config.num_train_steps, config.model.moe.num_experts) == (8, 2)
    assert [r["step"] for r in read_metrics(workdir)][-1] == 8
