"""Models whose logits are transformed after lm_head: Cohere (`logit_scale`) and Gemma 2
(`final_logit_softcapping`). The policy reads the transform from the config and the fused
losses, given it, match the model's own eager logits (forward and gradients)."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

import vpd_kernels as vk
from vpd_lightning.policy.models import _check_plain_lm_head, head_transform
from vpd_lightning.policy.roles import Policy, TeacherWeights

V, H = 64, 16


def tiny(kind: str) -> torch.nn.Module:
    common = {"vocab_size": V, "hidden_size": H, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=2.5))
    else:
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=0.3))
    with torch.no_grad():  # logits large enough that the transform matters
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_fused_losses_match_the_models_eager_logits(kind):
    model = tiny(kind)
    kw = head_transform(model.config)
    assert kw == (
        {"logit_scale": 1.0, "final_logit_softcapping": 2.5}
        if kind == "gemma2"
        else {"logit_scale": pytest.approx(0.3), "final_logit_softcapping": None}
    )
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    teacher_ids = ids.flip(-1)
    with torch.no_grad():
        teacher_hidden = model.model(teacher_ids).last_hidden_state
        teacher_logits = model(teacher_ids).logits
    hidden = model.model(ids).last_hidden_state
    logits = model(ids).logits  # eager: the model applies its own transform
    head = model.get_output_embeddings().weight
    assert (logits - hidden @ head.T).abs().max() > 1.0  # the transform is not a no-op here

    _check_plain_lm_head(model, kind)  # loading accepts the model (it refused both before)
    both = {**kw, **{f"teacher_{k}": v for k, v in kw.items()}}
    policy = Policy(model, None, False, TeacherWeights())
    assert policy.head_kwargs == kw and policy.distill_head_kwargs == both
    ours = vk.fused_linear_distill_loss(hidden, head, teacher_hidden, backend="torch", **both)
    eager = vk.distill_loss(logits, teacher_logits, backend="torch")
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours, head, retain_graph=True)
    eager_grads = torch.autograd.grad(eager, head, retain_graph=True)
    torch.testing.assert_close(grads[0], eager_grads[0], rtol=1e-4, atol=1e-6)

    tokens = ids.roll(-1, dims=-1)
    logp = vk.fused_linear_token_logprobs(hidden, head, tokens, backend="torch", **kw)
    eager_logp = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp.double(), eager_logp, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(logp.sum(), head)
    (eager_g,) = torch.autograd.grad(eager_logp.sum(), head)
    torch.testing.assert_close(g.double(), eager_g.double(), rtol=1e-4, atol=1e-5)
