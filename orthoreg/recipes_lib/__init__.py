"""Pipeline pieces of the Hydra recipes (``orthoreg.train``), one concept per module:

- ``config``: the ``recipes/`` tree, group options, override checks;
- ``launch``: launcher checks, one run directory for all ranks, rank-0 I/O, clean exit;
- ``models``: Hub/local/GGUF/tiny models and weightless skeletons;
- ``data``: task datasets (Hub with local-file override, toy world);
- ``directions``: harmful directions for a run (extract once, or load);
- ``regs``: the regulariser as Trainer callbacks (none, orthoreg presets, baselines);
- ``training``: LoRA/full fine-tuning through TRL's SFTTrainer;
- ``generation``: batched, seeded answer sampling across ranks;
- ``evaluation``: evaluation plugins (LLM judge, classifier, toy scorer); ``judge`` and ``classifier`` their scorers;
- ``dry_run``: build and validate everything but the weights;
- ``results``: results JSON, table rows, the assembled table.

Heavy libraries are imported inside functions, so importing a module here is cheap.
"""

from .errors import RecipeError

__all__ = ["RecipeError"]
