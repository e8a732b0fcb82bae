"""Training losses of the heads, computed as Transformers 4.57 computes them (`transformers.loss`).

Pure functions of logits and labels. `num_items_in_batch` is Trainer's gradient-accumulation
normalisation: the summed loss divided by the number of label tokens over all accumulated
micro-batches, instead of each micro-batch's mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError

__all__ = [
    "causal_lm_loss",
    "load_balancing_loss",
    "masked_lm_loss",
    "sequence_classification_loss",
    "sequence_classification_problem",
]

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    ignore_index: int,
) -> torch.Tensor:
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross entropy, in float32.

    Arguments:
        logits: [B, T, V] (any float dtype; upcast to float32).
        labels: [B, T] token ids, `ignore_index` where no loss is taken; position t is
            predicted from position t - 1 (shifted here). Ignored when `shift_labels` is given.
        num_items_in_batch: None for the mean over label tokens; else the sum divided by it.
        shift_labels: [B, T] labels already aligned with `logits`.

    Returns:
        A scalar tensor.
    """
    logits = logits.float()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    vocab = logits.shape[-1]
    return _cross_entropy(
        logits.view(-1, vocab), shift_labels.reshape(-1).to(logits.device), num_items_in_batch, ignore_index
    )


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross entropy at the labelled positions (`labels` [B, T], `ignore_index` elsewhere), float32."""
    logits = logits.float()
    return _cross_entropy(
        logits.view(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        num_items_in_batch,
        ignore_index,
    )


def sequence_classification_problem(num_labels: int, labels: torch.Tensor) -> str:
    """The problem type Transformers infers when the config has none: one label is regression,
    integer labels are single-label classification, float labels multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_labels: int,
    problem_type: str,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The classifier loss for `problem_type` (see `PROBLEM_TYPES`).

    Arguments:
        logits: [B, num_labels].
        labels: [B] class ids (single-label), [B] or [B, num_labels] floats (regression),
            [B, num_labels] floats in {0, 1} (multi-label).
        num_items_in_batch: single-label only, as `causal_lm_loss`.

    Raises:
        ValueError: an unknown problem type.
    """
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return _cross_entropy(logits.view(-1, num_labels), labels.view(-1), num_items_in_batch, -100)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise InvalidArgumentError(f"problem_type {problem_type!r}: expected one of {PROBLEM_TYPES}")


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The auxiliary load-balancing loss of a mixture of experts (Switch Transformer eqs. 4-6),
    unscaled, as Transformers 4.57's `load_balancing_loss_func` computes it: over the router
    logits of every sparse layer together, num_experts * sum_e f_e * P_e, where f_e is the share
    of (token, top-k slot) assignments to expert e and P_e the mean router probability of e,
    both over the real tokens (`attention_mask` 1) only when a mask is given.

    Arguments:
        router_logits: per sparse layer [B * T, num_experts] (the model's `router_logits`).
        num_experts: experts per layer.
        top_k: experts chosen per token.
        attention_mask: [B, T], 1 for real tokens, or None (every token counts).

    Returns:
        A scalar float32 tensor (the router probabilities stay in the logits' dtype, as
        Transformers computes them).
    """
    device = router_logits[0].device
    logits = torch.cat([layer.to(device) for layer in router_logits], dim=0)
    probs = F.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts)  # [L * B * T, k, E]
    if attention_mask is None:
        tokens_per_expert = torch.mean(expert_mask.float(), dim=0)  # [k, E]
        router_prob_per_expert = torch.mean(probs, dim=0)  # [E]
    else:
        batch, seq = attention_mask.shape
        layers = logits.shape[0] // (batch * seq)
        mask = attention_mask.to(device)
        slot_mask = mask[None, :, :, None, None].expand(layers, batch, seq, top_k, num_experts)
        slot_mask = slot_mask.reshape(-1, top_k, num_experts)
        tokens_per_expert = torch.sum(expert_mask.float() * slot_mask, dim=0) / torch.sum(slot_mask, dim=0)
        prob_mask = mask[None, :, :, None].expand(layers, batch, seq, num_experts).reshape(-1, num_experts)
        router_prob_per_expert = torch.sum(probs * prob_mask, dim=0) / torch.sum(prob_mask, dim=0)
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts
