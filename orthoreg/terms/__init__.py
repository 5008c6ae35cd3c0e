"""The loss terms as pure tensor functions (float32 math whatever the input dtype), each with its exact formula in
its docstring: covariance and projection penalties of hidden states (``penalties``, ``covariance``, ``token_rows``,
``distributed_rows``), the reader-side weight formulas (``reader``), and how a penalty enters the backward pass
(``injection``). Imports torch only.
"""
