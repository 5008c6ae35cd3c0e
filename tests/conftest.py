"""Every test runs offline: nothing may reach a model or dataset hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# Tiny models are dominated by thread start-up, not arithmetic: one intra-op thread is faster and steadier.
torch.set_num_threads(1)
