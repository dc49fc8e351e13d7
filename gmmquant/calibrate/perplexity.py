"""Perplexity of a causal LM on a list of texts (the protocol behind `gmmquant.builtin.HELDOUT_PERPLEXITY`).

Protocol: each text is tokenized on its own (no special tokens added), the token lists are concatenated with
the tokenizer's eos token after each text, the stream is cut into non-overlapping windows of `seq_len`
tokens (the last, shorter window is kept if it has at least 2 tokens), every window is scored on its own
(no context carried over), and the perplexity is `exp(mean NLL)` over every predicted token (all window
positions but the first), the NLL computed in float32 from the model's logits.
"""

from __future__ import annotations

import math

import torch

from .data import token_stream

__all__ = ["heldout_perplexity", "perplexity", "windows"]


def windows(ids: list[int], seq_len: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `seq_len` ids; a last shorter window is kept if it has >= 2 ids."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    out = [w for w in out if len(w) >= 2]
    if max_windows is not None:
        out = out[:max_windows]
    return out


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str],
    seq_len: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity per token of a causal LM on `texts` (protocol in the module docstring).

    Args:
        model: any transformers causal LM (called as `model(input_ids=...).logits`), on any device.
        tokenizer: its tokenizer (needs an eos token).
        texts: the documents.
        seq_len: window length in tokens.
        max_windows: score only the first `max_windows` windows (None: all).
        batch_size: windows per forward pass.

    Returns:
        exp(mean token NLL), a float.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; perplexity() separates texts with it")
    wins = windows(token_stream(tokenizer, texts).tolist(), seq_len, max_windows)
    if not wins:
        raise ValueError("no text to score: the texts give fewer than 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        # windows of equal length share a batch; only the last one can be shorter
        for start in range(0, len(wins), batch_size):
            chunk = wins[start : start + batch_size]
            groups: dict[int, list[list[int]]] = {}
            for w in chunk:
                groups.setdefault(len(w), []).append(w)
            for group in groups.values():
                input_ids = torch.tensor(group, dtype=torch.long, device=device)
                logits = model(input_ids=input_ids).logits[:, :-1].float()
                targets = input_ids[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def heldout_perplexity(model, tokenizer, seq_len: int = 256, max_windows: int | None = None, batch_size: int = 8) -> float:
    """`perplexity` on the held-out split of the built-in corpus (`builtin_documents("heldout")`)."""
    from .corpus import builtin_documents

    return perplexity(model, tokenizer, builtin_documents("heldout"), seq_len, max_windows, batch_size)
