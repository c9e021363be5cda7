"""Races trainers for a workdir lock: `python lock_race.py <workdir_lock.py> <trials> <contenders>`
prints, per trial, how many contenders held the lock at once.

Each trial forks `contenders` processes that wait at a barrier, call `acquire` at the same
instant, report whether they hold the lock, and release only after every one has reported (so a
second holder cannot be explained by the first having already let go). The lock module is loaded
from its file, not through the switchmoe package: forking a process that has imported JAX is
unsafe, and the lock needs nothing else.
"""

import importlib.util
import multiprocessing as mp
import sys
import tempfile


def contender(module_path, workdir, start, reported, results):
    spec = importlib.util.spec_from_file_location("workdir_lock", module_path)
    lock_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_mod)
    lock = lock_mod.WorkdirLock(workdir)
    start.wait()
    try:
        lock.acquire()
        results.put(1)
    except lock_mod.WorkdirLocked:
        results.put(0)
    reported.wait()
    lock.release()


def main(module_path: str, trials: int, contenders: int) -> None:
    ctx = mp.get_context("fork")
    holders = []
    for _ in range(trials):
        with tempfile.TemporaryDirectory() as workdir:
            start, reported = ctx.Barrier(contenders), ctx.Barrier(contenders)
            results = ctx.Queue()
            procs = [
                ctx.Process(target=contender, args=(module_path, workdir, start, reported, results))
                for _ in range(contenders)
            ]
            for p in procs:
                p.start()
            got = [results.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(timeout=30)
            holders.append(sum(got))
    print(" ".join(map(str, holders)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
