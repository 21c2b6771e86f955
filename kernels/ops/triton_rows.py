"""The Triton backend under the names and signatures of torch_rows, so that a backend is a choice
of module: the launchers of ops/distill.py, ops/topk.py and ops/logprobs.py (their last argument,
`tile`, is the vocabulary tile block_v)."""

from vpd_kernels.ops.distill import distill_rows_triton as distill_rows
from vpd_kernels.ops.logprobs import (
    token_logprobs_backward_triton as token_logprobs_backward,
)
from vpd_kernels.ops.logprobs import token_logprobs_triton as token_logprobs
from vpd_kernels.ops.topk import topk_rows_triton as topk_rows

__all__ = ["distill_rows", "token_logprobs", "token_logprobs_backward", "topk_rows"]
