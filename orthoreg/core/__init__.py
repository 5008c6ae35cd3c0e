"""What every wing of orthoreg stands on, and nothing of orthoreg's own above it: finding decoder layers and
capturing their hidden states (``capture``), the reference forward (``reference``), facts about PEFT/Conv1D layers
(``layers``), named orthonormal bases and their files (``bases``, ``hub``), built-in prompts and data files
(``prompts``, ``datafiles``, ``prompt_encoding``, ``activations``), DeepSpeed ZeRO-3 registration (``zero3``) and rank
statistics (``rank_correlation``).
"""
