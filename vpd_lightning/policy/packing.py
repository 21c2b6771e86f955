"""Right-padded (prompt + completion) batches and the hidden states that predict completion tokens.

Student and teacher sequences differ only in their prompts; both teacher-force the very same
completion ids, so their gathered hidden states line up token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    # Flat positions (row, column) whose hidden state predicts each completion token, in order.
    rows: torch.Tensor  # (T,)
    cols: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,) the completion token ids
    seq_index: torch.Tensor  # (T,) which sequence each token belongs to
    num_sequences: int


def pack(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Concatenate each prompt with its completion and right-pad the batch."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    rows, cols, targets, seq_index = [], [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not prompt:
            raise ValueError("a prompt must have at least one token")
        ids = list(prompt) + list(completion)
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        start = len(prompt) - 1  # the hidden state at position t predicts token t + 1
        rows.extend([i] * len(completion))
        cols.extend(range(start, start + len(completion)))
        targets.extend(completion)
        seq_index.extend([i] * len(completion))

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        rows=as_long(rows),
        cols=as_long(cols),
        targets=as_long(targets),
        seq_index=as_long(seq_index),
        num_sequences=len(prompts),
    )


def completion_hidden(backbone: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states (T, H) at the positions that predict the completion tokens."""
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state[batch.rows, batch.cols]


def per_sequence_sum(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sum per-token values into one value per sequence, (B,)."""
    out = values.new_zeros(batch.num_sequences)
    return out.index_add(0, batch.seq_index, values)
