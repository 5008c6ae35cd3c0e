"""The activation regulariser: hooks on the guarded decoder layers and the penalties of each forward.

- ``regularizer``: ``OrthoRegularizer``, attached by both front doors (the callback and ``OrthoLoRA``);
- ``activation_terms``: the covariance and projection terms of one forward (``ForwardSession``);
- ``base_statistics``: the base model's recorded statistics (the ``base_mean`` anchor r, base units) and ``calibrate``;
- ``health``: the once-per-step finiteness / conditioning check;
- ``metrics``: the one metric vocabulary (``orthoreg/…`` keys) both front doors log.
"""
