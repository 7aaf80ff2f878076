"""The distillation loss (DESIGN.md section 5): student vs the teacher's top-k, per response token.

    python -m pytest tests/test_loss.py -q     # checked against a float64 per-token reference

Usage in a training step (one optimizer batch split over ranks and micro-batches):

    logits = model(input_ids).logits[resp_rows, resp_cols]     # [N, V], response positions only
    loss, metrics = distillation_loss(
        logits, batch.teacher_topk_ids, batch.teacher_topk_logprobs,   # [N, k] each
        valid_mask=token_mask * sample_mask,                         # [N]
        num_valid_tokens_global=tokens_in_whole_optimizer_batch,     # all ranks, all micro-batches
        kl_type="forward", mixed_kl_weight=0.5, zero_outside_topk=False, temperature=1.0)
    loss.backward()   # gradients must then be SUMMED over ranks (see below for FSDP2)

Definitions, per response token t, with K = the teacher's top-k ids at t and T = temperature:
    q = log_softmax(teacher_topk_logprobs)                over the k entries (renormalised)
    p = log_softmax(student_logits[K] / T)                zero_outside_topk=False
    p = log_softmax(student_logits / T)[K]                zero_outside_topk=True (full vocab)
    forward = sum_K exp(q) (q - p)
    reverse = sum_K exp(p) (p - q)        (+ tail when zero_outside_topk)
    mixed   = w * forward + (1 - w) * reverse   (+ (1 - w) * tail), w = mixed_kl_weight
    tail    = H_rest + 100 * P_rest,  P_rest = 1 - sum_K exp(p),
              H_rest = sum_{v not in K} s_v log s_v,  s = softmax(student_logits / T)
    jsd     = b * sum_K exp(q) (q - m) + (1 - b) * sum_K exp(p) (p - m),
              m = log(b exp(q) + (1 - b) exp(p)),  b = jsd_beta   (GKD's generalized JSD)
              (+ (1 - b) * -log(1 - b) * P_rest when zero_outside_topk: outside K the teacher
              is 0, so the mixture there is (1 - b) s_v and each s_v adds s_v * -log(1 - b))
    sampled_reverse, with y the sampled token (teacher_topk_ids = [y], teacher_topk_logprobs
              = [log p_teacher(y)] as scored, no renormalisation) and
              r = log softmax(student_logits / T)[y] - log p_teacher(y)   (full vocabulary):
              value r (an unbiased one-sample estimate of the reverse KL), gradient
              stop_grad(r) * d log p_student(y): r is a per-token penalty, as in on-policy
              distillation (Thinking Machines; prime-rl)
    loss    = sum over valid tokens / num_valid_tokens_global

Dividing by the global count (not the local one) is what makes the sum of the micro-batch
losses over all ranks equal the token mean of the whole optimizer batch, so summing gradients
across micro-batches and all-reducing them with SUM gives exactly the one-rank gradient.
(FSDP2's gradient reduce-scatter averages over ranks by default; a caller using it calls
`model.set_gradient_divide_factor(1.0)` so the reduction is a plain sum, or multiplies the
loss by the data-parallel world size.)

Memory: the caller passes logits at response positions only. The student logits are gathered
at K in their own dtype (bf16) and only the [N, k] result is upcast to float32 (float64 stays
float64). zero_outside_topk needs the full-vocabulary log-normaliser and entropy; those are
computed in chunks of `chunk_size` positions by a custom autograd function whose backward
recomputes each chunk, so at most [chunk_size, V] float32 temporaries exist at a time, forward
or backward.
"""

from __future__ import annotations

from typing import get_args

import math

import torch

from shared.config import KLType

# The runbook system's constant: P_rest is penalised as if the teacher put log-prob -100 on
# the whole tail (loss term -log_infinitesimal * P_rest).
TAIL_LOG_PROB = -100.0

# Teacher top-k log-probs below this are clamped: a -inf (e.g. from a 16-bit store) would
# turn exp(q) * (q - p) into 0 * inf = nan. exp(-1e4) is exactly 0 in float32 anyway.
_TEACHER_LOGPROB_FLOOR = -1e4


class _FullVocabStats(torch.autograd.Function):
    """Per position: log-normaliser `lse = logsumexp(z)` and `neg_entropy = sum_v s_v log s_v`
    of z = logits / T, s = softmax(z), computed `chunk` positions at a time.

    Autograd of the plain expression would keep every chunk's [chunk, V] float32 softmax alive
    until backward; here backward recomputes them chunk by chunk instead:
        d lse / d z_u = s_u,    d neg_entropy / d z_u = s_u (log s_u - neg_entropy).
    With `with_entropy` false only lse is computed (neg_entropy is returned as zeros): the
    sampled-token loss needs the normaliser alone.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, chunk: int, compute_dtype,
                with_entropy: bool):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=compute_dtype, device=logits.device)
        neg_entropy = torch.zeros_like(lse)
        for start in range(0, n, chunk):
            z = logits[start:start + chunk].to(compute_dtype) / temperature
            lse[start:start + chunk] = torch.logsumexp(z, dim=-1)
            if with_entropy:
                log_s = torch.log_softmax(z, dim=-1)
                neg_entropy[start:start + chunk] = (log_s.exp() * log_s).sum(-1)
        ctx.save_for_backward(logits, lse, neg_entropy)
        ctx.temperature, ctx.chunk, ctx.compute_dtype = temperature, chunk, compute_dtype
        ctx.with_entropy = with_entropy
        return lse, neg_entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_neg_entropy):
        logits, lse, neg_entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            z = logits[sl].to(ctx.compute_dtype) / ctx.temperature
            log_s = z - lse[sl, None]
            s = log_s.exp()
            g = s * grad_lse[sl, None]
            if ctx.with_entropy:
                g = g + s * (log_s - neg_entropy[sl, None]) * grad_neg_entropy[sl, None]
            grad[sl] = (g / ctx.temperature).to(logits.dtype)
        return grad, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    valid_mask: torch.Tensor,
    num_valid_tokens_global: int | float | torch.Tensor,
    kl_type: str = "forward",
    mixed_kl_weight: float = 0.5,
    zero_outside_topk: bool = False,
    temperature: float = 1.0,
    chunk_size: int = 256,
    jsd_beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of one micro-batch, normalised by the global valid-token count.

    Args:
        student_logits: [N, V] (or [..., V]) student logits at response positions, any dtype.
        teacher_topk_ids: [N, k] (or [..., k]) integer ids of the teacher's top-k.
        teacher_topk_logprobs: [N, k] teacher values at those ids (log-probs or logits: they
            are renormalised over the k entries).
        valid_mask: [N] (or [...]) 1 for tokens that count (`token_mask * sample_mask`).
        num_valid_tokens_global: valid tokens in the whole optimizer batch, over all ranks and
            micro-batches. A batch with none gives a zero loss (the count is clamped to 1).
        kl_type: "forward", "reverse", "mixed", "jsd" or "sampled_reverse" (module doc).
        mixed_kl_weight: weight w of the forward KL in "mixed".
        jsd_beta: the interpolation b of "jsd", in (0, 1).
        zero_outside_topk: normalise the student over the full vocabulary (see module doc).
        temperature: divides the student logits (the teacher's were divided when scored).
        chunk_size: positions per chunk for the full-vocabulary pass (zero_outside_topk only).

    Returns:
        (loss, metrics): loss is a scalar in the compute dtype; metrics are detached sums over
        this micro-batch's valid tokens ("loss_sum", "valid_tokens", "forward_kl_sum",
        "reverse_kl_sum", "student_topk_mass_sum"; plus "tail_sum" with zero_outside_topk),
        to be summed across micro-batches and ranks and divided by the global count.
    """
    # A user's loss_fn.kl_type was checked by shared.config_check.validate before submission.
    assert kl_type in get_args(KLType), f"kl_type={kl_type!r} is not one of {get_args(KLType)}"
    _check_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, valid_mask,
                  mixed_kl_weight, temperature, chunk_size)
    if kl_type == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"loss_fn.jsd_beta={jsd_beta} must be in (0, 1)")

    vocab, k = student_logits.shape[-1], teacher_topk_ids.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    ids = teacher_topk_ids.reshape(-1, k).long()
    valid = valid_mask.reshape(-1).bool()
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    if kl_type == "sampled_reverse":
        return _sampled_reverse(logits, ids, teacher_topk_logprobs.reshape(-1, k), valid,
                                num_valid_tokens_global, compute_dtype, temperature, chunk_size)

    p, neg_entropy = _student_log_probs(logits, ids, compute_dtype, temperature,
                                        zero_outside_topk, chunk_size)
    q = _teacher_log_probs(teacher_topk_logprobs.reshape(-1, k), valid, compute_dtype)
    p_probs, q_probs = p.exp(), q.exp()
    forward, reverse, tail = _kl_terms(p, q, p_probs, q_probs, neg_entropy)
    if kl_type == "jsd":
        per_token = _jsd(p, q, p_probs, q_probs, jsd_beta, zero_outside_topk)
    else:
        per_token = _per_token_loss(forward, reverse, tail, kl_type, mixed_kl_weight)

    zero = per_token.new_zeros(())
    loss_sum = torch.where(valid, per_token, zero).sum()
    loss = loss_sum / _global_count(num_valid_tokens_global, loss_sum.device, compute_dtype)
    return loss, _metrics(valid, zero, loss_sum, forward, reverse, p_probs, tail)


def _check_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, valid_mask,
                  mixed_kl_weight, temperature, chunk_size) -> None:
    """ValueError for an out-of-range setting or tensors whose shapes disagree."""
    if not 0.0 <= mixed_kl_weight <= 1.0:
        raise ValueError(f"loss_fn.mixed_kl_weight={mixed_kl_weight} must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    lead = teacher_topk_ids.shape[:-1]
    if (student_logits.shape[:-1] != lead or teacher_topk_logprobs.shape != teacher_topk_ids.shape
            or valid_mask.shape != lead):
        raise ValueError(
            "distillation_loss: shapes disagree: student_logits "
            f"{tuple(student_logits.shape)}, teacher_topk_ids {tuple(teacher_topk_ids.shape)}, "
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)}, valid_mask "
            f"{tuple(valid_mask.shape)}; expected [..., V], [..., k], [..., k], [...] with the "
            "same leading dims (slice the logits to response positions first)"
        )


def _student_log_probs(logits: torch.Tensor, ids: torch.Tensor, compute_dtype, temperature: float,
                       zero_outside_topk: bool, chunk_size: int):
    """(p, neg_entropy): the student's [N, k] log-probs at the teacher's ids, normalised over
    the k entries or (zero_outside_topk) the full vocabulary; neg_entropy is the per-position
    full-vocabulary sum s log s with zero_outside_topk, else None."""
    # Gather first, in the logits' own dtype; only [N, k] is upcast.
    z_topk = logits.gather(-1, ids).to(compute_dtype) / temperature
    if zero_outside_topk:
        lse, neg_entropy = _FullVocabStats.apply(logits, float(temperature), int(chunk_size),
                                                 compute_dtype, True)
        return z_topk - lse[:, None], neg_entropy
    return torch.log_softmax(z_topk, dim=-1), None


def _teacher_log_probs(t_vals: torch.Tensor, valid: torch.Tensor, compute_dtype) -> torch.Tensor:
    """q: the teacher's [N, k] values renormalised over the k entries (masked rows zeroed)."""
    # Masked rows may hold padding garbage (-inf, nan): zero them so no nan reaches the sum or
    # the gradient (torch.where alone would still back-propagate 0 * nan = nan).
    t_vals = t_vals.to(compute_dtype)
    t_vals = torch.where(valid[:, None], t_vals, 0.0).clamp_min(_TEACHER_LOGPROB_FLOOR)
    return torch.log_softmax(t_vals, dim=-1)


def _kl_terms(p, q, p_probs, q_probs, neg_entropy):
    """Per token: (forward KL, reverse KL, tail); tail is None without neg_entropy."""
    forward = (q_probs * (q - p)).sum(-1)
    reverse = (p_probs * (p - q)).sum(-1)
    tail = None
    if neg_entropy is not None:
        # H_rest by subtraction: the full-vocabulary sum minus the top-k part.
        topk_mass = p_probs.sum(-1)
        h_rest = neg_entropy - (p_probs * p).sum(-1)
        tail = h_rest - TAIL_LOG_PROB * (1.0 - topk_mass)
    return forward, reverse, tail


def _per_token_loss(forward, reverse, tail, kl_type: str, mixed_kl_weight: float) -> torch.Tensor:
    """The per-token loss of `kl_type` (the tail, if any, joins the reverse part)."""
    if kl_type == "forward":
        return forward
    rev = reverse if tail is None else reverse + tail
    if kl_type == "reverse":
        return rev
    w = mixed_kl_weight
    return w * forward + (1.0 - w) * rev


def _jsd(p, q, p_probs, q_probs, beta: float, zero_outside_topk: bool) -> torch.Tensor:
    """Per token: GKD's generalized JSD over K (module doc), with its exact tail."""
    log_m = torch.logaddexp(q + math.log(beta), p + math.log1p(-beta))
    teacher_part = (q_probs * (q - log_m)).sum(-1)
    student_part = (p_probs * (p - log_m)).sum(-1)
    jsd = beta * teacher_part + (1.0 - beta) * student_part
    if zero_outside_topk:
        jsd = jsd + (1.0 - beta) * -math.log1p(-beta) * (1.0 - p_probs.sum(-1))
    return jsd


def _sampled_reverse(logits, ids, t_vals, valid, num_valid_tokens_global, compute_dtype,
                     temperature: float, chunk_size: int):
    """kl_type=sampled_reverse (module doc): (loss, metrics) of one micro-batch."""
    if ids.shape[-1] != 1:
        raise ValueError(f"kl_type=sampled_reverse needs one teacher log-prob per token (the "
                         f"sampled token's), got {ids.shape[-1]}; the teacher stage of a "
                         "sampled_reverse run scores only the sampled token")
    z = logits.gather(-1, ids).to(compute_dtype)[:, 0] / temperature
    lse, _ = _FullVocabStats.apply(logits, float(temperature), int(chunk_size), compute_dtype, False)
    log_p = z - lse  # log p_student(y), full vocabulary
    t = torch.where(valid, t_vals[:, 0].to(compute_dtype), 0.0).clamp_min(_TEACHER_LOGPROB_FLOOR)
    penalty = (log_p - t).detach()
    # Value: the penalty; gradient: penalty * d log p_student(y) (the score-function estimator).
    per_token = penalty * (log_p - log_p.detach()) + penalty
    zero = per_token.new_zeros(())
    loss_sum = torch.where(valid, per_token, zero).sum()
    loss = loss_sum / _global_count(num_valid_tokens_global, loss_sum.device, compute_dtype)
    # forward KL is not estimated from one sample: reported as 0.
    return loss, _metrics(valid, zero, loss_sum, torch.zeros_like(penalty), penalty,
                          log_p.detach().exp()[:, None], None)


def _global_count(num_valid_tokens_global, device, compute_dtype) -> torch.Tensor:
    """The loss denominator: the global valid-token count as a tensor, clamped to >= 1."""
    if isinstance(num_valid_tokens_global, torch.Tensor):
        denom = num_valid_tokens_global.to(device=device, dtype=compute_dtype)
    else:
        denom = torch.tensor(float(num_valid_tokens_global), dtype=compute_dtype, device=device)
    return denom.clamp_min(1.0)


def _metrics(valid, zero, loss_sum, forward, reverse, p_probs, tail) -> dict[str, torch.Tensor]:
    """Detached sums over this micro-batch's valid tokens (see distillation_loss)."""

    def vsum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, zero).sum().detach()

    metrics = {
        "loss_sum": loss_sum.detach(),
        "valid_tokens": valid.sum().detach(),
        "forward_kl_sum": vsum(forward),
        "reverse_kl_sum": vsum(reverse),
        "student_topk_mass_sum": vsum(p_probs.sum(-1)),
    }
    if tail is not None:
        metrics["tail_sum"] = vsum(tail)
    return metrics
