"""The per-micro-batch M-step and E-step losses against a float64 eager reference, no Trainer.

The reference runs the whole model, takes full logits in float64 and writes each objective out by
hand, so it shares nothing with `losses.py` but the model's (float32) weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpd_lightning.algorithm.estep import estep_loss, prior_pass
from vpd_lightning.algorithm.methods import METHODS
from vpd_lightning.algorithm.mstep import MStepTerms, mstep_loss
from vpd_lightning.options import DistillOptions, EStepOptions, GrpoOptions
from vpd_lightning.policy.packing import pack
from vpd_lightning.policy.roles import Policy, TeacherWeights
from vpd_lightning.policy.tiny import build_tiny_model

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
TEACHER_PROMPTS = [[5, 6, 7, 30, 31], [8, 9, 32], [10, 11, 12, 13]]
COMPLETIONS = [[40, 41, 42], [43], [44, 45]]
PAD = 0


@pytest.fixture
def policy(tiny_tokenizer) -> Policy:
    torch.manual_seed(0)
    model = build_tiny_model(len(tiny_tokenizer))
    return Policy(model, None, False, TeacherWeights())


def resolved(**distill) -> DistillOptions:
    """Distillation options as the M-step gets them: the method's defaults filled in."""
    return METHODS["vpd"].resolved_distill(DistillOptions(**distill))


def batches():
    return pack(PROMPTS, COMPLETIONS, PAD), pack(TEACHER_PROMPTS, COMPLETIONS, PAD)


def eager_logprobs(model, prompts, completions, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per sequence, (len(completion), V) log-softmax of the logits that predict its tokens."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0].double()
        start = len(prompt) - 1
        out.append(F.log_softmax(logits[start : start + len(completion)] / temperature, dim=-1))
    return out


def test_mstep_reverse_kl_matches_the_eager_sum_over_distilled_tokens(policy):
    student, teacher = batches()
    has_context = torch.tensor([True, False, True])
    distill_tokens = sum(len(c) for c, h in zip(COMPLETIONS, has_context, strict=True) if h)
    loss, stats = mstep_loss(
        policy,
        student,
        teacher,
        terms=MStepTerms(resolved(temperature=0.7), 0.0, GrpoOptions()),
        has_context=has_context,
        advantages=None,
        anchor=None,
        distill_tokens=distill_tokens,
        all_tokens=6,
    )
    loss.backward()
    got_grads = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()

    log_s = eager_logprobs(policy.model, PROMPTS, COMPLETIONS, 0.7)
    with torch.no_grad():
        log_t = eager_logprobs(policy.model, TEACHER_PROMPTS, COMPLETIONS, 0.7)
    per_seq = [(ls.exp() * (ls - lt)).sum() for ls, lt in zip(log_s, log_t, strict=True)]
    expected = sum(kl for kl, h in zip(per_seq, has_context, strict=True) if h) / distill_tokens
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats.divergence == pytest.approx(expected.item() * distill_tokens, rel=1e-5)
    for got, param in zip(got_grads, policy.model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampling_temperature", [1.0, 0.7])
def test_mstep_grpo_is_the_clipped_surrogate_over_all_tokens(policy, sampling_temperature):
    student, teacher = batches()
    advantages = torch.tensor([1.0, -0.5, 0.25])
    all_tokens = sum(len(c) for c in COMPLETIONS)
    loss, stats = mstep_loss(
        policy,
        student,
        teacher,
        terms=MStepTerms(None, 1.0, GrpoOptions(), sampling_temperature),
        has_context=torch.tensor([True, True, True]),
        advantages=advantages,
        anchor=None,
        distill_tokens=all_tokens,
        all_tokens=all_tokens,
    )
    # With old = current log-probs the ratio is 1: the loss is -mean(A) per token and the
    # gradient is -A * grad log p summed over tokens, p the sampling distribution at T.
    log_s = eager_logprobs(policy.model, PROMPTS, COMPLETIONS, sampling_temperature)
    token_logp = [
        ls.gather(1, torch.tensor(c)[:, None]) for ls, c in zip(log_s, COMPLETIONS, strict=True)
    ]
    per_token_adv = torch.cat(
        [a.repeat(len(c)) for a, c in zip(advantages, COMPLETIONS, strict=True)]
    )
    expected = -(per_token_adv.sum()) / all_tokens
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats.grpo == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    got = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    surrogate = -(torch.cat(token_logp).squeeze(1) * per_token_adv).sum() / all_tokens
    surrogate.backward()
    for g, p in zip(got, policy.model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_mstep_needs_advantages_for_grpo(policy):
    student, teacher = batches()
    with pytest.raises(ValueError, match="advantages"):
        mstep_loss(
            policy,
            student,
            teacher,
            terms=MStepTerms(None, 1.0, GrpoOptions()),
            has_context=torch.ones(3, dtype=torch.bool),
            advantages=None,
            anchor=None,
            distill_tokens=1,
            all_tokens=1,
        )


@pytest.mark.parametrize("length_normalize", [False, True])
def test_estep_is_bco_on_implicit_rewards_against_the_detached_student(policy, length_normalize):
    student, teacher = batches()
    success = torch.tensor([True, False, True])
    weight = torch.tensor([1.0, 1.0, 0.0])
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    beta, delta = 0.3, 0.05
    options = EStepOptions(length_normalize=length_normalize)
    prior = prior_pass(policy, student, teacher, options=options, beta=beta, lengths=lengths)
    loss, rewards = estep_loss(
        policy,
        teacher,
        prior_logp=prior.prior_logp,
        options=options,
        beta=beta,
        delta=delta,
        success=success,
        weight=weight,
        lengths=lengths,
        n_success=1.0,
        n_failure=1.0,
    )

    def seq_logp(prompts):
        out = eager_logprobs(policy.model, prompts, COMPLETIONS)
        sums = torch.stack(
            [
                ls.gather(1, torch.tensor(c)[:, None]).sum()
                for ls, c in zip(out, COMPLETIONS, strict=True)
            ]
        )
        return sums / lengths if length_normalize else sums

    with torch.no_grad():
        s_seq = seq_logp(PROMPTS)
    t_seq = seq_logp(TEACHER_PROMPTS)
    reward = beta * (t_seq - s_seq)
    margin = reward - delta
    terms = torch.where(success, -F.logsigmoid(margin), -F.logsigmoid(-margin)) * weight
    expected = terms.sum()  # one weighted success and one weighted failure
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    got = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    expected.backward()  # the student's log-probs are constants: only the teacher's path counts
    for g, p in zip(got, policy.model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad.to(g.dtype), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rewards.double(), reward.detach(), rtol=1e-5, atol=1e-6)
    # The no-grad pass that feeds delta sees the same rewards, before the update.
    torch.testing.assert_close(prior.rewards.double(), reward.detach(), rtol=1e-5, atol=1e-6)
    assert not prior.prior_logp.requires_grad
    assert prior.kl_tokens == 0  # no target_kl: the KL is not measured


def test_estep_measures_teacher_kl_when_beta_adapts(policy):
    student, teacher = batches()
    stats = prior_pass(
        policy,
        student,
        teacher,
        options=EStepOptions(target_kl=0.1),
        beta=0.1,
        lengths=torch.tensor([3, 1, 2]),
    )
    log_s = eager_logprobs(policy.model, PROMPTS, COMPLETIONS)
    log_t = eager_logprobs(policy.model, TEACHER_PROMPTS, COMPLETIONS)
    expected = sum((lt.exp() * (lt - ls)).sum() for ls, lt in zip(log_s, log_t, strict=True))
    assert stats.kl_tokens == 6
    assert stats.kl_sum == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("topk_from", ["student", "teacher"])
def test_mstep_on_a_top_k_is_the_bucketed_divergence(policy, topk_from):
    """k buckets plus the rest: KL between (p_1..p_k, 1 - sum) of student and teacher, with the
    ids ranked by the student (SDPO's reference) or by the teacher."""
    student, teacher = batches()
    k = 4
    loss, _ = mstep_loss(
        policy,
        student,
        teacher,
        terms=MStepTerms(resolved(topk=k, topk_from=topk_from), 0.0, GrpoOptions()),
        has_context=torch.ones(3, dtype=torch.bool),
        advantages=None,
        anchor=None,
        distill_tokens=6,
        all_tokens=6,
    )
    with torch.no_grad():
        log_s = torch.cat(eager_logprobs(policy.model, PROMPTS, COMPLETIONS))
        log_t = torch.cat(eager_logprobs(policy.model, TEACHER_PROMPTS, COMPLETIONS))
    ids = (log_s if topk_from == "student" else log_t).topk(k, dim=-1).indices
    s_k, t_k = log_s.gather(1, ids).exp(), log_t.gather(1, ids).exp()
    s_b = torch.cat([s_k, 1 - s_k.sum(1, keepdim=True)], dim=1)
    t_b = torch.cat([t_k, 1 - t_k.sum(1, keepdim=True)], dim=1)
    expected = (s_b * (s_b.log() - t_b.log())).sum() / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)  # float32 sums of tiny terms
    full, _ = mstep_loss(
        policy,
        student,
        teacher,
        terms=MStepTerms(resolved(), 0.0, GrpoOptions()),
        has_context=torch.ones(3, dtype=torch.bool),
        advantages=None,
        anchor=None,
        distill_tokens=6,
        all_tokens=6,
    )
    assert full.item() > loss.item()  # bucketing merges tokens: the divergence can only shrink
