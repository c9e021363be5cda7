"""A run's workdir: Orbax checkpoints (`checkpoints`), the config file and its history
(`config_files`), checksums and quarantine (`integrity`), the single-writer lock
(`workdir_lock`), metrics (`metrics`), restoring and writing a whole run (`restore`) and its
summary (`summary`).

    from switchmoe.runs import restore_run
    config, params = restore_run("runs/demo")

`restore_run`, `restore_run_at`, `write_run` and `read_metrics` are re-exported here.
"""

from switchmoe.runs.restore import (  # noqa: F401  (re-exported)
    DERIVED_FILE,
    read_metrics,
    restore_run,
    restore_run_at,
    write_run,
)
