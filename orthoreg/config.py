"""``OrthoRegConfig``: which layers are guarded, how strongly, and against what anchor.

The dataclass is the one schema of orthoreg's settings: Python code builds it directly, ``HfArgumentParser`` /
``TrlParser`` read it from a command line (``orthoreg sft``), and the Hydra recipes validate their ``reg.orthoreg``
node against it. Fields are grouped under comment headings (what is guarded, the weights, the projection's anchor,
tokens and schedule, distributed, diagnostics); a new option is one more ``field(..., metadata={"help": ...})`` in
its group, with its check in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .core.capture import MASK_POLICIES, resolve_layers

Anchor = Literal["absolute", "base_mean", "paired"]
Mask = Literal["attention", "labels", "prompt_end"]
NonfinitePolicy = Literal["raise", "skip"]
Units = Literal["absolute", "base"]
ANCHORS: tuple[str, ...] = get_args(Anchor)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonfinitePolicy)
UNITS: tuple[str, ...] = get_args(Units)
# λ_proj of ``OrthoRegConfig.activation_projection`` (base-model units): the projection penalty's starting point.
RECOMMENDED_PROJ_WEIGHT = 0.1
# λ_reader of ``OrthoRegConfig.recommended`` (base-model units): the template-reader constraint at the strength that
# pushes as hard as the defence benchmark's λ = 0.05 (absolute): equal gradient norm at a plain fine-tune's adapter
# (SmolLM2-135M, identity_shift seed 0, 203 modules: 4956 → 5000; scripts/match_reader_weight.py,
# benchmarks/reader_weight_match.json). The base-units term is a mean of relative changes ‖ΔW_m V_mᵀ‖²/‖W₀,m V_mᵀ‖²,
# so λ is large: a 1 % relative change of every module's read-out costs λ·1e-4 = 0.5.
RECOMMENDED_READER_WEIGHT = 5000.0
# The live harm signal in recommended(): a reading every 10 optimizer steps (its cost against the step time:
# scripts/bench_harm_signal.py, benchmarks/harm_signal_cost.json).
RECOMMENDED_HARM_SIGNAL_EVERY = 10
# λ_anchor of ``OrthoRegConfig.recommended()``: the anchor KL on the built-in harmless requests, at the λ chosen on
# howto_steps seed 0 (benchmarks/defences_summary/PLAN.md, amendment 8) and confirmed on fresh seeds of four eroding
# tasks (amendments 11-12, benchmarks/README_defences_summary.md).
RECOMMENDED_ANCHOR_KL_WEIGHT = 0.3
# The anchor sets ``anchor_kl_prompts`` names (``orthoreg.anchor.prompts.BUILTIN_ANCHORS``).
ANCHOR_KL_SETS = ("harmless", "harmful")
# ``input_subspaces="builtin"``: V_m recorded at train start from orthoreg's built-in harmless requests.
BUILTIN_SUBSPACES = "builtin"
assert set(get_args(Mask)) == set(MASK_POLICIES), "OrthoRegConfig.mask and capture.MASK_POLICIES disagree"

# A layer selection as Python code gives it (an index, a list, a named range, a fraction slice) or as a command line
# gives it (the same written as text: "1", "1,3", "-1", "middle_third", "2/3:"). ``None`` is in the union only so
# that ``HfArgumentParser`` reads the flag as text (it keeps the ``str`` member of an Optional union); it is refused.
LayerSelection = int | str | list[int | str] | None

_INTEGER = re.compile(r"[+-]?\d+")
_SELECTION_PROBE_DEPTH = 12  # any depth works to check the syntax of a named range / fraction slice


def parse_layer_selection(value: Any) -> int | str | list[int | str]:
    """Normalises a layer selection: text from a command line becomes the Python form ``resolve_layers`` takes.

    ``"1"`` → ``1``, ``"-1"`` → ``-1``, ``"1,3"`` (or ``"[1, 3]"``) → ``[1, 3]``, ``"middle_third"`` and
    ``"2/3:"`` stay as they are, ``"0,last_third"`` → ``[0, "last_third"]``. Ints, lists and tuples pass through
    (list items are normalised the same way). The syntax of named ranges and fraction slices is checked here; the
    indices are checked against the model when the regulariser attaches.

    Raises:
        ValueError: empty text, a bool, an unknown name or an unparseable slice (the message lists the forms).
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"`layers` must be an index, a list of indices or a named range; got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("`layers` is an empty list; give at least one layer (or a named range such as 'all')")
        items = [parse_layer_selection(item) for item in value]
        return [x for item in items for x in (item if isinstance(item, list) else [item])]
    if not isinstance(value, str):
        raise ValueError(f"`layers` must be an int, a str or a list of those; got {type(value).__name__} {value!r}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [part.strip().strip("'\"") for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise ValueError(f"`layers` {value!r} has an empty entry; write e.g. '1', '1,3', '-1', 'middle_third' or "
                         "'2/3:'")
    items: list[int | str] = []
    for part in parts:
        if _INTEGER.fullmatch(part):
            items.append(int(part))
            continue
        try:
            resolve_layers(part, _SELECTION_PROBE_DEPTH)
        except ValueError as err:
            raise ValueError(f"`layers` {value!r}: {err}") from err
        items.append(part)
    return items[0] if len(items) == 1 else items


@dataclass
class OrthoRegConfig:
    """Configuration of the orthoreg regulariser.

    The total loss is ``task_loss + w(t) · (cov_weight · Σ_ℓ cov(h_ℓ) + proj_weight · Σ_ℓ proj(h_ℓ)
    [+ lora_weight · Σ lora_proj] [+ reader_weight · Σ_m reader(m)]) [+ anchor_kl_weight · AKL]`` where ℓ ranges
    over ``layers``, w(t) is the warm-up factor and AKL the anchor KL of the optimizer step's anchor batch
    (``orthoreg.anchor.term``, once per optimizer step, no warm-up).

    Every field carries a help text, so ``HfArgumentParser(OrthoRegConfig)`` makes a command line of it
    (``--layers 1,3 --proj_weight 0.5 --anchor paired``); ``orthoreg sft`` offers the same fields as
    ``--orthoreg_<field>``.

    Args:
        layers (`int | str | list`, *optional*, defaults to `"middle_third"`):
            Decoder layers to guard: an index, a negative index, a list, a named range (``"last_third"``,
            ``"all"``, …) or a fraction slice ``"a:b"``; on a command line the same written as text (``"1"``,
            ``"1,3"``, ``"-1"``, ``"2/3:"``). See ``orthoreg.core.capture.resolve_layers``.
        cov_weight (`float`, *optional*, defaults to `0.0`): λ_cov, weight of the off-diagonal covariance penalty.
        proj_weight (`float`, *optional*, defaults to `1.0`): λ_proj, weight of the projection penalty; needs
            harmful directions.
        lora_weight (`float`, *optional*, defaults to `0.0`): λ_lora, weight of the LoRA weight-space penalty
            (``OrthoLoRA`` only; always absolute: ΔW starts at 0, so it has no base value).
        reader_weight (`float`, *optional*, defaults to `0.0`): λ_reader, weight of the reader-side weight penalty
            Σ_m ‖ΔW_m V_mᵀ‖²_F over the modules of the input subspaces (``orthoreg.terms.reader``): LoRA
            s²‖B(AV_mᵀ)‖², full fine-tuning ‖W_mV_mᵀ − W₀V_mᵀ‖².
        input_subspaces (`str`, *optional*, defaults to `"builtin"`): where the reader term's V_m come from when
            ``reader_weight > 0`` and no ``InputSubspaces`` object is passed to the front door: ``"builtin"`` —
            recorded when training starts, on the model as it is before any update (a PEFT adapter switched off),
            from orthoreg's 200 built-in harmless requests at the chat template's assistant-turn positions (the
            template-reader constraint, ``orthoreg.reader.template``), then saved with the run; or a path / Hub repo
            id of saved ``InputSubspaces``.
        reader_k (`int`, *optional*, defaults to `16`): directions per module of ``"builtin"`` subspaces.
        reader_targets (`list[str]`, *optional*): module name suffixes (``q_proj``, ``down_proj``, …) of
            ``"builtin"`` subspaces; default: every linear module after the first decoder layer that trains (the
            LoRA-adapted ones under PEFT).
        anchor_kl_weight (`float`, *optional*, defaults to `0.0`): λ_anchor, weight of the anchor KL — the base's
            first ``anchor_kl_tokens`` greedy reply tokens to anchor requests held by KL(π_θ ‖ π_base), recorded at
            train start (``orthoreg.anchor``); ``OrthoRegCallback`` only (one process or DDP).
        anchor_kl_prompts (`str`, *optional*, defaults to `"harmless"`): the anchor requests: ``"harmless"``
            (orthoreg's 200 built-in harmless requests: no harm data), ``"harmful"`` (their harmful partners) or
            the path of a ``.json`` list of requests.
        anchor_kl_tokens (`int`, *optional*, defaults to `4`): reply tokens held per anchor.
        anchor_kl_batch_size (`int`, *optional*, defaults to `8`): anchors per optimizer step (and rank).
        units (`str`, *optional*, defaults to `"absolute"`): ``"absolute"`` — the terms as written, summed over
            guarded layers (modules); ``"base"`` — each term in its base model's units, averaged over the guarded
            layers (modules): proj_ℓ / E_base‖U_ℓx − r_ℓ‖², cov_ℓ / cov_ℓ(calibration batch) and
            reader(m) / ‖W₀,m V_mᵀ‖²_F, so that a λ carries across models (``OrthoRegConfig.recommended()``).
        anchor (`str`, *optional*, defaults to `"base_mean"`): origin of the projection penalty:
            ``"absolute"`` (‖Ux‖²), ``"base_mean"`` (‖Ux − r‖², r = the base model's mean projection recorded on
            the first ``calibration_batches`` micro-batches, before any update), or ``"paired"`` (‖U(x − x_ref)‖²,
            x_ref from the same model with its PEFT adapter disabled; costs one extra no-grad forward per step).
        one_sided (`bool`, *optional*, defaults to `False`): penalise only movement toward the harmful side.
        mask (`str`, *optional*, defaults to `"attention"`): tokens that count: ``"attention"`` (non-padding)
            ``"labels"`` (non-padding tokens whose label is not -100) or ``"prompt_end"`` (one token per row: the
            last prompt token before the first label, where a chat model decides how to answer; needs
            completion-only labels).
        warmup_steps (`int`, *optional*, defaults to `0`): optimizer steps over which w(t) ramps linearly from
            1/warmup_steps to 1 (w = 1 from then on; w = 1 throughout when 0).
        gather (`bool`, *optional*, defaults to `False`): both terms become statistics of the global batch across
            data-parallel ranks: the covariance of every rank's rows (a differentiable all-gather per guarded layer
            per micro-batch) and the projection's mean over every rank's tokens (one scalar all-reduce per
            micro-batch). Without it each rank's terms use its own tokens.
        calibration_batches (`int`, *optional*, defaults to `1`): micro-batches of the first optimizer step used
            to record r for ``anchor="base_mean"`` — over every data-parallel rank's tokens, so all ranks (and a
            resumed run) share one r; at most the gradient-accumulation steps, so r is recorded
            before any update.
        per_layer_metrics (`bool`, *optional*, defaults to `False`): also log ``orthoreg/cov/layer_i`` etc.
        layers_path (`str`, *optional*): dotted path of the decoder-layer ``ModuleList`` for architectures the
            structural search does not recognise.
        on_nonfinite (`str`, *optional*, defaults to `"raise"`): a NaN/Inf penalty raises an error naming the
            layer (``"raise"``) or is dropped for that micro-batch with a warning (``"skip"``); it never reaches
            the weights.
    """

    # ---- what is guarded
    layers: LayerSelection = field(default="middle_third", metadata={
        "help": "Decoder layers to guard: an index ('1'), a negative index ('-1'), a comma list ('1,3'), a named "
                "range (all, first_half, last_half, first_third, middle_third, last_third) or a fraction slice "
                "('2/3:')."})
    # ---- weights (λ) of the terms
    cov_weight: float = field(default=0.0, metadata={
        "help": "λ_cov, weight of the off-diagonal covariance penalty (0 turns the term off)."})
    proj_weight: float = field(default=1.0, metadata={
        "help": "λ_proj, weight of the projection penalty onto the harmful directions (needs directions)."})
    lora_weight: float = field(default=0.0, metadata={
        "help": "λ_lora, weight of the LoRA weight-space penalty (OrthoLoRA in a custom loop only)."})
    reader_weight: float = field(default=0.0, metadata={
        "help": "λ_reader, weight of the reader-side weight penalty Σ_m ‖ΔW_m V_mᵀ‖² (full fine-tuning and LoRA)."})
    input_subspaces: str = field(default=BUILTIN_SUBSPACES, metadata={
        "help": "The reader term's input subspaces V_m: 'builtin' (recorded at train start on the model before any "
                "update, from orthoreg's built-in harmless requests at the chat template's assistant-turn positions, "
                "and saved with the run), or a .safetensors file, save_pretrained folder or Hub repo id of "
                "InputSubspaces (`orthoreg subspaces extract`)."})
    reader_k: int = field(default=16, metadata={"help": "Directions per module of 'builtin' input subspaces."})
    reader_targets: list[str] | None = field(default=None, metadata={
        "help": "Module name suffixes of 'builtin' input subspaces (e.g. q_proj v_proj); default: every linear "
                "module after the first decoder layer that trains (the LoRA-adapted ones)."})
    anchor_kl_weight: float = field(default=0.0, metadata={
        "help": "λ_anchor, weight of the anchor KL: the base's first reply tokens to anchor requests, recorded at "
                "train start, held by KL (0 turns it off; one process or DDP)."})
    anchor_kl_prompts: str = field(default="harmless", metadata={
        "help": "The anchor KL's requests: harmless (orthoreg's 200 built-in harmless requests), harmful (their "
                "harmful partners) or the path of a .json list of requests."})
    anchor_kl_tokens: int = field(default=4, metadata={"help": "Reply tokens of the base held per anchor request."})
    anchor_kl_batch_size: int = field(default=8, metadata={"help": "Anchor requests per optimizer step (and rank)."})
    units: Units = field(default="absolute", metadata={
        "help": "Units of the terms: absolute (the formulas as written) or base (each term divided by its "
                "base-model value and averaged: the projection by the base variance of Uh, the covariance by its "
                "value on the calibration batch, each module's reader term by ‖W₀V_mᵀ‖² — so one λ means the same "
                "on any model).",
        "choices": UNITS})
    # ---- origin of the projection term
    anchor: Anchor = field(default="base_mean", metadata={
        "help": "Origin of the projection: absolute (‖Uh‖²), base_mean (‖Uh − r‖², r = the base model's mean "
                "projection, recorded before any update) or paired (‖U(h − h_base)‖², h_base with the PEFT adapter "
                "off; one extra no-grad forward per step).", "choices": ANCHORS})
    one_sided: bool = field(default=False, metadata={
        "help": "Penalise only movement toward the harmful side of the directions."})
    # ---- tokens and schedule
    mask: Mask = field(default="attention", metadata={
        "help": "Tokens that count: attention (every non-padding token), labels (tokens whose label is not -100) "
                "or prompt_end (each row's last prompt token; needs completion-only labels).",
        "choices": get_args(Mask)})
    warmup_steps: int = field(default=0, metadata={
        "help": "Optimizer steps over which the penalty's weight ramps linearly up to 1 (0: full weight at once)."})
    calibration_batches: int = field(default=1, metadata={
        "help": "Micro-batches of the first optimizer step that record r for anchor=base_mean (at most the "
                "gradient-accumulation steps)."})
    # ---- data parallel
    gather: bool = field(default=False, metadata={
        "help": "Compute both terms over the global batch of every data-parallel rank (covariance all-gather, "
                "projection all-reduce) instead of each rank's own tokens."})
    # ---- diagnostics and escape hatches
    harm_signal_every: int | None = field(default=None, metadata={
        "help": "Log the live harm signal (orthoreg/harm_margin…: the refusal margin at the first reply token of 16 "
                "built-in held-out harmful requests and their harmless partners, one no-grad forward, no "
                "generation) every this many optimizer steps; needs a chat template. 0 or None: off."})
    per_layer_metrics: bool = field(default=False, metadata={
        "help": "Also log orthoreg/cov/layer_i and orthoreg/proj/layer_i."})
    layers_path: str | None = field(default=None, metadata={
        "help": "Dotted path of the decoder-layer ModuleList, for architectures the structural search does not "
                "find (e.g. model.transformer.h)."})
    on_nonfinite: NonfinitePolicy = field(default="raise", metadata={
        "help": "A NaN/Inf penalty raises an error naming the layer (raise) or is dropped for that micro-batch "
                "with a warning (skip).", "choices": NONFINITE_POLICIES})

    def __post_init__(self) -> None:
        self.layers = parse_layer_selection(self.layers)
        for name in ("cov_weight", "proj_weight", "lora_weight", "reader_weight", "anchor_kl_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 \
                    or value == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}")
            setattr(self, name, float(value))
        if not any((self.cov_weight, self.proj_weight, self.lora_weight, self.reader_weight, self.anchor_kl_weight)):
            raise ValueError(
                "every weight of OrthoRegConfig is zero (`cov_weight`, `proj_weight`, `lora_weight`, "
                "`reader_weight`, `anchor_kl_weight`), so the regulariser would do nothing; set at least one of them > 0"
            )
        if not isinstance(self.anchor_kl_prompts, str) or not (
                self.anchor_kl_prompts in ANCHOR_KL_SETS or self.anchor_kl_prompts.endswith(".json")):
            raise ValueError(f"`anchor_kl_prompts` must be one of {ANCHOR_KL_SETS} or the path of a .json list of "
                             f"requests; got {self.anchor_kl_prompts!r}")
        for name in ("anchor_kl_tokens", "anchor_kl_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1; got {value!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"`anchor` must be one of {ANCHORS}; got {self.anchor!r}")
        if self.mask not in MASK_POLICIES:
            raise ValueError(f"`mask` must be one of {MASK_POLICIES}; got {self.mask!r}")
        if self.units not in UNITS:
            raise ValueError(f"`units` must be one of {UNITS}; got {self.units!r}")
        if not isinstance(self.input_subspaces, str) or not self.input_subspaces:
            raise ValueError(f"`input_subspaces` must be 'builtin' or a path / Hub repo id; got {self.input_subspaces!r}")
        if isinstance(self.reader_k, bool) or not isinstance(self.reader_k, int) or self.reader_k < 1:
            raise ValueError(f"`reader_k` must be an int >= 1; got {self.reader_k!r}")
        if self.reader_targets is not None:
            if isinstance(self.reader_targets, str):
                self.reader_targets = [s.strip() for s in self.reader_targets.split(",") if s.strip()]
            if not self.reader_targets or not all(isinstance(s, str) and s for s in self.reader_targets):
                raise ValueError(f"`reader_targets` must be module name suffixes (e.g. ['q_proj', 'v_proj']); got "
                                 f"{self.reader_targets!r}")
            self.reader_targets = list(self.reader_targets)
        if self.harm_signal_every is not None and (isinstance(self.harm_signal_every, bool) or not isinstance(
                self.harm_signal_every, int) or self.harm_signal_every < 0):
            raise ValueError(f"`harm_signal_every` must be an int >= 1 (optimizer steps), or 0 / None (off); got "
                             f"{self.harm_signal_every!r}")
        if self.harm_signal_every == 0:  # a command line's way to say None
            self.harm_signal_every = None
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`on_nonfinite` must be one of {NONFINITE_POLICIES}; got {self.on_nonfinite!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {self.warmup_steps!r}")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be an int >= 1; got {self.calibration_batches!r}")

    @classmethod
    def recommended(cls, **overrides: Any) -> OrthoRegConfig:
        """The setting the defence benchmark supports: the template-reader constraint and the anchor KL, no harm data.

        The reader-side weight term keeps each trained module from changing how it reads the chat template's
        assistant-turn positions (V_m from ``input_subspaces="builtin"``, recorded when training starts), λ_reader =
        ``RECOMMENDED_READER_WEIGHT`` in base-model units (each module's change relative to its base read-out,
        averaged over modules, so one λ means the same on any model size). The anchor KL holds the base's first
        four reply tokens to orthoreg's 200 built-in harmless requests (``orthoreg.anchor``), λ_anchor =
        ``RECOMMENDED_ANCHOR_KL_WEIGHT``. No activation term, no directions.

        Measured on SmolLM2-135M-Instruct (``benchmarks/README_defences_summary.md``): the reader term alone keeps
        30-95 % of the rise in harmful compliance that benign fine-tunes cause; with the anchor KL beside it at most
        10 % is kept on every eroding task measured, held-out tasks included — generically (harmless anchors hold
        like harmful ones). The anchor KL runs in one process or under DDP; under DeepSpeed ZeRO / FSDP pass
        ``anchor_kl_weight=0``. ``OrthoRegConfig.activation_projection()`` is the projection onto harmful directions.
        The live harm signal (``harm_signal_every``) is logged every 10 steps: the probe costs one no-grad forward
        of 32 short prompts per reading (``scripts/bench_harm_signal.py``) and never changes training.

        Example:
            >>> trainer = Trainer(..., processing_class=tokenizer,
            ...                   callbacks=[OrthoRegCallback(OrthoRegConfig.recommended())])
        """
        settings = dict(proj_weight=0.0, cov_weight=0.0, reader_weight=RECOMMENDED_READER_WEIGHT, units="base",
                        input_subspaces=BUILTIN_SUBSPACES, harm_signal_every=RECOMMENDED_HARM_SIGNAL_EVERY,
                        anchor_kl_weight=RECOMMENDED_ANCHOR_KL_WEIGHT, anchor_kl_prompts="harmless")
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def activation_projection(cls, layers: Any = "middle_third", **overrides: Any) -> OrthoRegConfig:
        """The projection of the guarded layers' activations onto harmful directions, anchored to the base model's
        mean (``base_mean``), in base-model units, λ_proj = 0.1 (the penalty starts at about 0.1 per micro-batch
        whatever the model). Needs harmful directions. Measured: it protects in the toy world (82 % of the harmful
        rise removed vs a random-direction placebo's 45 %) but ties its placebo on SmolLM2-135M, where benign
        fine-tunes erode refusal without moving along the refusal direction (README)."""
        settings = dict(layers=layers, proj_weight=RECOMMENDED_PROJ_WEIGHT, cov_weight=0.0, anchor="base_mean",
                        units="base")
        settings.update(overrides)
        return cls(**settings)

    @property
    def uses_builtin_subspaces(self) -> bool:
        """Whether the front door records V_m itself when training starts (``input_subspaces="builtin"``)."""
        return self.reader_weight > 0 and self.input_subspaces == BUILTIN_SUBSPACES

    @property
    def base_statistics_needed(self) -> bool:
        """Whether the regulariser records base statistics before the first update."""
        activation_terms = self.proj_weight > 0 or self.cov_weight > 0
        return (self.anchor == "base_mean" and self.proj_weight > 0) or (self.units == "base" and activation_terms)

    @property
    def needs_directions(self) -> bool:
        return self.proj_weight > 0 or self.lora_weight > 0

    def warmup_factor(self, step: int) -> float:
        """w(t) for optimizer step t (0-based): linear from 1/warmup_steps up to 1."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrthoRegConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OrthoRegConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)
