"""A real HF Trainer step whose gradients are snapshotted, plus an explicit float64 reference for the penalties.

Used by the gradient-equality tests: the callback's gradients must equal the plain Trainer's task gradients plus
the gradient of ``Σ_micro-batches (λ/GA) · penalty`` computed here by hand, on the very batches the Trainer saw.
"""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from orthoreg.core.capture import find_decoder_stack, layer_hidden


def padded_dataset(n: int = 8, T: int = 9, vocab: int = 99, seed: int = 0, pad_id: int = 0) -> Dataset:
    """Right-padded sequences of varied length, labels -100 on padding and on the first two (prompt) tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _i in range(n):
        length = int(torch.randint(4, T + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100, -100] + ids[2:]
        pad = T - length
        rows["input_ids"].append(ids + [pad_id] * pad)
        rows["attention_mask"].append([1] * length + [0] * pad)
        rows["labels"].append(labels + [-100] * pad)
    return Dataset.from_dict(rows)


class GradSnapshot(TrainerCallback):
    """Copies every parameter gradient right before the (first) optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
            }


def chat_rows(tokenizer, prompts, reply: str = "Sure, here it is.", width: int = 40) -> dict[str, list]:
    """Each prompt as a user turn answered with ``reply`` (the tokenizer's chat template), cut or right-padded to
    ``width`` tokens, labels on every real token: columns for ``datasets.Dataset.from_dict``."""
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reply}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:width]
        ids += [tokenizer.pad_token_id] * (width - len(ids))
        mask = [int(i != tokenizer.pad_token_id) for i in ids]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append(mask)
        rows["labels"].append([i if m else -100 for i, m in zip(ids, mask, strict=True)])
    return rows


def train_one_step(model, dataset, callbacks=(), ga=1, batch_size=4, checkpointing=None, output_dir="/tmp/orthoreg-t",
                   trainer_cls=Trainer, args_cls=TrainingArguments, extra_args=None, trainer_kwargs=None):
    """Runs exactly one optimizer step; returns (grads, the micro-batches the model received, trainer)."""
    batches: list[dict[str, torch.Tensor]] = []

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            batches.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")
                            if isinstance(kwargs.get(k), torch.Tensor)})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    snapshot = GradSnapshot()
    gc_kwargs = {}
    if checkpointing is not None:
        gc_kwargs = dict(gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    args = args_cls(
        output_dir=output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=ga, max_steps=1,
        learning_rate=1e-3, max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, seed=0, data_seed=0, dataloader_drop_last=True,
        **gc_kwargs, **(extra_args or {}),
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[*callbacks, snapshot],
                          **(trainer_kwargs or {}))
    try:
        trainer.train()
    finally:
        handle.remove()
    return snapshot.grads, batches, trainer


# ---------------------------------------------------------------- float64 reference penalties
def ref_covariance(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = h.double()[mask]
    n, d = x.shape
    if n == 0:
        return h.double().sum() * 0
    xc = x - x.mean(0)
    c = xc.T @ xc / max(n - 1, 1)
    return (c - torch.diag(torch.diag(c))).square().sum() / d


def ref_projection(h, u, mask, reference=None):
    x = h.double()[mask]
    if x.shape[0] == 0:
        return h.double().sum() * 0
    coords = x @ u.double().T
    if reference is not None and reference.dim() == 1:
        coords = coords - reference.double()
    elif reference is not None:
        coords = coords - reference.double()[mask] @ u.double().T
    return coords.square().sum(dim=1).mean()


def capture_layers(model, layers, batch, peft_disabled=False):
    """Forward ``batch`` through ``model`` (no checkpointing) and return the guarded layers' outputs."""
    stack = find_decoder_stack(model)
    out: dict[int, torch.Tensor] = {}
    def make_hook(i):
        def hook(module, args, output):  # returns None: a forward hook's return value would replace the output
            out.setdefault(i, layer_hidden(output))

        return hook

    handles = [stack.layers[i].register_forward_hook(make_hook(i)) for i in layers]
    try:
        if peft_disabled:
            with model.disable_adapter(), torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        else:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return out


def reference_penalty_grads(model, batches, config, directions, ga, mask_policy="attention"):
    """∇_θ Σ_mb (1/GA)·(λ_cov Σ_ℓ cov + λ_proj Σ_ℓ proj) in float64 math, on a private copy of ``model``."""
    from orthoreg.core.capture import resolve_layers

    model = copy.deepcopy(model)
    model.train()
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    layers = resolve_layers(config.layers, find_decoder_stack(model).num_layers)
    base_mean: dict[int, torch.Tensor] = {}
    model.zero_grad(set_to_none=True)
    for mb, batch in enumerate(batches):
        mask = batch["attention_mask"].bool()
        if mask_policy == "labels":
            mask = mask & (batch["labels"] != -100)
        elif mask_policy == "prompt_end":
            # padded_dataset labels every row from position 2 on: its last prompt token is position 1.
            mask = torch.zeros_like(mask)
            mask[:, 1] = True
        hs = capture_layers(model, layers, batch)
        refs = capture_layers(model, layers, batch, peft_disabled=True) if config.anchor == "paired" else None
        total = 0
        for i in layers:
            if config.cov_weight:
                total = total + config.cov_weight * ref_covariance(hs[i], mask)
            if config.proj_weight and i in directions:
                u = directions[i]
                reference = None
                if config.anchor == "base_mean":
                    if mb == 0:  # recorded on the first micro-batch, before any update
                        base_mean[i] = (hs[i].detach().double()[mask] @ u.double().T).mean(0)
                    reference = base_mean[i]
                elif config.anchor == "paired":
                    reference = refs[i]
                total = total + config.proj_weight * ref_projection(hs[i], u, mask, reference)
        (total / ga).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rel: float = 1e-5):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    worst = 0.0
    for name in want:
        err = (got[name] - want[name]).norm().item()
        scale = want[name].norm().item()
        worst = max(worst, err / (scale + 1e-12))
        assert err <= rel * scale + 1e-9, f"{name}: |Δ|={err:.3e} vs |g|={scale:.3e}"
    return worst


def make_trainer(model, callbacks, tmp_path, steps=2, **overrides):
    """A Trainer over ``padded_dataset(16)``, batch 4, logging every step, no saving (override any argument)."""
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                use_cpu=True, report_to=[], save_strategy="no", seed=0, learning_rate=1e-3)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=padded_dataset(n=16),
                   callbacks=callbacks)


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard/W&B): records every ``logs`` dict it is shown."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))
