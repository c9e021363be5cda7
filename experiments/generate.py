"""Samples from a trained decoder-only LM with a key/value cache (switchmoe/generation.py).

  python -m experiments.generate --workdir=runs/demo --prompt='def main(' \
      --temperature=0.8 --top_p=0.95 --num_samples=3 [--max_length=128] [--top_k=0] [--seed=0]

Prints each continuation after its prompt. Temperature 0 is greedy decoding. The whole
generation compiles once for its (samples, max_length); the cache holds max_length tokens,
prompt included (default: the run's training sequence length). For an encoder–decoder run,
notebooks/fill_in_the_blanks.py fills in the sentinels of held-out examples.
"""

import time

import jax
from absl import flags

from switchmoe import cli
from switchmoe.generation import LMGenerator
from switchmoe.runs import restore_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to sample from.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text the samples continue.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Samples (rows decoded together).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Cache length (default data.seq_len).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most probable tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus: the most probable tokens up to p (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the draws.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")


def main(argv):
    del argv
    config, params = restore_run(_WORKDIR.value, _STEP.value)
    generator = LMGenerator(config, _MAX_LENGTH.value)
    start = time.perf_counter()
    texts = generator.complete(
        params, [_PROMPT.value] * _NUM.value, jax.random.key(_SEED.value),
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{_PROMPT.value}{text}")
    print(
        f"--- {_NUM.value} x {generator.max_length} tokens in {seconds:.1f} s, compilation "
        "included ---"
    )


if __name__ == "__main__":
    cli.run(main)
