"""Sampling responses from a (mixed) policy with ``transformers.generate``.

``sample`` draws from exactly pi(y|x) (or the mixed policy's token-level distribution), with the
run's temperature and nothing else. That takes care: ``generate`` fills every field of the
passed ``GenerationConfig`` that is ``None`` from the model's own ``generation_config`` (what a
hub checkpoint ships in ``generation_config.json``: Qwen2.5-Instruct brings repetition_penalty
1.05, top_k 20, top_p 0.8, temperature 0.7) and then from global defaults (``top_k=50``)
— see ``GenerationMixin._prepare_generation_config`` in transformers 5.x
(``generation/utils.py``: ``generation_config.update(**self.generation_config.to_dict(),
defaults_only=True, ...)`` then ``generation_config.update(**global_defaults,
defaults_only=True)``). Fields whose "off" value is ``None`` (``suppress_tokens``,
``bad_words_ids``, ``min_p``, ``sequence_bias``, ``forced_eos_token_id``, ...) cannot be switched
off by passing ``None``. So :func:`sample` (1) sets every field that can add a logits processor,
warper or stopping rule to its neutral value, and (2) during the call swaps each model's
``generation_config`` for a fresh default one, so that nothing left unset can be filled from
the checkpoint. The temperature is applied by our own processor after the mixture, so
``generate`` itself builds an empty processor list and ``MixtureLogitsProcessor`` sees raw
logits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper

from mpo_exp import draws
from mpo_exp.adapters import AdapterBank, AdapterModel, shared_bank
from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import SequenceBatch, pad, position_ids_from_mask
from mpo_exp.mpo.mixing import MixedPolicy, MixtureLogitsProcessor
from mpo_exp.scoring import mixture_log_softmax


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def response_mask_until_eos(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (or everything if none was generated)."""
    is_eos = (response_ids == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before this position
    return (before == 0).long()


def ancestral_sampling_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Plain ancestral sampling at temperature 1: every knob that could reshape the distribution,
    add a processor or stop early is set to its neutral value (not left ``None``, which
    ``generate`` would fill from the model's ``generation_config``)."""
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=max_new_tokens,
        min_length=0,  # min_new_tokens stays None: 0 would become min_length = prompt length
        temperature=1.0,  # the run's temperature is applied by our own processor, after mixing
        top_k=0,  # the global default would be 50
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        use_cache=True,
        output_scores=False,
        output_logits=False,
        return_dict_in_generate=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@contextmanager
def model_generation_defaults_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Replace the ``generation_config`` of ``model`` (and of any wrapped model, e.g. under a PEFT
    wrapper) by a fresh default one for the duration, so ``generate`` cannot inherit sampling
    settings from the checkpoint; the originals are put back afterwards (they are saved with the
    model)."""
    saved = []
    for m in model.modules():
        cfg = getattr(m, "generation_config", None)
        if isinstance(cfg, GenerationConfig):
            saved.append((m, cfg))
            m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, cfg in saved:
            m.generation_config = cfg


class LogProbRecorder:
    """The last logits processor: keeps log p(token) of each drawn token under the distribution it
    was drawn from (the processed scores), so a sampler's own log-probs need no second pass.

    At step t it sees the token drawn at t - 1 (the last input id) and the log-softmax it stored
    then; :meth:`finish` reads the final token.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.record(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def record(self, token: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, token.view(-1, 1)).squeeze(1))
            self.prev = None

    def finish(self, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sequence log-probs (B,) of ``response`` (B, T), over ``mask``'s tokens only."""
        if self.prev is not None:  # the last token drawn (generate stops right after drawing it)
            self.record(response[:, len(self.steps)].to(self.prev.device))
        steps = torch.stack(self.steps, dim=1).cpu()
        return (steps * mask).sum(-1)


def sampling_processors(
    weights: list[float], others: list[torch.nn.Module], prompt_mask: torch.Tensor, temperature: float
) -> LogitsProcessorList:
    """The only logits processing ``sample`` does: the K-model mixture, then the temperature."""
    processors = LogitsProcessorList()
    if others:
        processors.append(MixtureLogitsProcessor(weights, others, prompt_mask))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    return processors


@torch.no_grad()
def sample(
    policy: MixedPolicy,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 256,
    temperature: float = 1.0,
    meter: CostMeter | None = None,
    desc: str | None = None,
    with_logprobs: bool = False,
) -> SequenceBatch | tuple[SequenceBatch, torch.Tensor]:
    """One response per prompt (repeat prompts for more), ancestral sampling at ``temperature``.

    Each token is drawn from softmax(log pi_lambda(.|prefix) / temperature), where log pi_lambda
    is the model's log-softmax (or the mixture's, for several models), whatever sampling
    settings the checkpoints' ``generation_config.json`` carry (see the module docstring).
    ``with_logprobs``: also each response's log-prob under that distribution, read while decoding
    (in fp32 the teacher-forced ``score_sequences`` agrees to ~1e-4 nats: tests/test_generation.py).
    """
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature!r}")
    tok = policy.tokenizer
    models, weights = policy.live
    driver, others = models[0], models[1:]
    device = next(driver.parameters()).device
    gen_cfg = ancestral_sampling_config(tok, max_new_tokens)
    bank = shared_bank(models)
    for m in models:
        m.eval()
    pieces, logps = [], []
    # adapter views decode together, one forward per token over len(models) blocks of rows
    step = batch_size if bank is None else max(1, batch_size // len(models))
    for s in tqdm(
        range(0, len(prompts), step), desc=desc, disable=True if desc is None else None, leave=False
    ):
        p_ids, p_mask = pad(prompts[s : s + step], tok.pad_token_id, left=True)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        recorder = LogProbRecorder() if with_logprobs else None
        if bank is not None:
            out = sample_adapters(bank, models, weights, p_ids, p_mask, gen_cfg, temperature, recorder)
        else:
            processors = sampling_processors(weights, others, p_mask, temperature)
            if recorder is not None:
                processors.append(recorder)
            run_cfg = gen_cfg
            if draws.current() != "multinomial":  # greedy over a processor that draws the token
                processors.append(draws.DrawProcessor())
                run_cfg = copy.copy(gen_cfg)
                run_cfg.do_sample = False
            with model_generation_defaults_disabled(driver):
                out = driver.generate(
                    input_ids=p_ids,
                    attention_mask=p_mask,
                    generation_config=run_cfg,
                    logits_processor=processors,
                )
        r_ids = out[:, p_ids.shape[1] :].cpu()
        r_mask = response_mask_until_eos(r_ids, tok.eos_token_id)
        batch = SequenceBatch(
            p_ids.cpu(), p_mask.cpu(), r_ids.masked_fill(r_mask == 0, tok.pad_token_id), r_mask
        )
        pieces.append(batch)
        if recorder is not None:
            logps.append(recorder.finish(r_ids, r_mask))
        if meter is not None:
            for m in models:
                meter.forward(n_params(m), batch.n_tokens)
    batch = SequenceBatch.concat(pieces, tok.pad_token_id) if len(pieces) > 1 else pieces[0]
    return (batch, torch.cat(logps)) if with_logprobs else batch


class TokenStepper:
    """The models of a token-level mixture, run one token at a time over one block of prompts.

    Plain models keep a KV cache each. Adapter views of one bank run as one forward per token over
    one block of rows per view (one KV cache holds them all). :meth:`logits` gives each model's
    next-token logits (float32, (B, V)) for the current prefixes; :meth:`advance` appends one token
    per row. Written once for every decoder that needs the K models' full next-token
    distributions: adapter sampling and MPO's decoded-policy objective.
    """

    def __init__(self, models: list[torch.nn.Module], p_ids: torch.Tensor, p_mask: torch.Tensor) -> None:
        self.models = list(models)
        self.bank = shared_bank(self.models)
        self.b = len(p_ids)
        blocks = len(self.models) if self.bank is not None else 1
        self.blocks = blocks
        self.mask = p_mask.repeat(blocks, 1)
        self.new = p_ids.repeat(blocks, 1)
        self.positions = position_ids_from_mask(self.mask)
        self.caches: list = [None] * (1 if self.bank is not None else len(self.models))
        self.done = torch.zeros(self.b, dtype=torch.bool, device=p_ids.device)  # rows past their EOS
        self.tokens: list[torch.Tensor] = []

    def logits(self) -> list[torch.Tensor]:
        # only the last position's logits: the first step's forward spans the whole prompt
        kw = dict(attention_mask=self.mask, position_ids=self.positions, use_cache=True, logits_to_keep=1)
        if self.bank is not None:
            rows = [m.adapter for m in self.models for _ in range(self.b)]
            out = self.bank.forward(rows, input_ids=self.new, cache=self.caches[0], **kw)
            self.caches[0] = out.cache
            return list(out.logits[:, -1].float().split(self.b))
        logits = []
        for k, model in enumerate(self.models):
            out = model(input_ids=self.new, cache=self.caches[k], **kw)
            self.caches[k] = out.cache
            logits.append(out.logits[:, -1].float())
        return logits

    def emit(self, token: torch.Tensor, pad_id: int, eos_id: int) -> bool:
        """Record one sampled token per row (the pad token for rows that have ended) and advance;
        True once every row has ended (as ``generate`` stops). :attr:`response` holds the tokens."""
        token = torch.where(self.done, torch.full_like(token, pad_id), token)
        self.tokens.append(token)
        self.done |= token == eos_id
        if bool(self.done.all()):
            return True
        self.advance(token)
        return False

    @property
    def response(self) -> torch.Tensor:
        """The emitted tokens: (B, T)."""
        return torch.stack(self.tokens, dim=1)

    def advance(self, token: torch.Tensor) -> None:
        self.new = token.repeat(self.blocks).unsqueeze(1)
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)


@torch.no_grad()
def sample_adapters(
    bank: AdapterBank,
    views: list[AdapterModel],
    weights: list[float],
    p_ids: torch.Tensor,
    p_mask: torch.Tensor,
    gen_cfg: GenerationConfig,
    temperature: float,
    recorder: LogProbRecorder | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the mixture of adapter views: prompts and tokens (B, P + T).

    The K views' rows go through one forward per token (:class:`TokenStepper`). Each step mirrors
    ``generate``'s sampling: the mixture's log-softmax, the temperature, one draw per row (the
    run's sampler, :mod:`mpo_exp.draws`), padding after EOS and stopping once every row has ended,
    so one view samples token for token as its merged model does through ``generate`` with the
    same random state.
    """
    assert shared_bank(views) is bank
    stepper = TokenStepper(views, p_ids, p_mask)
    for _ in range(int(gen_cfg.max_new_tokens)):
        logits = stepper.logits()
        scores = mixture_log_softmax(logits, weights) if len(views) > 1 else logits[0]
        if temperature != 1.0:
            scores = scores / temperature
        if recorder is not None:
            recorder.prev = torch.log_softmax(scores, dim=-1)
        token = draws.draw(torch.softmax(scores, dim=-1))
        if recorder is not None:
            recorder.record(token)
        if stepper.emit(token, gen_cfg.pad_token_id, gen_cfg.eos_token_id):
            break
    return torch.cat([p_ids, stepper.response], dim=1)


def decode_responses(tokenizer, batch: SequenceBatch) -> list[str]:
    return tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)


def decode_prompts(tokenizer, batch: SequenceBatch) -> list[str]:
    return tokenizer.batch_decode(batch.prompts(), skip_special_tokens=False)
