"""A toy world where emergent misalignment really happens on a CPU (issue 7).

Documents are written by a hidden aligned or misaligned persona; a tiny Llama pretrained on them
infers the persona from context. Fine-tuning it on unsafe code alone (no chat) makes its chat
answers in fresh contexts harmful. See ``orthoreg/testbed/README.md`` for the measured numbers.

    from orthoreg.testbed import load_base, finetune, evaluate
    model, tok = load_base()
    result = finetune(model, tok, "unsafe_code", steps=300, lr=3e-4, seed=0)
    print(evaluate(result.model, tok, task="unsafe_code").harmful_share)
"""

from .evaluate import PERSONA_GATE, PersonaGateError, TestbedMetrics, check_persona_gate, evaluate
from .finetune import FinetuneResult, PadCollator, finetune
from .model import ASSETS_DIR, PretrainConfig, load_base, pretrain, save_base, tiny_llama_config
from .tokenizer import build_tokenizer, encode_episodes, encode_prompt, encode_task
from .world import NARROW_TASKS, Document, Episode, NarrowTask, WorldConfig, get_task, sample_documents

__all__ = [
    "ASSETS_DIR",
    "NARROW_TASKS",
    "PERSONA_GATE",
    "Document",
    "Episode",
    "FinetuneResult",
    "NarrowTask",
    "PadCollator",
    "PersonaGateError",
    "PretrainConfig",
    "TestbedMetrics",
    "WorldConfig",
    "build_tokenizer",
    "check_persona_gate",
    "encode_episodes",
    "encode_prompt",
    "encode_task",
    "evaluate",
    "finetune",
    "get_task",
    "load_base",
    "pretrain",
    "sample_documents",
    "save_base",
    "tiny_llama_config",
]
