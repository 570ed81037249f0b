"""Suite-wide settings: one intra-op thread per process.

The machine (and CI) has two cores shared by the test process, the servers it
starts and the trainers those launch; torch's default of one thread per core makes
every one of them contend. Set before torch is imported anywhere, and inherited by
child processes (launched trainers, `layerscope demo`).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
