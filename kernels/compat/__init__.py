"""Drop-in replacements for other libraries' distillation losses: the same call and the same
numbers, computed by vpd_kernels (`compat.trl`, `compat.liger`). Neither library is imported."""

from __future__ import annotations


def divergence_of_beta(beta: float) -> dict:
    """TRL's and Liger's generalised JSD beta as vpd_kernels keywords: beta = 0 is forward KL
    (KL(teacher || student)), beta = 1 reverse KL, anything between the generalised JSD with the
    same beta (m = (1 - beta) student + beta teacher, as here)."""
    if beta == 0:
        return {"divergence": "forward_kl"}
    if beta == 1:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": float(beta)}
