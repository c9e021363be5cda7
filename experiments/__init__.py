"""Entry points: train, parameter counts (and, later, sweeps, reports, benchmarks)."""
