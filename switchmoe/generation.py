"""Sampling from a trained model with a key/value cache: greedy, temperature, top-k, top-p.

    from switchmoe.runs import restore_run
    from switchmoe.generation import LMGenerator
    config, params = restore_run("runs/demo")
    generator = LMGenerator(config, max_length=256)
    print(generator.complete(params, ["def fibonacci(n):"], temperature=0.8, top_p=0.95)[0])

Shape legend: B rows, T the cache length (prompt and generated tokens together), V vocabulary,
Le encoder length.

How a generation runs: one `jax.jit` program per (B, T) holds the whole loop (`lax.fori_loop`),
so a generation compiles once whatever its sampling settings, which are traced arguments
(`traces` counts compilations). Step t feeds position t of a [B, T] token buffer to the model in
decoding mode and reads the logits of position t + 1; where a row's prompt still has a token
there, the prompt wins (so rows may have prompts of different lengths), else the sample is
written. Each attention layer caches its keys and values for the T positions (switchmoe/models/decoder.py);
each MoE layer caches which experts every position asked for, so that a new token is kept or
dropped exactly as a full pass over the [B, T] buffer would (moe_layer.MoeLayer._decoding_step).
Cached decoding therefore equals recomputing the whole prefix at every step, O(T) instead of
O(T²) work (tests/tools/test_generation.py checks tokens and logits against that recomputation).

What makes that exact: routing must be causal. A router whose choice for a token depends on
later tokens of its group (expert choice, SBASE, rank-major top-2, batch prioritized) is refused.
The capacity of a group is the one a full pass over the [B, T] buffer has (C for a group of T
tokens, or of `group_size` runs within a row; groups spanning rows become one group per row, see
`generation_config`), which is also why T is fixed per generator. The model runs in evaluation
mode (eval capacity factor). Positions beyond the training length use rotary or relative
positions the model never saw.

Sampling (`sample`): temperature 0 is greedy (argmax); otherwise logits / temperature, then
top-k (keep the k largest; 0 = all) and top-p (keep the smallest set of most probable tokens
whose probability reaches p; 1 = all), then a categorical draw with `jax.random.fold_in(key, t)`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchmoe.config import noncausal_reason
from switchmoe.data import span_corruption
from switchmoe.data.tokenizers import make_tokenizer
from switchmoe.models import build_model, resolve, sequence_lengths

Array = jax.Array


# -- Sampling -------------------------------------------------------------------------------


def filter_logits(logits: Array, top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """logits[..., V] with everything outside the top-k and the top-p nucleus set to -inf.

    top_k 0 and top_p 1 keep everything; both may be traced (one compilation for all values).
    Ties at the k-th value are all kept. The nucleus is the fewest most probable tokens whose
    probabilities (after top-k) sum to at least top_p; the most probable token is always kept.
    """
    V = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], -1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep = before < top_p
    # The smallest logit still inside the nucleus: everything at or above it stays.
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(
    logits: Array,
    key: Array,
    temperature: Array | float = 0.0,
    top_k: Array | int = 0,
    top_p: Array | float = 1.0,
) -> Array:
    """int32[...] tokens from logits[..., V]: argmax at temperature 0, else a draw from the
    filtered, tempered distribution (see `filter_logits`)."""
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    drawn = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(t > 0, drawn, greedy).astype(jnp.int32)


# -- Checks ---------------------------------------------------------------------------------


def check_generation(config: ml_collections.ConfigDict, max_length: int) -> None:
    """Raises ValueError (naming the setting) for a model that cannot decode token by token as
    it evaluates."""
    moe = config.model.moe
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (a prompt token and one more); got {max_length}."
        )
    if not moe.num_experts:
        return
    reason = noncausal_reason(moe)
    if reason:
        raise ValueError(
            f"cached generation needs causal routing, and model.moe.router={moe.router!r} is not: "
            f"{reason}. Allowed: routers that place a token using earlier tokens only "
            "(top_k with causal_routing, hash, noisy_top_k, dselect_k)."
        )
    if moe.get("batch_prioritized"):
        raise ValueError(
            "cached generation needs model.moe.batch_prioritized=False (it orders a group's "
            "tokens by router confidence, so a token's slot depends on later tokens)."
        )


def generation_config(
    config: ml_collections.ConfigDict, max_length: int
) -> ml_collections.ConfigDict:
    """`config` as generation runs it: resolved, without rematerialisation (training only), and
    with routing groups that lie within one row.

    Rows decode side by side, so a routing group shared by several rows would make a token's
    slot depend on other rows' tokens that do not exist yet. Groups of `model.moe.group_size`
    positions stay when that divides max_length; otherwise (e.g. the demo's groups of 8
    sequences) each row is one group, at the same capacity factor: C = the capacity of a
    max_length-token group, what that factor gives per token.
    """
    config = resolve(copy.deepcopy(config))
    with config.unlocked():
        config.model.remat = "none"
        group = config.model.moe.get("group_size")
        if group is not None and max_length % group:
            config.model.moe.group_size = None
    return config


# -- The loop -------------------------------------------------------------------------------


def decode_loop(
    apply_step: Callable[[Any, Array], tuple[Array, Any]],
    cache: Any,
    tokens: Array,
    lengths: Array,
    num_steps: int,
    key: Array,
    sampling: tuple[Array, Array, Array],
    *,
    pad_id: int,
    eos_id: Optional[int],
    return_logits: bool,
):
    """Runs `num_steps` cached steps over the buffer tokens[B, T].

    apply_step(cache, tokens[B, 1]) -> (logits[B, V], cache). Step t reads position t and
    predicts position t + 1; positions below a row's `lengths` are its prompt and kept. After a
    row samples `eos_id`, it writes `pad_id`. Returns (tokens[B, T], predicted[B, num_steps],
    logits[B, num_steps, V] or None).
    """
    B, T = tokens.shape
    temperature, top_k, top_p = sampling

    def step(t, state):
        cache, tokens, predicted, done, logits_out = state
        current = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        logits, cache = apply_step(cache, current)
        token = sample(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        nxt = jnp.minimum(t + 1, T - 1)
        prompt = jax.lax.dynamic_slice_in_dim(tokens, nxt, 1, axis=1)[:, 0]
        in_prompt = (t + 1 < lengths) & (t + 1 < T)
        token = jnp.where(in_prompt, prompt, token)
        if eos_id is not None:
            done = done | (~in_prompt & (token == eos_id))
        # The last step of a full buffer predicts past its end: its token is not written back.
        written = jnp.where(t + 1 < T, token, prompt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, written[:, None], nxt, axis=1)
        predicted = jax.lax.dynamic_update_slice_in_dim(predicted, token[:, None], t, axis=1)
        if logits_out is not None:
            logits_out = jax.lax.dynamic_update_slice_in_dim(
                logits_out, logits[:, None].astype(jnp.float32), t, axis=1
            )
        return cache, tokens, predicted, done, logits_out

    predicted = jnp.full((B, num_steps), pad_id, jnp.int32)
    logits_out = None
    if return_logits:
        V = jax.eval_shape(apply_step, cache, tokens[:, :1])[0].shape[-1]
        logits_out = jnp.zeros((B, num_steps, V), jnp.float32)
    state = (cache, tokens, predicted, jnp.zeros(B, bool), logits_out)
    _, tokens, predicted, _, logits_out = jax.lax.fori_loop(0, num_steps, step, state)
    return tokens, predicted, logits_out


def empty_cache(create: Callable[[], Any]) -> Any:
    """Zeros shaped like the "cache" collection that `create()` (a decode=True call on the full
    length) makes: its shapes, without running it."""
    shapes = jax.eval_shape(create)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter); got {top_k}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter); got {top_p}.")
    return (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


# -- The decoder-only LM --------------------------------------------------------------------


class LMGenerator:
    """Cached sampling from the decoder-only LM of `config` (any parameters of that model).

    max_length: T, the cache length (prompt plus generated tokens); default `data.seq_len`,
    the length the model was evaluated at (its routing groups and capacity).
    """

    def __init__(self, config: ml_collections.ConfigDict, max_length: Optional[int] = None):
        if config.model.get("arch", "decoder") != "decoder":
            raise ValueError(
                "LMGenerator needs model.arch='decoder'; for 'encoder_decoder' use "
                f"Seq2SeqGenerator. Got {config.model.arch!r}."
            )
        self.max_length = max_length or config.data.seq_len
        self.config = generation_config(config, self.max_length)
        check_generation(self.config, self.max_length)
        self.model = build_model(self.config)
        self.tokenizer = make_tokenizer(self.config.data)
        self.traces = 0
        self._generate = jax.jit(self._loop, static_argnames=("return_logits",))

    def _loop(self, params, tokens, lengths, key, sampling, return_logits):
        self.traces += 1  # runs when JAX traces, i.e. once per compilation
        model = self.model

        def create():
            return model.apply({"params": params}, tokens, decode=True, mutable=["cache"])[1]

        def apply_step(cache, current):
            (logits, _), mutated = model.apply(
                {"params": params, **cache}, current, decode=True, mutable=["cache"]
            )
            return logits[:, 0], mutated

        tokens, _, logits = decode_loop(
            apply_step, empty_cache(create), tokens, lengths, self.max_length - 1, key, sampling,
            pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id,
            return_logits=return_logits,
        )  # fmt: skip
        return tokens, logits

    def __call__(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        key: Optional[Array] = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        return_logits: bool = False,
    ):
        """Token rows int32[B, T]: each prompt (a list of ids, at least one) followed by what
        was sampled, then padding after EOS. With return_logits, also the logits [B, T - 1, V]
        the model gave at positions 0 .. T - 2 (row b's logits at t predict its token t + 1)."""
        rows, lengths = self._buffer(prompts)
        key = jax.random.key(0) if key is None else key
        sampling = _sampling_args(temperature, top_k, top_p)
        tokens, logits = self._generate(params, rows, lengths, key, sampling, return_logits)
        tokens = np.asarray(tokens)
        return (tokens, np.asarray(logits)) if return_logits else tokens

    def _buffer(self, prompts):
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        T = self.max_length
        for i, p in enumerate(prompts):
            if not 1 <= len(p) <= T:
                raise ValueError(f"prompt {i} has {len(p)} tokens; allowed: 1 .. max_length={T}.")
        rows = np.full((len(prompts), T), self.tokenizer.pad_id, np.int32)
        for i, p in enumerate(prompts):
            rows[i, : len(p)] = p
        return jnp.asarray(rows), jnp.asarray([len(p) for p in prompts], jnp.int32)

    def complete(self, params: Any, texts: Sequence[str], key=None, **sampling) -> list[str]:
        """The text each prompt continues into. A prompt starts after an EOS, as a document does
        in training (documents are joined with EOS); the result stops at the next EOS."""
        eos = self.tokenizer.eos_id
        prompts = [np.concatenate([[eos], self.tokenizer.encode(t)]) for t in texts]
        tokens = self(params, prompts, key, **sampling)
        out = []
        for p, row in zip(prompts, tokens):
            new = row[len(p) :]
            stop = np.flatnonzero(new == eos)
            out.append(self.tokenizer.decode(new[: stop[0]] if len(stop) else new))
        return out


# -- The encoder–decoder --------------------------------------------------------------------


class Seq2SeqGenerator:
    """Cached sampling from the decoder of the encoder–decoder of `config`: the encoder runs
    once, then T cached decoder steps from `start_id` (default the tokenizer's BOS, the decoder
    start switchmoe trains with). `pad_id` and `eos_id` default to the tokenizer's; a Hugging
    Face import uses T5's ids: start 0, pad 0, EOS 1.

    max_length: T, decoded tokens per row; default the training targets' length."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        max_length: Optional[int] = None,
        start_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        eos_id: Optional[int] = None,
    ):
        if config.model.get("arch", "decoder") != "encoder_decoder":
            raise ValueError(
                "Seq2SeqGenerator needs model.arch='encoder_decoder'; for 'decoder' use "
                f"LMGenerator. Got {config.model.get('arch', 'decoder')!r}."
            )
        self.max_length = max_length or sequence_lengths(resolve(config))["decoder"]
        self.config = generation_config(config, self.max_length)
        check_generation(self.config, self.max_length)
        self.model = build_model(self.config)
        self.tokenizer = make_tokenizer(self.config.data)
        self.start_id = self.tokenizer.bos_id if start_id is None else start_id
        self.pad_id = self.tokenizer.pad_id if pad_id is None else pad_id
        self.eos_id = self.tokenizer.eos_id if eos_id is None else eos_id
        self.traces = 0
        self._generate = jax.jit(self._loop, static_argnames=("return_logits",))

    def _loop(self, params, inputs, input_mask, key, sampling, return_logits):
        self.traces += 1
        model, variables, T = self.model, {"params": params}, self.max_length
        encoded, _ = model.apply(variables, inputs, input_mask, method=model.encode)
        B = inputs.shape[0]
        tokens = jnp.full((B, T), self.pad_id, jnp.int32).at[:, 0].set(self.start_id)

        def create():
            return model.apply(
                variables, encoded, input_mask, tokens, method=model.decode, decode=True,
                mutable=["cache"],
            )[1]  # fmt: skip

        def apply_step(cache, current):
            (logits, _), mutated = model.apply(
                {**variables, **cache}, encoded, input_mask, current, method=model.decode,
                decode=True, mutable=["cache"],
            )  # fmt: skip
            return logits[:, 0], mutated

        _, predicted, logits = decode_loop(
            apply_step, empty_cache(create), tokens, jnp.ones(B, jnp.int32), T, key, sampling,
            pad_id=self.pad_id, eos_id=self.eos_id,
            return_logits=return_logits,
        )  # fmt: skip
        return predicted, logits

    def __call__(
        self,
        params: Any,
        inputs,
        input_mask=None,
        key: Optional[Array] = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        return_logits: bool = False,
    ):
        """Decoded targets int32[B, T] for inputs[B, Le] (input_mask [B, Le], default all 1),
        padding after EOS; with return_logits also the logits [B, T, V] they were read from."""
        inputs = jnp.asarray(inputs, jnp.int32)
        if input_mask is None:
            input_mask = jnp.ones(inputs.shape, jnp.float32)
        key = jax.random.key(0) if key is None else key
        sampling = _sampling_args(temperature, top_k, top_p)
        out, logits = self._generate(
            params, inputs, jnp.asarray(input_mask, jnp.float32), key, sampling, return_logits
        )
        out = np.asarray(out)
        return (out, np.asarray(logits)) if return_logits else out


class GreedyDecoder:
    """Greedy decoding for the encoder–decoder of `config` (any parameters of that model).

    It fills in the sentinels of a span-corrupted input:

        from switchmoe.runs import restore_run
        from switchmoe.generation import GreedyDecoder
        config, params = restore_run(workdir)
        decoder = GreedyDecoder(config)
        tokens = decoder(params, batch["inputs"], batch["input_mask"])        # int32 [B, T]
        text = decoder.fill_in(batch["inputs"][0], tokens[0])                 # the completed text

    Shape legend: B batch, Le encoder length, T decoded length.

    The encoder runs once; the decoder then takes T cached steps (
    `Seq2SeqGenerator` at temperature 0: static shapes, one compilation), step t writing the argmax
    of position t's logits to position t + 1. Its self-attention caches keys and values and its MoE
    layers cache which experts earlier positions asked for, so every step equals rerunning the
    decoder on the whole prefix (tests/models/test_encoder_decoder.py checks it against that loop).

    Why step t sees exactly what training showed it: self-attention is causal, and the decoder's
    MoE layers route in order (batch-prioritized routing is refused there), so a token's expert
    and slot depend only on tokens before it in its routing group. Routing groups must be runs of
    positions within one decoded row (`model.moe.group_size` None, or dividing T); the model runs in
    evaluation mode (eval capacity factor). For sampling (temperature, top-k, top-p) use
    `Seq2SeqGenerator` directly.
    """

    def __init__(self, config: ml_collections.ConfigDict, max_length: int | None = None):
        if config.model.get("arch", "decoder") != "encoder_decoder":
            raise ValueError(
                f"greedy decoding needs model.arch='encoder_decoder'; got {config.model.arch!r}."
            )
        self.generator = Seq2SeqGenerator(config, max_length)
        self.config, self.tokenizer = self.generator.config, self.generator.tokenizer
        self.model = self.generator.model
        # Default: the training targets' length (sentinels, spans and EOS).
        self.max_length = self.generator.max_length
        self.sentinels = [
            self.tokenizer.sentinel_id(i) for i in range(self.tokenizer.num_sentinels)
        ]

    def __call__(self, params: Any, inputs, input_mask=None) -> np.ndarray:
        """Greedy targets int32 [B, T] for inputs [B, Le] (input_mask [B, Le], default all 1)."""
        return self.generator(params, inputs, input_mask)

    def fill_in(self, inputs, targets) -> str:
        """The text of `inputs` with each sentinel replaced by its span from `targets`."""
        tokens = span_corruption.fill_in_sentinels(
            inputs, targets, self.sentinels, self.tokenizer.eos_id
        )
        return self.tokenizer.decode(np.asarray(tokens, np.int64))
