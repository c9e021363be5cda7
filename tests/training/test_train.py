"""End-to-end training: loss falls, exact resume, restore, non-finite guard, bad input."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config, train_straight_and_interrupted

from switchmoe.data.pipeline import LMDataPipeline, load_texts
from switchmoe.models import init_rows, resolve
from switchmoe.runs import checkpoints, config_files, metrics, restore_run
from switchmoe.sharding import make_mesh
from switchmoe.training.trainer import Trainer, train_and_evaluate

quiet = lambda line: None


def test_tiny_run_loss_falls_and_writes_its_outputs(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(data_dir, num_train_steps=30), workdir, log=quiet)
    records = metrics.read_metrics(workdir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # The MoE metrics a run's metrics.jsonl promises (README), with their shapes.
    last = train[-1]
    for name in ("train/aux_loss", "train/z_loss", "train/dropped_fraction"):
        assert np.isfinite(last[name])
    assert np.asarray(last["train/expert_load"]).shape == (1, 4)  # 1 MoE layer, 4 experts
    np.testing.assert_allclose(np.sum(last["train/expert_load"], axis=-1), 1.0, rtol=1e-5)
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["vocab_size"] == 259
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert checkpoints.Checkpointer(workdir).all_steps() == [20, 30]  # keep 2
    assert np.asarray(last["train/expert_grad_norm"]).shape == (1, 4)
    assert np.all(np.asarray(last["train/expert_update_norm"]) > 0)

    # Bits per byte from the eval batches themselves: byte tokens stand for one byte each, EOS
    # for none, and nothing else is scored.
    config = resolve(tiny_config(data_dir))
    scored = eos = 0.0
    for batch, _, _ in LMDataPipeline(config.data, config.batch_size).eval_set_batches("sample", 2):
        scored += batch["weights"].sum()
        eos += ((batch["targets"] == 258) * batch["weights"]).sum()
    last_eval = evals[-1]
    assert last_eval["eval/scored_tokens"] == scored
    assert last_eval["eval/scored_bytes"] == scored - eos
    expected = last_eval["eval/loss"] * scored / ((scored - eos) * np.log(2))
    assert last_eval["eval/bits_per_byte"] == pytest.approx(expected, rel=1e-6)

    # The final evaluation scores every token of the validation split once: each document's
    # bytes and its EOS, counted here from the split's own documents.
    texts = load_texts(config.data, "validation")
    final = [r for r in records if "final/loss" in r]
    assert [r["step"] for r in final] == [30]
    final = final[0]
    assert final["final/scored_tokens"] == sum(len(t) + 1 for t in texts)
    assert final["final/scored_bytes"] == sum(len(t) for t in texts)
    assert final["final/documents"] == len(texts) and final["final/whole_split"] == 1.0
    assert final["final/loss_low"] <= final["final/loss"] <= final["final/loss_high"]

    from switchmoe.runs.summary import summary  # noqa: PLC0415

    text = summary(tiny_config(data_dir, num_train_steps=30), workdir, final, 1.0)
    assert f"this model {final['final/bits_per_byte']:.3f}; unigram entropy " in text
    assert "xz -9 after train" in text and "(the whole eval split)" in text


def test_expert_norms_by_hand():
    from switchmoe.training.trainer import expert_norms  # noqa: PLC0415

    ones = np.ones
    tree = {
        # A shared expert (DeepSeekMoE's) is no routed expert: its matrices are left out.
        "block_10": {"moe": {"w_in": 2 * ones((2, 3, 4)), "w_out": ones((2, 4, 3)),
                             "shared": {"w_in": ones((3, 4)), "w_out": ones((4, 3))}}},
        "block_2": {"moe": {"w_in": ones((2, 3, 4)), "w_out": ones((2, 4, 3)), "router_kernel": ones((3, 2))}},
        "block_3": {"ffn": {"w_in": ones((3, 4))}},
    }  # fmt: skip
    # block_2 before block_10; each expert: 12 entries of w_in and 12 of w_out.
    norms = np.asarray(expert_norms(tree))
    np.testing.assert_allclose(norms, [[np.sqrt(24)] * 2, [np.sqrt(12 * 4 + 12)] * 2])
    assert expert_norms({"block_0": {"ffn": {"w_in": ones((3, 4))}}}) is None


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    config = tiny_config(
        data_dir,
        **{
            "model.moe.num_selected": 2,
            "model.moe.random_routing": True,
            "model.moe.jitter_eps": 0.01,
            "model.dropout_rate": 0.1,
        },
    )
    straight, interrupted = train_straight_and_interrupted(config, tmp_path)
    _, a = restore_run(straight)
    _, b = restore_run(interrupted)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_restore_run_reproduces_the_final_eval_loss(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(tiny_config(data_dir), workdir, log=quiet)
    config, params = restore_run(workdir)
    assert config.model.d_model == 32
    assert all(p.devices() == {jax.local_devices()[0]} for p in jax.tree.leaves(params))
    config = resolve(config)
    trainer = Trainer(config, make_mesh(config.mesh))
    again = trainer.evaluate(params, LMDataPipeline(config.data, config.batch_size))
    assert again["eval/loss"] == pytest.approx(result["eval/loss"], rel=1e-6)
    with pytest.raises(ValueError, match=r"no checkpoint at step 3; available: \[10, 20\]"):
        restore_run(workdir, step=3)


def test_non_finite_loss_stops_and_names_the_metric(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(
        data_dir,
        **{
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "optimizer.grad_clip_norm": 0.0,
            "log_every": 1,
        },
    )
    with pytest.raises(FloatingPointError, match=r"non-finite train/\w+ at step \d+"):
        train_and_evaluate(config, workdir, log=quiet)
    assert checkpoints.Checkpointer(workdir).all_steps() == []


def test_parameters_made_non_finite_by_an_update_are_never_saved(data_dir, tmp_path):
    # At lr 1e30 (inf is refused as a setting) step 1 moves the weights to ~1e30, still finite,
    # and is saved; step 2's update overflows the optimizer state and weights while its loss,
    # computed before the update, is what the old guard checked. With a checkpoint every step,
    # that guard saved them.
    workdir = str(tmp_path / "run")
    config = tiny_config(
        data_dir,
        **{
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "optimizer.grad_clip_norm": 0.0,
            "checkpoint_every": 1,
            "log_every": 10,
        },
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite values in \[.*\] after step 2; not saved. Latest checkpoint: 1\.",
    ):
        train_and_evaluate(config, workdir, log=quiet)
    assert checkpoints.Checkpointer(workdir).all_steps() == [1]
    _, params = restore_run(workdir)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"model.moe.num_selected": 5},
            r"model.moe.num_selected \(k\) must be in \[1, model.moe.num_experts=4\]; got 5",
        ),
        ({"model.moe.train_capacity_factor": 0.0}, "model.moe.train_capacity_factor must be > 0"),
        ({"model.moe.group_size": 48}, r"model.moe.group_size=48 must divide the tokens per batch"),
        (
            {"mesh.data": 8, "batch_size": 12},
            r"batch_size=12 must be divisible by the number of "
            r"batch shards mesh.data × mesh.expert = 8×1 = 8",
        ),
        (
            {"model.moe.backend": "cuda"},
            r"model.moe.backend must be one of \('auto', 'einsum', 'gather', ",
        ),
        (
            {"model.moe.dropless_implementation": "triton"},
            r"model.moe.dropless_implementation must be None or one of \('ragged_dot', 'blocked'\)",
        ),
        (
            {"model.moe.batch_prioritized": True},
            "batch_prioritized=True is not allowed in a decoder",
        ),
        (
            {"optimizer.name": "sgd"},
            r"optimizer.name must be one of \('adafactor', 'adamw', 'muon'\)",
        ),
        # Settings that used to train silently, or fail deep inside JAX:
        ({"model.moe.moe_every": 3}, r"moe_every=3 exceeds model.num_layers=2: .*no MoE layer"),
        ({"model.moe.expert_d_ff": 0}, r"model.moe.expert_d_ff must be > 0; got 0"),
        ({"model.moe.group_size": -32}, r"model.moe.group_size must be > 0; got -32"),
        ({"model.moe.jitter_eps": 2.0}, r"model.moe.jitter_eps must be in \[0, 1\)"),
        ({"model.moe.load_balancing_weight": -0.01}, r"load_balancing_weight must be >= 0"),
        ({"model.moe.shared_d_ff": -8}, r"model.moe.shared_d_ff must be >= 0"),
        ({"model.moe.random_routing_threshold": 0.0}, r"random_routing_threshold must be > 0"),
        (
            {
                "model.moe.router": "sbase",
                "model.moe.sbase_temperature": 0.0,
                "model.moe.noncausal_ablation": True,
            },
            r"model.moe.sbase_temperature must be > 0",
        ),  # fmt: skip
        (
            {"model.moe.router": "hash", "model.moe.hash_table": (0, 1, 2, 3) * 10},
            r"hash_table has 40 entries; it needs one per token id \(model.vocab_size=259\)",
        ),
        (
            {"model.moe.router": "hash", "model.moe.hash_table": (0, 1, 2, 9) * 64 + (0, 1, 2)},
            r"hash_table names experts outside \[0, model.moe.num_experts=4\)",
        ),
        ({"model.vocab_size": 0}, r"model.vocab_size=0 is below the tokenizer's 259 ids"),
        ({"model.head_dim": -4}, r"model.head_dim must be > 0"),
        ({"seed": -1}, r"seed must be an integer >= 0; got -1"),
        ({"optimizer.learning_rate": float("inf")}, r"optimizer.learning_rate must be finite"),
        ({"optimizer.grad_clip_norm": -1.0}, r"optimizer.grad_clip_norm must be >= 0"),
        ({"optimizer.weight_decay": -0.1}, r"optimizer.weight_decay must be >= 0"),
        ({"optimizer.b1": 1.5}, r"optimizer.b1 must be in \[0, 1\); got 1.5"),
        ({"num_eval_batches": -2}, r"num_eval_batches must be >= 0"),
        ({"model.remat": "some"}, r"model.remat must be one of \('none', 'full', 'dots'\)"),
        ({"model.moe.granularity": 3}, r"model.moe.granularity=3 must divide the expert width"),
        ({"model.moe.global_balance_weight": -1.0}, r"global_balance_weight must be >= 0"),
        ({"data.pipeline": "tfdata"}, r"data.pipeline='tfdata'; allowed: \('packed', 'stream'\)"),
        ({"data.num_workers": -1}, r"data.num_workers=-1; allowed: an integer >= 0"),
        ({"optimizer.freeze": "moes"}, r"optimizer.freeze='moes'; allowed: \('none', 'moe', "),
        ({"upcycle_reinit_fraction": 1.0}, r"upcycle_reinit_fraction must be in \[0, 1\)"),
        (
            {"model.moe.router": "hash", "model.moe.bias_update_speed": 1e-3},
            r"bias_update_speed \(auxiliary-loss-free balancing\) applies to the routers",
        ),
        # The open families' attention and block settings:
        (
            {"model.num_kv_heads": 3},
            r"model.num_kv_heads=3 must divide model.num_heads=2.*\[1, 2\]",
        ),
        ({"model.qk_norm": "layer"}, r"model.qk_norm must be one of \('none', 'head', 'projec"),
        ({"model.attention_bias": "q"}, r"model.attention_bias must be one of \('none', 'qkv', "),
        ({"model.sliding_window": -2}, r"model.sliding_window must be an integer >= 0"),
        ({"model.moe.moe_layers": (0, 5)}, r"model.moe.moe_layers must be distinct block indices"),
        ({"model.moe.shared_gate": True}, r"shared_gate gates the shared expert: it needs"),
    ],
)
def test_bad_settings_raise_before_anything_is_written(data_dir, tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(data_dir, **overrides), str(workdir), log=quiet)
    assert not workdir.exists()


def test_incompatible_workdir_is_refused_and_left_intact(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(data_dir, num_train_steps=10), workdir, log=quiet)
    before = {
        f: open(os.path.join(workdir, f), "rb").read() for f in ("config.json", "metrics.jsonl")
    }
    with pytest.raises(ValueError, match=r"another model.*changes with: model.d_model: 32 -> 48\."):
        train_and_evaluate(tiny_config(data_dir, **{"model.d_model": 48}), workdir, log=quiet)
    # The setting that makes the checkpoint unusable comes first, the harmless ones apart.
    changed = {"model.moe.num_experts": 8, "model.moe.train_capacity_factor": 2.0,
               "optimizer.learning_rate": 1e-3}  # fmt: skip
    with pytest.raises(ValueError) as refused:
        train_and_evaluate(tiny_config(data_dir, **changed), workdir, log=quiet)
    message = str(refused.value)
    assert "changes with: model.moe.num_experts: 4 -> 8." in message
    harmless = message.split("Also differing, allowed on resume:")[1]
    assert "train_capacity_factor: 1.25 -> 2.0" in harmless and "learning_rate" in harmless
    assert "num_experts" not in harmless
    # An optimizer whose state has another structure (no clipping) is refused, by name.
    with pytest.raises(ValueError, match=r"changes with: optimizer.grad_clip_norm: 1.0 -> 0.0"):
        train_and_evaluate(
            tiny_config(data_dir, **{"optimizer.grad_clip_norm": 0.0}), workdir, log=quiet
        )
    for f, content in before.items():
        assert open(os.path.join(workdir, f), "rb").read() == content
    assert checkpoints.Checkpointer(workdir).all_steps() == [10]


def test_a_resume_with_other_settings_records_them_beside_the_original(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(data_dir, num_train_steps=10), workdir, log=quiet)
    original = open(os.path.join(workdir, "config.json"), "rb").read()
    longer = {"num_train_steps": 20, "optimizer.learning_rate": 3e-3}
    train_and_evaluate(tiny_config(data_dir, **longer), workdir, log=quiet)
    assert open(os.path.join(workdir, "config.json"), "rb").read() == original
    lines = open(os.path.join(workdir, "config_history.jsonl")).read().splitlines()
    (entry,) = [json.loads(line) for line in lines]
    # Resumed from 10; the first checkpoint trained under the new settings is 20.
    assert (entry["since_step"], entry["step"]) == (10, 20)
    assert entry["changes"] == {
        "num_train_steps": [10, 20],
        "optimizer.learning_rate": [1e-2, 3e-3],
    }
    assert config_files.read_config(workdir).optimizer.learning_rate == 3e-3
    assert config_files.read_config(workdir, as_first_written=True).num_train_steps == 10
    # Each checkpoint reports the settings that trained it.
    assert restore_run(workdir, step=10)[0].optimizer.learning_rate == 1e-2
    assert restore_run(workdir, step=20)[0].optimizer.learning_rate == 3e-3
    # The same settings again change nothing; other settings on a finished run train nothing
    # and so record nothing.
    train_and_evaluate(tiny_config(data_dir, **longer), workdir, log=quiet)
    other_rate = {**longer, "optimizer.learning_rate": 5e-3}
    train_and_evaluate(tiny_config(data_dir, **other_rate), workdir, log=quiet)
    assert len(open(os.path.join(workdir, "config_history.jsonl")).read().splitlines()) == 1
    assert restore_run(workdir)[0].optimizer.learning_rate == 3e-3
    # A config.json written before a block existed (here `distill`): a resume records what
    # changed, not the fields that only gained their defaults, and the history reads back.
    path = os.path.join(workdir, "config.json")
    older = json.load(open(path))
    del older["distill"]
    json.dump(older, open(path, "w"))
    further = {**longer, "num_train_steps": 30, "distill.temperature": 2.0}
    train_and_evaluate(tiny_config(data_dir, **further), workdir, log=quiet)
    lines = open(os.path.join(workdir, "config_history.jsonl")).read().splitlines()
    assert json.loads(lines[-1])["changes"] == {
        "num_train_steps": [20, 30],
        "distill.temperature": [1.0, 2.0],
    }
    assert config_files.read_config(workdir).distill.temperature == 2.0


def test_rerunning_a_finished_run_returns_its_last_metrics(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    first = train_and_evaluate(tiny_config(data_dir, num_train_steps=10), workdir, log=quiet)
    again = train_and_evaluate(tiny_config(data_dir, num_train_steps=10), workdir, log=quiet)
    assert again["eval/loss"] == pytest.approx(first["eval/loss"])
    assert len(metrics.read_metrics(workdir)) == 2  # steps 5 and 10, nothing appended


def test_routing_groups_longer_than_a_sequence_train(data_dir, tmp_path):
    # Groups of 64 tokens span two 32-token sequences: init must build a batch of whole groups
    # (a one-row init batch cannot be split into 64-token groups).
    config = tiny_config(data_dir, **{"model.moe.group_size": 64, "num_train_steps": 10})
    result = train_and_evaluate(config, str(tmp_path / "run"), log=quiet)
    assert np.isfinite(result["eval/loss"])
    assert init_rows(resolve(config)) == 2
    ed = resolve(
        tiny_config(
            data_dir,
            **{
                "model.arch": "encoder_decoder",
                "data.num_sentinels": 16,
                "model.moe.group_size": 64,
            },
        )
    )
    # Encoder rows of 32 tokens need 2 per group; decoder rows of 8 targets need 8: lcm 8.
    assert init_rows(ed) == 8


def test_a_live_trainer_holds_its_workdir_and_a_dead_one_does_not(data_dir, tmp_path):
    from switchmoe.runs.workdir_lock import LOCK_FILE, WorkdirLocked, _start_time  # noqa: PLC0415

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "since": "then",
                "start_time": _start_time(holder.pid)}  # fmt: skip
        (workdir / LOCK_FILE).write_text(json.dumps(lock))
        config = tiny_config(data_dir, num_train_steps=5)
        with pytest.raises(WorkdirLocked, match=f"held by a running trainer: process {holder.pid}"):
            train_and_evaluate(config, str(workdir), log=quiet)
        assert sorted(os.listdir(workdir)) == [LOCK_FILE]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over, and released at the end.
    train_and_evaluate(config, str(workdir), log=quiet)
    assert not (workdir / LOCK_FILE).exists()
    assert metrics.read_metrics(str(workdir))[-1]["step"] == 5
    # A lock from another host cannot be checked: refused, with how to clear it.
    (workdir / LOCK_FILE).write_text(json.dumps({**lock, "host": "elsewhere"}))
    with pytest.raises(WorkdirLocked, match="on host elsewhere .* delete"):
        train_and_evaluate(tiny_config(data_dir, num_train_steps=10), str(workdir), log=quiet)
