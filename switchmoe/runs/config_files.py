"""A run's config files: config.json (written once, at the first start) and
config_history.jsonl (the settings later starts changed), and reading them back as the config the
latest start trained with, with fields added to switchmoe since then defaulted.

Kept apart from the Orbax module (checkpoints.py), which knows nothing of configs: reading a
config needs the config's defaults (`config.with_defaults`), and the config module sits above
the data and MoE modules that the checkpoint code does not need.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections

from switchmoe.config import with_defaults

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"  # settings changed on resume, one line per start


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written config


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
    """config.json is written once, by a run's first start, and never rewritten: it is what the
    checkpoints were trained with from step 0. A later start with other settings (those allowed
    on resume) appends {"step", "changes": {key: [old, new]}} to config_history.jsonl."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        write_config(workdir, config)
        return
    new = json.loads(config.to_json_best_effort())
    # What the latest start trained with, fields added to switchmoe since then defaulted: a
    # field that only gained its default is no change.
    current = dict(flat_items(json.loads(read_config(workdir).to_json_best_effort())))
    changes = {k: [current.get(k), v] for k, v in flat_items(new) if current.get(k) != v}
    if changes:
        with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), "changes": changes}, sort_keys=True) + "\n")


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip()]


def flat_items(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def read_config(
    workdir: str, *, as_first_written: bool = False
) -> Optional[ml_collections.ConfigDict]:
    """The run's config: config.json with the changes later starts recorded in
    config_history.jsonl applied in order (what the latest start trained with), or config.json
    alone with `as_first_written`. Fields added to switchmoe since it was written are defaulted."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = with_defaults(ml_collections.ConfigDict(json.load(f)))
    if not as_first_written:
        # Applied over the defaults: a change may name a field (or a block) that config.json,
        # written by an older switchmoe, lacks.
        for line in _lines(os.path.join(workdir, HISTORY_FILE)):
            for key, (_, value) in json.loads(line)["changes"].items():
                *parents, leaf = key.split(".")
                node = config
                with config.unlocked():
                    for part in parents:
                        if part not in node:
                            node[part] = ml_collections.ConfigDict()
                        node = node[part]
                    node[leaf] = value
    return config
