"""Multi-process start-up: `jax.distributed` with the coordinator from flags or environment.

  python -m experiments.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0          # on the first host; --process_id=1 on the second

or set SWITCHMOE_COORDINATOR_ADDRESS, SWITCHMOE_NUM_PROCESSES, SWITCHMOE_PROCESS_ID. The address
`auto` leaves all three to `jax.distributed.initialize()`, which finds them itself on Cloud TPU
slices, under SLURM and under Open MPI (the same command on every host). On CPU the
cross-process collectives use gloo. Each process then feeds its own rows of every batch
(LMDataPipeline.batch(step, process_index, process_count)); Orbax writes one checkpoint together.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
    """Starts jax.distributed if a coordinator is given (argument or environment).

    Must run before any JAX computation. Returns True when running multi-process.
    """
    env = os.environ.get
    coordinator_address = coordinator_address or env("SWITCHMOE_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return jax.process_count() > 1
    num_processes = (
        num_processes if num_processes is not None else int(env("SWITCHMOE_NUM_PROCESSES", "0"))
    )
    process_id = process_id if process_id is not None else int(env("SWITCHMOE_PROCESS_ID", "-1"))
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"multi-process start needs num_processes >= 1 and 0 <= process_id < num_processes; "
            f"got num_processes={num_processes}, process_id={process_id}."
        )
    # Cross-process collectives between CPU devices (fake devices in tests, or CPU hosts); this
    # setting does not affect GPU/TPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
