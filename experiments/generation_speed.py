"""Cached generation against recomputing the whole prefix at every step: seconds per generation.

  python -m experiments.generation_speed --workdir=runs/demo --lengths=64,128,256 \
      --out=experiments/results/generation

Both decode greedily with one jitted loop over a fixed [B, T] buffer (compiled before timing):
`LMGenerator` with its key/value and slot-count cache, and the definition it must equal (the
full model on the whole buffer at every step, reading position t's logits). Tokens are checked
identical; the median of --repeats timed runs is reported. Writes <out>/generation_speed.json.
"""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from switchmoe import cli
from switchmoe.generation import LMGenerator
from switchmoe.models import build_model
from switchmoe.runs import restore_run

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "A decoder-only LM run.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "128", "256"], "Cache lengths T.")
_ROWS = flags.DEFINE_integer("rows", 4, "Rows decoded together.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/generation", "Output directory.")


def recompute_loop(model, T, eos, pad):
    """Greedy decoding by rerunning the model on the whole buffer at every step (no cache),
    with the generator's rules: prompts kept, padding after EOS."""

    def run(params, tokens, lengths):
        def step(t, state):
            tokens, done = state
            logits, _ = model.apply({"params": params}, tokens)
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, False), -1)
            token = jnp.where(done, pad, token)
            prompt = jax.lax.dynamic_index_in_dim(tokens, t + 1, 1, False)
            in_prompt = t + 1 < lengths
            token = jnp.where(in_prompt, prompt, token).astype(jnp.int32)
            done = done | (~in_prompt & (token == eos))
            return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t + 1, 1), done

        done = jnp.zeros(tokens.shape[0], bool)
        return jax.lax.fori_loop(0, T - 1, step, (tokens, done))[0]

    return jax.jit(run)


def timed(fn, repeats):
    out = jax.block_until_ready(fn())  # compiled and warmed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def main(argv):
    del argv
    config, params = restore_run(_WORKDIR.value)
    rows = []
    for T in (int(x) for x in _LENGTHS.value):
        generator = LMGenerator(config, max_length=T)
        eos = generator.tokenizer.eos_id
        prompts = [
            [eos, *generator.tokenizer.encode(p)] for p in ("def ", "import ", "class ", "# ")
        ]
        prompts = (prompts * _ROWS.value)[: _ROWS.value]
        buffer, lengths = generator._buffer(prompts)
        cached, cached_s = timed(lambda: generator(params, prompts), _REPEATS.value)
        model = build_model(generator.config)
        recompute = recompute_loop(model, T, eos, generator.tokenizer.pad_id)
        full, full_s = timed(lambda: recompute(params, buffer, lengths), _REPEATS.value)
        same = bool(np.array_equal(np.asarray(cached), np.asarray(full)))
        rows.append({"T": T, "rows": _ROWS.value, "cached_s": cached_s, "recompute_s": full_s,
                     "speedup": full_s / cached_s, "tokens_identical": same})  # fmt: skip
        print(f"T={T}: cached {cached_s:.3f} s, recompute {full_s:.3f} s, "
              f"{full_s / cached_s:.1f}x, identical tokens: {same}")  # fmt: skip
    os.makedirs(_OUT.value, exist_ok=True)
    result = {
        "command": "python -m experiments.generation_speed "
        + " ".join(
            f"--{k}={v}"
            for k, v in (
                ("workdir", _WORKDIR.value),
                ("lengths", ",".join(_LENGTHS.value)),
                ("rows", _ROWS.value),
                ("repeats", _REPEATS.value),
            )
        ),  # fmt: skip
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.default_backend()})",
        "rows": rows,
    }
    with open(os.path.join(_OUT.value, "generation_speed.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
