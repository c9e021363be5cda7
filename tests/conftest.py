"""Test-session setup that must happen before JAX initialises its backend."""

import os

# Expert-parallel tests run on 8 fake CPU devices. This must be set before the first JAX
# computation; setting it later silently does nothing.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Libraries that read absl flags at import time break under pytest unless flags count as parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
