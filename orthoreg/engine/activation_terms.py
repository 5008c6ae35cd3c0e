r"""The activation terms of ``OrthoRegularizer``: the covariance and projection penalties of one forward.

For the guarded layers ℓ (``config.layers``), h_ℓ the layer's output at the selected tokens x (``config.mask``; the
token rows are selected once per forward and shared by every layer and term), in float32 whatever the training
dtype (autocast off):

.. math::
    P = w(t)\sum_{\ell}\Big(\lambda_{cov}\,\frac{\mathrm{cov}(h_\ell)}{c_\ell}
        + \lambda_{proj}\,\frac{\mathrm{mean}_x \|U_\ell x - a_\ell\|^2}{p_\ell}\Big)

- cov(h) = (1/d) Σ_{i≠j} C_ij² with C = X_cᵀX_c/(N−1) the covariance of the N selected rows, d the hidden size
  (``covariance.covariance_penalty``; exactly 0 below two rows);
- the projection term only on layers with directions U_ℓ (k, d); the anchor a_ℓ is 0 (``anchor="absolute"``), the
  recorded base mean r_ℓ = mean_x U_ℓ x_base (``"base_mean"``), or U_ℓ x_ref of the same token with the adapter
  disabled (``"paired"``); ``one_sided`` keeps only max(e_j, 0)² of e = U_ℓ x − a_ℓ
  (``penalties.projection_from_index``);
- c_ℓ, p_ℓ = 1 with ``units="absolute"``; with ``units="base"`` the base model's own value of the term at layer ℓ times
  the number of layers carrying it (``_base_unit``), so each term is a mean over layers of a ratio to the base;
- w(t) the warm-up factor; with ``gather=True`` each rank's token mean is scaled by W·n_r/N so DDP's averaging
  yields the global-batch token mean (``_global_token_share``).

A non-finite or ill-conditioned term is gated in the graph and checked by the regulariser's ``check`` policy
(``orthoreg.engine.health``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..terms.penalties import (
    all_reduce_sum,
    covariance_and_condition,
    data_parallel_world,
    no_autocast,
    projection_from_index,
    selected_index,
)

__all__ = ["ActivationTerms", "ForwardSession"]


@dataclass
class ForwardSession:
    active: bool
    mask: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    # anchor="paired": per guarded layer with directions, U x_ref of every token, (B·T, k) float32 (not the
    # (B, T, d) reference activations: the projection needs only these coordinates). Subclasses (LDIFS) may store
    # reference hidden states here instead.
    reference: dict[int, torch.Tensor] | None = None
    index: torch.Tensor | None = None  # flat indices of the selected tokens (None: all), computed once per forward
    index_ready: bool = False
    token_share: float | torch.Tensor | None = None  # gather=True: W·n_r/N (see ActivationTerms._global_token_share)



class ActivationTerms:
    """The math of ``OrthoRegularizer`` (a mixin: it reads ``config``, ``directions``, ``directions_on``,
    ``layer_indices``, ``base_mean``, ``health``, ``step`` and ``metrics`` of the regulariser)."""

    def _selected_index(self, session: ForwardSession, h: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the session's selected tokens, computed once per forward and shared by every layer and
        term (``None`` when all tokens count)."""
        if not session.index_ready:
            mask = session.mask
            if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
                raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
            session.index = selected_index(None if mask is None else mask.to(h.device))
            session.index_ready = True
        index = session.index
        if index is not None and index.device != h.device:  # layers on several devices (pipeline / device_map)
            index = index.to(h.device)
        return index

    def _penalty(self, session: ForwardSession) -> torch.Tensor | None:
        cfg = self.config
        mask = session.mask
        # Normally the first micro-batch(es) of step 0; later only when those held NaN/Inf under "skip".
        calibrating = cfg.base_statistics_needed and self.base_mean.calibrating(self.step)
        base_units = cfg.units == "base"
        calibrated = True
        total = None
        values: dict[str, torch.Tensor] = {}
        for index in self.layer_indices:
            h = session.captured[index]
            if mask is not None and mask.device != h.device:
                mask = mask.to(h.device)
            rows = self._selected_index(session, h)
            terms = []
            if cfg.cov_weight > 0:
                cov, condition = covariance_and_condition(h, rows, gather=cfg.gather)
                self.health.record_condition(f"cov/layer_{index}", condition)
                if base_units:
                    if calibrating:
                        calibrated = self.base_mean.record_covariance(index, cov) and calibrated
                    cov = cov / self._base_unit("cov", index)
                values[f"cov/layer_{index}"] = cov.detach()
                terms.append(cfg.cov_weight * cov)
            if cfg.proj_weight > 0 and self.directions is not None and index in self.directions:
                u = self.directions_on(index, h.device)
                recorded = not calibrating or self.base_mean.record(index, h, mask, u, self.step)
                calibrated = calibrated and recorded
                if recorded:  # else this micro-batch was not finite: no base statistics yet, no projection term
                    proj = self._projection(session, index, h, rows, u)
                    if base_units:
                        proj = proj / self._base_unit("proj", index)
                    values[f"proj/layer_{index}"] = proj.detach()
                    terms.append(cfg.proj_weight * proj)
            for term in terms:
                total = term if total is None else total + term
        if calibrating and calibrated:
            self.base_mean.batches_seen += 1
        if total is None:
            return None
        total, keep = self.health.gate(total, values)
        weighted = total * cfg.warmup_factor(self.step)
        self._accumulate_metrics({k: v * keep for k, v in values.items()}, weighted.detach(), keep)
        return weighted

    def _projection(self, session: ForwardSession, index: int, h: torch.Tensor, rows: torch.Tensor | None,
                    u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        reference = None
        if cfg.anchor == "base_mean":
            if index not in self.base_reference:
                raise RuntimeError(
                    f"no recorded base projection for layer {index}: calibration ran before this layer was "
                    "guarded, or a resumed run lost its orthoreg state. Call calibrate() before training, "
                    "or resume from a checkpoint written with orthoreg attached."
                )
            reference = self.base_reference[index]
            if reference.device != h.device:
                reference = self.base_reference[index] = reference.to(h.device)
        elif cfg.anchor == "paired":
            reference = session.reference[index].to(h.device)
            if rows is not None:
                reference = reference.index_select(0, rows)
        proj = projection_from_index(h, u, rows, reference, one_sided=cfg.one_sided)
        if cfg.gather:
            proj = proj * self._global_token_share(session, h, rows)
        return proj

    def _base_unit(self, term: str, index: int) -> float:
        """The divisor of ``term`` at layer ``index`` with ``units="base"`` (a mean over the layers carrying it)."""
        if term == "cov":
            layers = len(self.layer_indices)
        else:
            layers = sum(1 for i in self.layer_indices if self.directions is not None and i in self.directions)
        return self.base_mean.unit(term, index) * layers

    @torch.no_grad()
    def _global_token_share(self, session: ForwardSession, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """W·n_r/N for ``gather=True``: turns this rank's token mean into its share of the global-batch token mean
        (Σ_ranks Σ_tokens / N, N the selected tokens of all ranks), so that DDP's gradient averaging (÷W) yields the
        gradient of the global mean, and the ranks' logged values average to it. One all-reduce per forward, kept
        on the device (no host sync)."""
        if session.token_share is None:
            world = data_parallel_world()
            n_local = h.shape[0] * h.shape[1] if rows is None else rows.numel()
            if world == 1:
                session.token_share = 1.0
            else:
                n_all = all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float32, device=h.device))[0]
                session.token_share = torch.where(n_all > 0, world * n_local / n_all.clamp_min(1.0),
                                                  torch.zeros((), device=h.device))
        return session.token_share

    def _reference_coordinates(self, index: int, h_ref: torch.Tensor) -> torch.Tensor | None:
        """U_ℓ x_ref for every token of the reference activations, (B·T, k) float32; ``None`` without directions."""
        if self.directions is None or index not in self.directions:
            return None
        u = self.directions_on(index, h_ref.device)
        with no_autocast(h_ref.device):
            return h_ref.reshape(-1, h_ref.shape[-1]).float() @ u.T
