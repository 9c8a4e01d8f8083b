"""How long OpenMP threads spin before they sleep, for CPU runs on machines shared with others.

Imported for its effect by the stage-2 entry scripts before anything loads torch (libgomp reads
the variable once, when it loads). GNU OpenMP's default lets a waiting thread spin for ~300000
iterations: on a quiet machine that costs nothing, but when another process keeps the cores busy
the threads of one small matmul wait for each other's time slices, and the demo's stage 2 ran
300 steps in 60-100 s instead of 45 s with one thread (2026-12-03, two other single-threaded
trainings on the 2 cores). Sleeping at once (OMP_WAIT_POLICY=PASSIVE, as stage 1 does) cost
stage 2 1.6x on the quiet machine (25 vs 15 s); spinning 10000 iterations keeps the quiet speed
(16 s) and the busy one (48 s). An explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment
wins: ours is only a default.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
