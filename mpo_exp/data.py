"""Token batches in one canonical layout, and the datasets that feed the Lightning modules.

A batch holds prompts left-padded and responses right-padded, so ``cat(prompt, response)``
keeps every real token contiguous. That is the layout ``generate`` produces, and scoring,
SFT, DPO and evaluation all read it, so no stage re-pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch.utils.data import Dataset


@dataclass
class SequenceBatch:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (EOS included)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    @property
    def n_tokens(self) -> int:
        return int(self.prompt_mask.sum() + self.response_mask.sum())

    @property
    def n_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __getitem__(self, idx: slice | torch.Tensor) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name)[idx] for f in fields(self)))

    def prompts(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.prompt_ids, self.prompt_mask, strict=True)]

    def responses(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.response_ids, self.response_mask, strict=True)]

    @staticmethod
    def stack(batches: Sequence[SequenceBatch]) -> SequenceBatch:
        """The rows of ``batches`` in one batch, in order, re-padded to common widths.

        Tensor-only (no re-tokenising): prompts gain columns on the left and responses on the
        right, masked out, so every row's real tokens and positions are unchanged.
        """
        p = max(b.prompt_ids.shape[1] for b in batches)
        r = max(b.response_ids.shape[1] for b in batches)

        def widen(t: torch.Tensor, width: int, left: bool) -> torch.Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=0)

        return SequenceBatch(
            torch.cat([widen(b.prompt_ids, p, True) for b in batches]),
            torch.cat([widen(b.prompt_mask, p, True) for b in batches]),
            torch.cat([widen(b.response_ids, r, False) for b in batches]),
            torch.cat([widen(b.response_mask, r, False) for b in batches]),
        )

    @staticmethod
    def concat(batches: Sequence[SequenceBatch], pad_id: int) -> SequenceBatch:
        prompts = [p for b in batches for p in b.prompts()]
        responses = [r for b in batches for r in b.responses()]
        return collate(prompts, responses, pad_id)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, as ``generate`` does for left-padded prompts."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> SequenceBatch:
    p_ids, p_mask = pad(prompts, pad_id, left=True)
    r_ids, r_mask = pad(responses, pad_id, left=False)
    return SequenceBatch(p_ids, p_mask, r_ids, r_mask)


class SequenceDataset(Dataset):
    """(prompt, response) token lists; collates into a :class:`SequenceBatch`."""

    def __init__(self, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        self.prompts, self.responses, self.pad_id = list(prompts), list(responses), pad_id

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.prompts[i], self.responses[i]

    def collate(self, items: list[tuple[list[int], list[int]]]) -> SequenceBatch:
        return collate([p for p, _ in items], [r for _, r in items], self.pad_id)


@dataclass
class PreferenceBatch:
    chosen: SequenceBatch
    rejected: SequenceBatch
    ref_chosen_logp: torch.Tensor  # (B,) sequence log-probs under pi_ref, precomputed once
    ref_rejected_logp: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)

    def both(self) -> SequenceBatch:
        """Chosen rows then rejected rows, one batch: one forward per step instead of two."""
        return SequenceBatch.stack([self.chosen, self.rejected])


class PreferenceDataset(Dataset):
    """Preference pairs for one objective with pi_ref's log-probs attached (scored once, not per epoch)."""

    def __init__(
        self,
        prompts: Sequence[list[int]],
        chosen: Sequence[list[int]],
        rejected: Sequence[list[int]],
        ref_chosen_logp: torch.Tensor,
        ref_rejected_logp: torch.Tensor,
        pad_id: int,
    ) -> None:
        self.prompts, self.chosen, self.rejected = list(prompts), list(chosen), list(rejected)
        self.ref_chosen_logp, self.ref_rejected_logp, self.pad_id = ref_chosen_logp, ref_rejected_logp, pad_id

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> int:
        return i

    def subset(self, idx: Sequence[int]) -> PreferenceDataset:
        idx = list(idx)
        return PreferenceDataset(
            [self.prompts[i] for i in idx],
            [self.chosen[i] for i in idx],
            [self.rejected[i] for i in idx],
            self.ref_chosen_logp[idx],
            self.ref_rejected_logp[idx],
            self.pad_id,
        )

    @staticmethod
    def concat(parts: Sequence[PreferenceDataset]) -> PreferenceDataset:
        return PreferenceDataset(
            [p for d in parts for p in d.prompts],
            [c for d in parts for c in d.chosen],
            [r for d in parts for r in d.rejected],
            torch.cat([d.ref_chosen_logp for d in parts]),
            torch.cat([d.ref_rejected_logp for d in parts]),
            parts[0].pad_id,
        )

    def collate(self, idx: list[int]) -> PreferenceBatch:
        prompts = [self.prompts[i] for i in idx]
        return PreferenceBatch(
            chosen=collate(prompts, [self.chosen[i] for i in idx], self.pad_id),
            rejected=collate(prompts, [self.rejected[i] for i in idx], self.pad_id),
            ref_chosen_logp=self.ref_chosen_logp[idx],
            ref_rejected_logp=self.ref_rejected_logp[idx],
        )
