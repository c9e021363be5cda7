"""What the experts learned (ST-MoE Table 13 for Python source): kind and byte statistics per
expert, load heat maps, router confidence, source text coloured by expert.

Shape legend: M MoE layers, E experts, T kinds (len(KINDS))."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from switchmoe.analysis.routing_capture import RoutingCapture
from switchmoe.analysis.source_kinds import KINDS, NUM_BYTES


def kind_counts(capture: RoutingCapture, layer: int, kept_only: bool = False) -> np.ndarray:
    """int64 [E, T]: byte tokens of each kind whose first choice in `layer` is each expert."""
    if capture.kinds is None:
        raise ValueError("this capture has no kinds (not a byte-tokenizer run).")
    mask = capture.valid & (capture.kept[layer] if kept_only else True)
    E, T = capture.num_experts, len(KINDS)
    flat = capture.expert[layer][mask].astype(np.int64) * T + capture.kinds[mask]
    return np.bincount(flat, minlength=E * T).reshape(E, T)


def byte_counts(capture: RoutingCapture, layer: int, kept_only: bool = False) -> np.ndarray:
    """int64 [E, 256]: occurrences of each input byte whose first choice is each expert."""
    mask = capture.valid & (capture.kept[layer] if kept_only else True)
    E = capture.num_experts
    flat = capture.expert[layer][mask].astype(np.int64) * NUM_BYTES + capture.tokens[mask]
    return np.bincount(flat, minlength=E * NUM_BYTES).reshape(E, NUM_BYTES)


def mutual_information(counts: np.ndarray) -> float:
    """I(X; Y) in bits of a joint count table [X, Y]; 0 when X tells nothing about Y."""
    p = counts / max(counts.sum(), 1)
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (px @ py)[nz])))


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-np.sum(p * np.log2(p)))


def _show_byte(b: int) -> str:
    return {10: "\\n", 9: "\\t", 32: "␣", 13: "\\r"}.get(b, chr(b) if 32 < b < 127 else f"x{b:02x}")


def expert_kind_table(
    capture: RoutingCapture, top: int = 3, min_count: int = 20, kept_only: bool = False
) -> list[dict[str, Any]]:
    """Per MoE layer and expert: the kinds of source it receives and those it over-represents.

    ST-MoE (Zoph et al. 2022, Table 13) lists the tokens each encoder expert specialises in
    (punctuation, verbs, proper names...). For byte-level Python the natural vocabulary is the
    kind of source a byte belongs to (`KINDS`). The over-representation of kind k in expert e is
    P(k | e) / P(k): how much more often the expert sees that kind than a random expert would.

    Args:
      capture: from `capture_routing`.
      top: how many over-represented kinds (and bytes) to list.
      min_count: ignore kinds / bytes seen fewer than this many times by the expert (noise).
      kept_only: count only tokens whose first choice was kept.

    Returns:
      One dict per (layer, expert): {"layer", "expert", "tokens" (count), "share" (of the layer's
      tokens), "kinds" ({kind: fraction of the expert's tokens}), "top_kinds" ([(kind, ratio,
      fraction)], ratio > 1 only, best first), "top_bytes" ([(shown byte, ratio, count)])}.
    """
    rows = []
    for m, layer in enumerate(capture.layers):
        counts = kind_counts(capture, m, kept_only)
        overall = counts.sum(0) / max(counts.sum(), 1)
        bytes_ = byte_counts(capture, m, kept_only)
        byte_overall = bytes_.sum(0) / max(bytes_.sum(), 1)
        total = max(counts.sum(), 1)
        for e in range(capture.num_experts):
            n = int(counts[e].sum())
            frac = counts[e] / max(n, 1)
            ratio = np.divide(frac, overall, out=np.zeros_like(frac), where=overall > 0)
            order = [k for k in np.argsort(-ratio) if counts[e, k] >= min_count and ratio[k] > 1]
            bfrac = bytes_[e] / max(n, 1)
            bratio = np.divide(
                bfrac, byte_overall, out=np.zeros_like(bfrac), where=byte_overall > 0
            )
            border = [b for b in np.argsort(-bratio) if bytes_[e, b] >= min_count and bratio[b] > 1]
            rows.append(
                {
                    "layer": layer,
                    "expert": e,
                    "tokens": n,
                    "share": n / total,
                    "kinds": {KINDS[k]: float(frac[k]) for k in range(len(KINDS)) if counts[e, k]},
                    "top_kinds": [(KINDS[k], float(ratio[k]), float(frac[k])) for k in order[:top]],
                    "top_bytes": [
                        (_show_byte(int(b)), float(bratio[b]), int(bytes_[e, b]))
                        for b in border[:top]
                    ],
                }
            )
    return rows


def format_kind_table(
    rows: Sequence[dict[str, Any]], capture: Optional[RoutingCapture] = None
) -> str:
    """`expert_kind_table` rows as text, one line per expert.

    With `capture`, each layer's header gives the entropy of the expert choice and the mutual
    information between a token's expert and its kind (and its byte): how many bits of the kind
    the expert reveals. 0 means the routing ignores kinds; I(expert; byte) = H(expert) means the
    expert is a function of the input byte alone.
    """
    lines, current = [], None
    for r in rows:
        if r["layer"] != current:
            current = r["layer"]
            header = f"{current}"
            if capture is not None:
                m = capture.layers.index(current)
                kinds, bytes_ = kind_counts(capture, m), byte_counts(capture, m)
                header += (
                    f": H(expert) = {entropy_bits(kinds.sum(1)):.2f} bits; "
                    f"I(expert; kind) = {mutual_information(kinds):.2f} of "
                    f"H(kind) = {entropy_bits(kinds.sum(0)):.2f} bits; "
                    f"I(expert; byte) = {mutual_information(bytes_):.2f} bits"
                )
            lines.append(header)
        kinds = ", ".join(f"{k} ×{ratio:.1f} ({100 * f:.0f}%)" for k, ratio, f in r["top_kinds"])
        bytes_ = " ".join(f"{b}×{ratio:.1f}" for b, ratio, _ in r["top_bytes"])
        lines.append(
            f"  expert {r['expert']:>2} {100 * r['share']:5.1f}% | {kinds or '-'} | bytes {bytes_ or '-'}"
        )
    return "\n".join(lines)


def expert_load(capture: RoutingCapture, kept_only: bool = False) -> np.ndarray:
    """float [M, E]: fraction of each layer's byte tokens whose first choice is each expert."""
    E = capture.num_experts
    load = []
    for m in range(len(capture.layers)):
        mask = capture.valid & (capture.kept[m] if kept_only else True)
        counts = np.bincount(capture.expert[m][mask], minlength=E).astype(np.float64)
        load.append(counts / max(counts.sum(), 1.0))
    return np.stack(load)


def plot_expert_load(load: np.ndarray, layers: Sequence[str]):
    """Heat map of `expert_load` (layers × experts), 1/E is perfectly balanced."""
    import matplotlib.pyplot as plt

    M, E = load.shape
    fig, ax = plt.subplots(figsize=(1 + 0.6 * E, 1 + 0.5 * M))
    im = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
    for m in range(M):
        for e in range(E):
            ax.text(
                e, m, f"{100 * load[m, e]:.0f}", ha="center", va="center", color="w", fontsize=8
            )
    ax.set(xticks=range(E), yticks=range(M), yticklabels=list(layers), xlabel="expert")
    ax.set_title(f"share of tokens per expert (%); balanced = {100 / E:.1f}%")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_kind_expert(capture: RoutingCapture, layer: int = 0):
    """Heat map of P(expert | kind) for one layer: a row concentrated on one expert means that
    expert owns that kind of source."""
    import matplotlib.pyplot as plt

    counts = kind_counts(capture, layer).T  # [T, E]
    present = counts.sum(1) > 0
    p = counts[present] / counts[present].sum(1, keepdims=True)
    names = [f"{k} ({n})" for k, n, ok in zip(KINDS, counts.sum(1), present) if ok]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * capture.num_experts, 0.5 + 0.35 * len(names)))
    im = ax.imshow(p, cmap="magma", aspect="auto", vmin=0, vmax=1)
    ax.set(xticks=range(capture.num_experts), yticks=range(len(names)), yticklabels=names)
    ax.set(xlabel="expert", title=f"{capture.layers[layer]}: P(expert | kind)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_confidence(capture: RoutingCapture, bins: int = 40):
    """Histogram of the router's top-1 probability per MoE layer (1/E = no preference)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(0, 1, bins + 1)
    for m, layer in enumerate(capture.layers):
        top1 = capture.probs[m].max(-1)[capture.valid]
        ax.hist(top1, bins=edges, histtype="step", lw=1.5, density=True, label=layer)
    ax.axvline(1 / capture.num_experts, color="gray", ls="--", label="1/E")
    ax.set(xlabel="router top-1 probability", ylabel="density", title="router confidence")
    ax.legend()
    fig.tight_layout()
    return fig


def _text_cells(capture: RoutingCapture, layer: int, row: int, num_rows: int):
    """(character, expert, kept) for consecutive windows; non-ASCII bytes shown as '·'.

    Each window's last target, which no window routes, is included with expert -1.
    """

    def show(t: int) -> str:
        if t >= NUM_BYTES:
            return "¶"  # end of a document (or padding)
        return "\n" if t == 10 else " " if t in (9, 13, 32) else chr(t) if t < 127 else "·"

    cells = []
    for r in range(row, min(row + num_rows, len(capture.tokens))):
        for t, e, k in zip(capture.tokens[r], capture.expert[layer, r], capture.kept[layer, r]):
            cells.append((show(int(t)), int(e), bool(k)))
        cells.append((show(int(capture.targets[r, -1])), -1, True))
    return cells


def plot_routed_text(
    capture: RoutingCapture, layer: int = 0, row: int = 0, num_rows: int = 4, max_lines: int = 40
):
    """Source text with each byte's background coloured by its first-choice expert.

    Consecutive eval windows are consecutive text, so rows row..row+num_rows-1 read on. Dropped
    tokens are hatched. Blanks are drawn as coloured cells too, so indentation shows its expert.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    cells = _text_cells(capture, layer, row, num_rows)
    cmap = plt.get_cmap("tab10" if capture.num_experts <= 10 else "tab20")
    lines, line = [], []
    for cell in cells:
        line.append(cell)
        if cell[0] == "\n":
            lines.append(line)
            line = []
    lines = (lines + [line])[:max_lines]
    width = max(40, min(100, max(len(l) for l in lines)))
    fig, ax = plt.subplots(figsize=(0.11 * width + 1, 0.2 * len(lines) + 1))
    for y, line in enumerate(lines):
        for x, (ch, e, kept) in enumerate(line[:width]):
            color = cmap(e % cmap.N) if e >= 0 else "white"  # -1: not routed (window edge)
            ax.add_patch(
                Rectangle(
                    (x, y), 1, 1, color=color, alpha=0.55, hatch=None if kept else "///", lw=0
                )
            )
            if ch not in " \n":
                ax.text(
                    x + 0.5, y + 0.5, ch, ha="center", va="center", family="monospace", fontsize=8
                )
    ax.set(xlim=(0, width), ylim=(len(lines), 0))
    ax.axis("off")
    handles = [
        Patch(color=cmap(e % cmap.N), alpha=0.55, label=f"expert {e}")
        for e in range(capture.num_experts)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"{capture.layers[layer]}: first-choice expert of each byte (hatched: dropped)")
    fig.tight_layout()
    return fig


def routed_text_html(
    capture: RoutingCapture, layer: int = 0, row: int = 0, num_rows: int = 4
) -> str:
    """The same as `plot_routed_text` as HTML (for `IPython.display.HTML`); hover shows expert."""
    import html

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    cmap = plt.get_cmap("tab10" if capture.num_experts <= 10 else "tab20")
    spans = []
    for ch, e, kept in _text_cells(capture, layer, row, num_rows):
        shown = "↵\n" if ch == "\n" else html.escape(ch)
        if e < 0:  # a window's last byte: not routed
            spans.append(f'<span title="not routed">{shown}</span>')
            continue
        style = f"background:{to_hex(cmap(e % cmap.N))}88" + (
            "" if kept else ";text-decoration:line-through"
        )
        spans.append(f'<span title="expert {e}" style="{style}">{shown}</span>')
    return '<pre style="line-height:1.3">' + "".join(spans) + "</pre>"
