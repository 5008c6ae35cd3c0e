import os

import torch

# One thread: the testbed's tiny matmuls gain nothing from a second one, and on a shared 2-core machine
# two OpenMP threads measured ~10x slower per fine-tuning step than one (barrier waits under load).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
