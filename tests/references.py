"""Independent references for the MoE tests: plain Python/numpy loops, one token at a time.

Nothing here calls switchmoe; the tests compare the vectorised library against these.
"""

import math

import numpy as np


def capacity(S, E, k, factor, min_capacity=1):
    return min(max(math.ceil(k * S / E * factor), min_capacity), S)


def top_k_route(
    probs,
    k,
    C,
    gate_norm="raw",
    batch_prioritized=False,
    keep_second=None,
    rank_major=True,
    overflow="drop",
    drop_priority="position",
    mask=None,
):
    """Brute-force token-choice routing.

    probs: [G, S, E]; C: capacity or None; keep_second: optional bool [G, S] (random routing);
    rank_major: every first choice before any second choice (GShard), else token by token.
    overflow: "drop", or "next_choice": a choice whose expert is full goes to the token's
      best-ranked expert past its own k that has room and that it does not hold already
      (token by token); its gate is that expert's probability (normalised over the token's
      final k experts for "normalized").
    drop_priority: "position", or "probability": each expert keeps the C requested pairs with
      the highest probability (ties: earlier token, then lower rank).
    mask: optional bool [G, S], False at padded positions (they ask for nothing).
    Returns expert, slot, gate as numpy arrays [G, S, k].
    """
    G, S, E = probs.shape
    expert = np.zeros((G, S, k), np.int64)
    slot = np.full((G, S, k), -1, np.int64)
    gate = np.zeros((G, S, k), np.float64)
    for g in range(G):
        if batch_prioritized:
            order = sorted(range(S), key=lambda s: (-probs[g, s].max(), s))
        else:
            order = list(range(S))
        full = [sorted(range(E), key=lambda e: (-probs[g, s, e], e)) for s in range(S)]
        ranked = [r[:k] for r in full]
        wants = lambda s, rank: (
            (mask is None or mask[g, s])
            and not (rank == 1 and keep_second is not None and not keep_second[g, s])
        )
        for s in range(S):
            expert[g, s] = ranked[s]
        used = [0] * E
        if drop_priority == "probability" and C is not None:
            pairs = [(s, r) for s in range(S) for r in range(k) if wants(s, r)]
            for e in range(E):
                mine = [(s, r) for s, r in pairs if ranked[s][r] == e]
                mine.sort(key=lambda p: (-probs[g, p[0], e], p[0], p[1]))
                for position, (s, r) in enumerate(mine[:C]):
                    slot[g, s, r] = position
        else:
            token_major = not rank_major or overflow == "next_choice"
            pairs = (
                [(s, rank) for s in order for rank in range(k)]  # token by token
                if token_major
                else [(s, rank) for rank in range(k) for s in order]  # all firsts, then seconds
            )
            held = {s: set(ranked[s]) for s in range(S)}
            for s, rank in pairs:
                if not wants(s, rank):
                    continue
                e = ranked[s][rank]
                if C is not None and used[e] >= C and overflow == "next_choice":
                    free = [x for x in full[s][k:] if used[x] < C and x not in held[s]]
                    if free:
                        e = free[0]
                        held[s].add(e)
                        expert[g, s, rank] = e
                if C is None or used[e] < C:
                    slot[g, s, rank] = used[e]
                    used[e] += 1
        for s in range(S):
            chosen = [probs[g, s, e] for e in expert[g, s]]
            total = sum(chosen)
            for rank in range(k):
                if slot[g, s, rank] >= 0:
                    gate[g, s, rank] = (
                        chosen[rank] / total if gate_norm == "normalized" else chosen[rank]
                    )
    return expert, slot, gate


def expert_choice_route(probs, C):
    """Each expert takes its top-C tokens. Returns slot[G, S, E] (rank or -1) and gate[G, S, E]."""
    G, S, E = probs.shape
    slot = np.full((G, S, E), -1, np.int64)
    gate = np.zeros((G, S, E))
    for g in range(G):
        for e in range(E):
            best = sorted(range(S), key=lambda s: (-probs[g, s, e], s))[:C]
            for rank, s in enumerate(best):
                slot[g, s, e] = rank
                gate[g, s, e] = probs[g, s, e]
    return slot, gate


def gelu(x):
    # tanh approximation, as jax.nn.gelu's default.
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


def ffn(x, w_in, w_out, w_gate=None, activation="relu"):
    """One expert on one token vector x[D]."""
    h = x @ w_in
    if activation == "relu":
        h = np.maximum(h, 0)
    elif activation == "gelu":
        h = gelu(h)
    elif activation == "swiglu":
        h = silu(x @ w_gate) * h
    elif activation == "geglu":
        h = gelu(x @ w_gate) * h
    return h @ w_out


def moe_output(x, expert, slot, gate, w_in, w_out, w_gate=None, activation="relu"):
    """y[g, s] = Σ_k gate · expert_e(x[g, s]) over kept choices, one token at a time."""
    G, S, D = x.shape
    y = np.zeros((G, S, D))
    for g in range(G):
        for s in range(S):
            for k in range(expert.shape[-1]):
                if slot[g, s, k] >= 0:
                    e = expert[g, s, k]
                    wg = None if w_gate is None else w_gate[e]
                    y[g, s] += gate[g, s, k] * ffn(x[g, s], w_in[e], w_out[e], wg, activation)
    return y


def softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def moe_output_grads(x, expert, slot, gate, w_in, w_out, cotangent):
    """Gradients of Σ y·cotangent for y = moe_output(..., activation="relu"), one token at a time.

    Returns (dx, dgate, dw_in, dw_out). For each kept choice: h = x·W_in, a = relu(h),
    y += gate·a·W_out, so dW_out += gate·aᵀc, dgate = a·W_out·c, dh = gate·(W_out·c)·[h > 0],
    dW_in += xᵀdh, dx += W_in·dh.
    """
    G, S, _ = x.shape
    dx, dgate = np.zeros_like(x), np.zeros_like(gate)
    dw_in, dw_out = np.zeros_like(w_in), np.zeros_like(w_out)
    for g in range(G):
        for s in range(S):
            c = cotangent[g, s]
            for k in range(expert.shape[-1]):
                if slot[g, s, k] < 0:
                    continue
                e = expert[g, s, k]
                h = x[g, s] @ w_in[e]
                a = np.maximum(h, 0)
                back = w_out[e] @ c  # [F]
                dgate[g, s, k] = a @ back
                dw_out[e] += gate[g, s, k] * np.outer(a, c)
                dh = gate[g, s, k] * back * (h > 0)
                dw_in[e] += np.outer(x[g, s], dh)
                dx[g, s] += w_in[e] @ dh
    return dx, dgate, dw_in, dw_out
