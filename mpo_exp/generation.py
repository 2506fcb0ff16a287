"""Sampling responses from a (mixed) policy with ``transformers.generate``."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList

from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import SequenceBatch, pad
from mpo_exp.mpo.mixing import MixedPolicy, MixtureLogitsProcessor


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def response_mask_until_eos(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (or everything if none was generated)."""
    is_eos = (response_ids == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before this position
    return (before == 0).long()


@torch.no_grad()
def sample(
    policy: MixedPolicy,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 256,
    temperature: float = 1.0,
    meter: CostMeter | None = None,
    desc: str | None = None,
) -> SequenceBatch:
    """One response per prompt (repeat prompts for more), ancestral sampling at ``temperature``."""
    tok = policy.tokenizer
    models, weights = policy.live
    driver, others = models[0], models[1:]
    device = next(driver.parameters()).device
    gen_cfg = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    for m in models:
        m.eval()
    pieces = []
    for s in tqdm(
        range(0, len(prompts), batch_size), desc=desc, disable=True if desc is None else None, leave=False
    ):
        p_ids, p_mask = pad(prompts[s : s + batch_size], tok.pad_token_id, left=True)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        processors = LogitsProcessorList()
        if len(models) > 1:
            processors.append(MixtureLogitsProcessor(weights, others, p_mask))
        out = driver.generate(
            input_ids=p_ids, attention_mask=p_mask, generation_config=gen_cfg, logits_processor=processors
        )
        r_ids = out[:, p_ids.shape[1] :].cpu()
        r_mask = response_mask_until_eos(r_ids, tok.eos_token_id)
        batch = SequenceBatch(
            p_ids.cpu(), p_mask.cpu(), r_ids.masked_fill(r_mask == 0, tok.pad_token_id), r_mask
        )
        pieces.append(batch)
        if meter is not None:
            for m in models:
                meter.forward(n_params(m), batch.n_tokens)
    return SequenceBatch.concat(pieces, tok.pad_token_id) if len(pieces) > 1 else pieces[0]


def decode_responses(tokenizer, batch: SequenceBatch) -> list[str]:
    return tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)


def decode_prompts(tokenizer, batch: SequenceBatch) -> list[str]:
    return tokenizer.batch_decode(batch.prompts(), skip_special_tokens=False)
