"""shared/loss.py against an independent per-token float64 reference of DESIGN.md section 5.

    python -m pytest tests/test_loss.py -q

The reference below is written straight from the formulas, one token at a time, with the
tail entropy summed over an explicit list of the ids outside the top-k; it shares no code
with shared/loss.py (which vectorises, gathers before upcasting, chunks the vocabulary pass
and has a hand-written backward).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.loss import _FullVocabStats, distillation_loss
from tests import dist_loss_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KL_TYPES = ["forward", "reverse", "mixed"]
W = 0.3
T = 0.7
ALL_SETTINGS = [(kl, zero) for kl in KL_TYPES for zero in (False, True)]


def reference_token_loss(logits_row, ids, vals, kl_type, w, zero_outside_topk, temperature):
    """One token's loss, float64, straight from the definitions."""
    ids = [int(i) for i in ids]
    k = len(ids)
    # Teacher: renormalise the k values.
    t_lse = torch.logsumexp(vals, dim=0)
    q = [vals[j] - t_lse for j in range(k)]
    z = logits_row / temperature
    if zero_outside_topk:
        full_lse = torch.logsumexp(z, dim=0)
        p = [z[ids[j]] - full_lse for j in range(k)]
    else:
        topk_lse = torch.logsumexp(torch.stack([z[i] for i in ids]), dim=0)
        p = [z[ids[j]] - topk_lse for j in range(k)]
    forward = sum(q[j].exp() * (q[j] - p[j]) for j in range(k))
    reverse = sum(p[j].exp() * (p[j] - q[j]) for j in range(k))
    tail = 0.0
    if zero_outside_topk:
        log_s = torch.log_softmax(z, dim=0)
        outside = [v for v in range(z.shape[0]) if v not in ids]
        h_rest = sum(log_s[v].exp() * log_s[v] for v in outside)
        p_rest = 1.0 - sum(p[j].exp() for j in range(k))
        tail = h_rest + 100.0 * p_rest
    if kl_type == "forward":
        return forward
    if kl_type == "reverse":
        return reverse + tail
    return w * forward + (1.0 - w) * (reverse + tail)


def reference_loss(logits, ids, vals, valid, n_global, kl_type, w, zero_outside_topk, temp):
    """Sum of per-token losses over valid tokens / n_global; logits [N, V] float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(logits.shape[0]):
        if valid[t] != 0:
            total = total + reference_token_loss(logits[t], ids[t], vals[t].double(), kl_type, w,
                                                 zero_outside_topk, temp)
    return total / n_global


def make_batch(seed=0, batch=3, seq=5, vocab=37, k=6, dtype=torch.float64):
    """Random student logits, teacher top-k from another random model, masks with garbage
    teacher values at masked tokens (as padding could hold)."""
    g = torch.Generator().manual_seed(seed)
    student = (2.5 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)).to(dtype)
    teacher = 2.5 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    vals, ids = torch.log_softmax(teacher / T, -1).topk(k, dim=-1)
    token_mask = (torch.rand(batch, seq, generator=g) > 0.3).double()
    token_mask[:, 0] = 1.0
    sample_mask = torch.ones(batch, dtype=torch.float64)
    sample_mask[1] = 0.0  # a dropped sample
    valid = token_mask * sample_mask[:, None]
    vals = vals.clone()
    vals[valid == 0] = float("-inf")  # garbage where nothing counts
    vals[1, 0, 0] = float("nan")  # sample 1 is dropped
    return student, ids, vals, valid


def flat(student, ids, vals, valid):
    v = student.shape[-1]
    return (student.reshape(-1, v), ids.reshape(-1, ids.shape[-1]),
            vals.reshape(-1, vals.shape[-1]), valid.reshape(-1))


@pytest.mark.parametrize("kl_type,zero_outside_topk", ALL_SETTINGS)
def test_matches_reference_with_grads(kl_type, zero_outside_topk):
    student, ids, vals, valid = make_batch()
    n_global = valid.sum() + 3  # as if other ranks held 3 more valid tokens

    x = student.clone().requires_grad_(True)
    loss, metrics = distillation_loss(x, ids, vals, valid, n_global, kl_type=kl_type,
                                      mixed_kl_weight=W, zero_outside_topk=zero_outside_topk,
                                      temperature=T, chunk_size=4)
    loss.backward()

    xr = student.clone().requires_grad_(True)
    fl, fi, fv, fm = flat(xr, ids, vals, valid)
    ref = reference_loss(fl, fi, fv, fm, n_global, kl_type, W, zero_outside_topk, T)
    ref.backward()

    assert torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    # Masked tokens get no gradient.
    assert (x.grad[valid == 0] == 0).all()
    assert metrics["valid_tokens"].item() == int(valid.sum().item())
    assert abs(metrics["loss_sum"].item() - ref.item() * n_global.item()) < 1e-5


@pytest.mark.parametrize("kl_type,zero_outside_topk", ALL_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_match_reference(kl_type, zero_outside_topk, dtype):
    # The function gathers in the logits' dtype and computes in float32: against the reference
    # run on the very same (rounded) values it must agree to float32 accuracy.
    student, ids, vals, valid = make_batch(seed=1, dtype=dtype)
    n = valid.sum()
    loss, _ = distillation_loss(student, ids, vals.to(dtype), valid, n, kl_type=kl_type,
                                mixed_kl_weight=W, zero_outside_topk=zero_outside_topk,
                                temperature=T, chunk_size=3)
    assert loss.dtype == torch.float32
    fl, fi, fv, fm = flat(student.double(), ids, vals.to(dtype).double(), valid)
    ref = reference_loss(fl, fi, fv, fm, n, kl_type, W, zero_outside_topk, T)
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_same_model_gives_zero_loss(kl_type):
    # Teacher = student: top-k of the student's own log-probs at temperature T.
    student, _, _, valid = make_batch(seed=2)
    vals, ids = torch.log_softmax(student / T, -1).topk(6, dim=-1)
    loss, _ = distillation_loss(student, ids, vals, valid, valid.sum(), kl_type=kl_type,
                                mixed_kl_weight=W, zero_outside_topk=False, temperature=T)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_same_model_zero_outside_topk_is_not_zero(kl_type):
    """What is exact with zero_outside_topk=true and teacher = student, per token, with
    S = the student's full-vocabulary mass on the top-k:
        forward = -log S                   (q is renormalised over k, p is not)
        reverse = S log S + H_rest + 100 (1 - S)
    so the loss is 0 only when the top-k holds all the mass (k = V)."""
    student, _, _, valid = make_batch(seed=3)
    log_s = torch.log_softmax(student / T, -1)
    vals, ids = log_s.topk(6, dim=-1)
    mass = vals.exp().sum(-1)
    h_rest = (log_s.exp() * log_s).sum(-1) - (vals.exp() * vals).sum(-1)
    forward = -mass.log()
    reverse = mass * mass.log() + h_rest + 100.0 * (1.0 - mass)
    per_token = {"forward": forward, "reverse": reverse,
                 "mixed": W * forward + (1 - W) * reverse}[kl_type]
    expected = (per_token * valid).sum() / valid.sum()
    loss, _ = distillation_loss(student, ids, vals, valid, valid.sum(), kl_type=kl_type,
                                mixed_kl_weight=W, zero_outside_topk=True, temperature=T)
    assert abs(loss.item() - expected.item()) < 1e-6
    assert loss.item() > 1e-3  # really not zero with k < V

    # k = V: every term vanishes.
    vals, ids = log_s.topk(student.shape[-1], dim=-1)
    loss, _ = distillation_loss(student, ids, vals, valid, valid.sum(), kl_type=kl_type,
                                mixed_kl_weight=W, zero_outside_topk=True, temperature=T)
    assert abs(loss.item()) < 1e-6


def test_chunk_size_does_not_change_results():
    student, ids, vals, valid = make_batch(seed=4)
    results = []
    for chunk in (1, 4, 1000):
        x = student.clone().requires_grad_(True)
        loss, _ = distillation_loss(x, ids, vals, valid, valid.sum(), kl_type="mixed",
                                    mixed_kl_weight=W, zero_outside_topk=True, temperature=T,
                                    chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-12, rtol=0)


def test_full_vocab_stats_gradcheck():
    g = torch.Generator().manual_seed(5)
    logits = (2 * torch.randn(5, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: _FullVocabStats.apply(x, 0.7, 2, torch.float64, True), (logits,))


def test_all_masked_batch_is_zero_not_nan():
    student, ids, vals, valid = make_batch(seed=6)
    x = student.clone().requires_grad_(True)
    loss, _ = distillation_loss(x, ids, vals, torch.zeros_like(valid), 0, kl_type="reverse",
                                zero_outside_topk=True)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_bad_arguments_name_the_problem():
    # A bad loss_fn.kl_type is the config check's to refuse, before submission
    # (tests/test_config.py::test_every_choice_key_is_checked_before_submission).
    student, ids, vals, valid = make_batch()
    with pytest.raises(ValueError, match="mixed_kl_weight"):
        distillation_loss(student, ids, vals, valid, 1, kl_type="mixed", mixed_kl_weight=1.5)
    with pytest.raises(ValueError, match="shapes disagree"):
        distillation_loss(student[:, :-1], ids, vals, valid, 1)


@pytest.mark.dist
def test_two_gloo_ranks_match_one_rank(tmp_path: Path):
    """The optimizer batch split over 2 ranks x micro-batches of one sample (summed loss,
    SUM-all-reduced grads) equals one rank doing the whole batch in one micro-batch."""
    out = tmp_path / "dist.pt"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "tests" / "dist_loss_worker.py"), str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert got["world"] == 2

    problem = dist_loss_worker.make_problem()
    whole = [list(range(dist_loss_worker.BATCH))]
    for kl_type, zero in dist_loss_worker.SETTINGS:
        loss, gw, gb = dist_loss_worker.accumulate(problem, whole, kl_type, zero)
        res = got["results"][f"{kl_type}-{zero}"]
        assert loss.item() > 0
        torch.testing.assert_close(res["loss"], loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["weight"], gw, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["bias"], gb, atol=1e-5, rtol=1e-5)
        assert gw.abs().max() > 1e-3  # the gradients are not trivially zero


# ------------------------------------------------------------------ GKD's generalized JSD


def reference_jsd_token(logits_row, ids, vals, beta, zero_outside_topk, temperature):
    """GKD (Agarwal et al. 2024, eq. for JSD(beta)): beta KL(P || M) + (1 - beta) KL(Q || M),
    M = beta P + (1 - beta) Q, P the teacher, Q the student, as full-vocabulary float64
    distributions: the teacher renormalised over its top-k and 0 elsewhere; the student over
    the top-k only, or (zero_outside_topk) over the whole vocabulary. Terms with a zero
    probability contribute 0."""
    ids = [int(i) for i in ids]
    vocab = logits_row.shape[0]
    teacher = torch.zeros(vocab, dtype=torch.float64)
    teacher[ids] = torch.softmax(vals.double(), dim=0)
    z = logits_row / temperature
    if zero_outside_topk:
        student = torch.softmax(z, dim=0)
    else:
        student = torch.zeros(vocab, dtype=torch.float64)
        student[ids] = torch.softmax(z[ids], dim=0)
    mix = beta * teacher + (1 - beta) * student

    def kl(a, b):
        return sum(a[v] * (a[v].log() - b[v].log()) for v in range(vocab) if a[v] > 0)

    return beta * kl(teacher, mix) + (1 - beta) * kl(student, mix)


@pytest.mark.parametrize("zero_outside_topk", [False, True])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_the_gkd_definition_with_grads(beta, zero_outside_topk):
    student, ids, vals, valid = make_batch()
    n_global = valid.sum() + 3  # global-token normalisation: other ranks hold 3 more tokens
    x = student.clone().requires_grad_(True)
    loss, metrics = distillation_loss(x, ids, vals, valid, n_global, kl_type="jsd", jsd_beta=beta,
                                      zero_outside_topk=zero_outside_topk, temperature=T, chunk_size=4)
    loss.backward()

    xr = student.clone().requires_grad_(True)
    fl, fi, fv, fm = flat(xr, ids, vals, valid)
    ref = sum(reference_jsd_token(fl[t], fi[t], fv[t], beta, zero_outside_topk, T)
              for t in range(fl.shape[0]) if fm[t] != 0) / n_global
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10, (loss.item(), ref.item())
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=1e-8)
    assert (x.grad[valid == 0] == 0).all()
    assert abs(metrics["loss_sum"].item() - ref.item() * n_global.item()) < 1e-9


def test_jsd_worked_example():
    """Teacher (0.5, 0.5) and student (0.9, 0.1) over the same two ids, beta 0.5: M = (0.7,
    0.3); 0.5 (0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)) + 0.5 (0.9 ln(0.9/0.7) + 0.1 ln(0.1/0.3))."""
    logits = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    logits[0, 1] = torch.log(torch.tensor(9.0, dtype=torch.float64))  # student 0.9 / 0.1 over ids
    ids = torch.tensor([[1, 0]])
    vals = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)  # renormalised: 0.5, 0.5
    loss, _ = distillation_loss(logits, ids, vals, torch.ones(1), 1, kl_type="jsd", jsd_beta=0.5)
    assert abs(loss.item() - 0.10174922507919676) < 1e-12, loss.item()


def test_jsd_of_identical_distributions_is_zero():
    student, ids, _, valid = make_batch()
    vals = torch.gather(student / T, -1, ids)  # the teacher's top-k values = the student's
    loss, _ = distillation_loss(student, ids, vals, valid, valid.sum(), kl_type="jsd",
                                jsd_beta=0.3, temperature=T)
    assert abs(loss.item()) < 1e-12


# ------------------------------------------------------- the sampled-token reverse KL


def test_sampled_reverse_is_the_on_policy_distillation_estimator_with_grads():
    """Per token, y the student's sampled token: r = log p_student(y) - log p_teacher(y)
    (student over the full vocabulary at temperature T); loss = sum of r over valid tokens /
    the global count; gradient = sum of stop_grad(r) * d log p_student(y) / the global count."""
    student, _, _, valid = make_batch()
    g = torch.Generator().manual_seed(5)
    vocab = student.shape[-1]
    sampled = torch.randint(0, vocab, student.shape[:-1] + (1,), generator=g)
    teacher_lp = torch.log_softmax(torch.randn(student.shape, generator=g, dtype=torch.float64), -1)
    t_vals = teacher_lp.gather(-1, sampled)
    t_vals[valid == 0] = float("nan")  # garbage where nothing counts
    n_global = valid.sum() + 3
    x = student.clone().requires_grad_(True)
    loss, metrics = distillation_loss(x, sampled, t_vals, valid, n_global, kl_type="sampled_reverse",
                                      temperature=T, chunk_size=4)
    loss.backward()

    xr = student.clone().requires_grad_(True)
    log_p = torch.log_softmax(xr / T, dim=-1).gather(-1, sampled)[..., 0]
    r = log_p - teacher_lp.gather(-1, sampled)[..., 0]
    keep = valid != 0
    ref_value = r[keep].sum() / n_global
    (r.detach()[keep] * log_p[keep]).sum().div(n_global).backward()
    assert abs(loss.item() - ref_value.item()) < 1e-10
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=1e-8)
    assert (x.grad[valid == 0] == 0).all()
    assert abs(metrics["reverse_kl_sum"].item() - r[keep].sum().item()) < 1e-9
    assert abs(metrics["student_topk_mass_sum"].item() - log_p[keep].exp().sum().item()) < 1e-9


def test_sampled_reverse_worked_example():
    """Student (0.5, 0.3, 0.2), sampled token 0, teacher log-prob ln 0.25: r = ln 2; the
    gradient of the logits is ln 2 * (onehot(0) - (0.5, 0.3, 0.2))."""
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    x = probs.log().requires_grad_(True)
    t = torch.tensor([[0.25]], dtype=torch.float64).log()
    loss, _ = distillation_loss(x, torch.tensor([[0]]), t, torch.ones(1), 1, kl_type="sampled_reverse")
    loss.backward()
    ln2 = 0.6931471805599453
    assert abs(loss.item() - ln2) < 1e-12
    torch.testing.assert_close(x.grad, ln2 * torch.tensor([[0.5, -0.3, -0.2]], dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_sampled_reverse_refuses_a_top_k():
    student, ids, vals, valid = make_batch()
    with pytest.raises(ValueError, match="one teacher log-prob per token"):
        distillation_loss(student, ids, vals, valid, valid.sum(), kl_type="sampled_reverse")
