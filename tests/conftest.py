"""Every test runs offline: nothing may reach a model or dataset hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# Tiny models are dominated by thread start-up, not arithmetic: one intra-op thread is faster and steadier.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts with the process state a fresh process would have. transformers 4.57's
    ``TrainingArguments(bf16=True)`` writes ``ACCELERATE_MIXED_PRECISION=bf16`` into ``os.environ`` (and never resets
    it), and accelerate keeps a process-wide ``AcceleratorState``: without this, one bf16 test puts every later
    Trainer of the process under bf16 autocast, and their float32 gradient comparisons fail by bf16 rounding."""
    environ = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        if key not in environ:
            del os.environ[key]
    os.environ.update(environ)
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
