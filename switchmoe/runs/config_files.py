"""A run's config files: config.json (written once, at the first start) and
config_history.jsonl (the settings later starts changed), and reading them back as the config the
latest start trained with, with fields added to switchmoe since then defaulted.

Kept apart from the Orbax module (checkpoints.py), which knows nothing of configs: reading a
config needs the config's defaults (`config.with_defaults`), and the config module sits above
the data and MoE modules that the checkpoint code does not need.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import ml_collections

from switchmoe.config import with_defaults
from switchmoe.runs.workdir_lock import WorkdirWriteError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"  # settings changed on resume, one line per start


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written config
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WorkdirWriteError.of(path, e) from e


def setting_changes(workdir: str, config: ml_collections.ConfigDict) -> dict[str, list]:
    """{dotted key: [what the latest start trained with, what `config` says]} for every setting
    that differs (fields added to switchmoe since config.json was written count at their
    default: a field that only gained its default is no change)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    new = json.loads(config.to_json_best_effort())
    current = dict(flat_items(json.loads(read_config(workdir).to_json_best_effort())))
    return {k: [current.get(k), v] for k, v in flat_items(new) if current.get(k) != v}


class History:
    """The settings a resumed start changes (those allowed on resume), recorded truthfully.

    config.json is written once, by a run's first start, and never rewritten: it is what the
    checkpoints were trained with from step 0. A later start with other settings appends
    {"step": S, "since_step": R, "changes": {key: [old, new]}} to config_history.jsonl: R is
    the checkpoint it resumed from, S the first checkpoint it trained under the new settings.
    The line is written only once checkpoint S exists on disk (`settle`), so a start that trains
    nothing (a finished run rerun) or dies before its first save leaves no line, and the
    settings `read_config(workdir, step=N)` reports are those that trained checkpoint N.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, resumed_from: int):
        self.workdir, self.since = workdir, int(resumed_from)
        self.changes = setting_changes(workdir, config)
        self.first_save: Optional[int] = None

    def saved(self, step: int) -> None:
        """A checkpoint of this start was requested (it may still be written asynchronously)."""
        if self.first_save is None:
            self.first_save = int(step)

    def settle(self, newest_on_disk: Optional[int]) -> None:
        """Records the changes once this start's first checkpoint is on disk."""
        if not self.changes or self.first_save is None:
            return
        if newest_on_disk is None or newest_on_disk < self.first_save:
            return
        history = os.path.join(self.workdir, HISTORY_FILE)
        line = {"step": self.first_save, "since_step": self.since, "changes": self.changes}
        try:
            with open(history, "a") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError as e:
            raise WorkdirWriteError.of(history, e) from e
        self.changes = {}


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
    workdir: str, *, as_first_written: bool = False, step: Optional[int] = None
) -> Optional[ml_collections.ConfigDict]:
    """The run's config: config.json with the changes later starts recorded in
    config_history.jsonl applied in order (what the latest start trained with), or config.json
    alone with `as_first_written`; with `step`, only the changes that trained checkpoint `step`
    (those of starts that resumed before it). Fields added to switchmoe since config.json was
    written are defaulted."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = with_defaults(ml_collections.ConfigDict(json.load(f)))
    if not as_first_written:
        # Applied over the defaults: a change may name a field (or a block) that config.json,
        # written by an older switchmoe, lacks.
        for line in map(json.loads, _lines(os.path.join(workdir, HISTORY_FILE))):
            # Lines written before `since_step` existed were written at the resume step.
            if step is not None and line.get("since_step", line["step"]) >= step:
                continue
            for key, (_, value) in line["changes"].items():
                *parents, leaf = key.split(".")
                node = config
                with config.unlocked():
                    for part in parents:
                        if part not in node:
                            node[part] = ml_collections.ConfigDict()
                        node = node[part]
                    node[leaf] = value
    return config


def overridden_keys(argv: list[str], flag: str = "config") -> list[str]:
    """The dotted keys a command line sets with `--config.KEY=VALUE` (or `--config.KEY VALUE`),
    in order."""
    prefix = f"--{flag}."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def resume_config(
    workdir: str, given: ml_collections.ConfigDict, keys: list[str]
) -> Optional[ml_collections.ConfigDict]:
    """The config a rerun on `workdir` trains with: the run's recorded config (`read_config`:
    what its latest start trained with) with only `keys` taken from `given` (the command line's
    config, whose values the flag parser has already typed), or None for a new run. A config
    file edited since the first start changes nothing; a setting named on the command line does
    (and a change that alters what the checkpoint stores is still refused by the trainer)."""
    recorded = read_config(workdir)
    if recorded is None:
        return None
    config = ml_collections.ConfigDict(recorded.to_dict())
    for key in keys:
        *parents, leaf = key.split(".")
        source, target = given, config
        for part in parents:
            source = source[part]
            if part not in target:
                with target.unlocked():
                    target[part] = ml_collections.ConfigDict()
            target = target[part]
        with target.unlocked():
            target[leaf] = source[leaf]
    return config
