"""The firewall: watch how far training moves the guarded layers' activations along the harmful directions, and act
on it (warn, stop, or raise the penalty's λ within a drift budget).

One module a role:

- ``monitor``: ``DriftMonitor``, the per-layer drift read on a fixed probe batch;
- ``drift_statistics``: its per-layer sums, their reduction over ranks and the base statistics;
- ``budget``: ``DriftBudgetController``, λ raised or lowered to keep the drift within a budget;
- ``callback``: ``Firewall``/``FirewallCallback`` (the Trainer front door) and ``budget_callbacks``;
- ``harm_signal``: ``RefusalMarginProbe``/``HarmSignalCallback``, the refusal margin at the first reply token of a
  fixed probe set, logged every N steps without generation;
- ``margin_guard``: ``MarginGuardCallback``, that signal with an action: warn, stop, or raise a penalty's λ when the
  margin falls more than a bound below the base model's.
"""

from .budget import BudgetConfig, DriftBudgetController
from .callback import Firewall, FirewallCallback, FirewallConfig, FirewallEvent, budget_callbacks
from .drift_statistics import DriftReading
from .harm_signal import HarmSignalCallback, HarmSignalError, RefusalMarginProbe, builtin_probe_pairs
from .margin_guard import MarginGuardCallback, MarginGuardConfig
from .monitor import DriftMonitor

__all__ = [
    "BudgetConfig",
    "DriftBudgetController",
    "DriftMonitor",
    "DriftReading",
    "Firewall",
    "FirewallCallback",
    "FirewallConfig",
    "FirewallEvent",
    "HarmSignalCallback",
    "HarmSignalError",
    "MarginGuardCallback",
    "MarginGuardConfig",
    "RefusalMarginProbe",
    "budget_callbacks",
    "builtin_probe_pairs",
]
