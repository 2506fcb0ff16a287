"""K pi_k as LoRA adapters on one base (dpo.lora): batched scoring and decoding equal the merged models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mpo_exp import draws
from mpo_exp.adapters import BASE, AdapterBank, AdapterModel, full_model, lora_config, shared_bank
from mpo_exp.cost import n_params
from mpo_exp.generation import encode_prompts, sample
from mpo_exp.mpo.bsmd import solve_bsmd
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy
from mpo_exp.scoring import score_policies, score_sequences, token_logprobs

peft = pytest.importorskip("peft")


@pytest.fixture(params=["gpt2", "llama"])
def bank_and_merged(request, tiny_policies, tmp_path):
    """A tiny GPT-2 (Conv1D layers) or Llama (GQA, rotary positions, peft's default q/v targets) with
    two random (non-zero) LoRA adapters: the bank and the merged full models."""
    base = tiny_policies[0]
    if request.param == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = base.tokenizer
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        base = Policy("llama", LlamaForCausalLM(cfg).eval(), tok)
    paths, merged = [], []
    for i in range(2):
        torch.manual_seed(100 + i)
        cfg = lora_config({"r": 4, "alpha": 8})
        cfg.init_lora_weights = False  # random B as well as A: the adapter changes the model
        model = peft.get_peft_model(copy.deepcopy(base.model), cfg)
        with torch.no_grad():  # large enough to move the distribution visibly
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(3.0)
        path = tmp_path / f"adapter{i}"
        model.save_pretrained(str(path))
        merged.append(Policy(f"m{i}", model.merge_and_unload().eval(), base.tokenizer))
        paths.append(path)
    bank = AdapterBank(copy.deepcopy(base.model))
    views = [bank.add(f"a{i}", p) for i, p in enumerate(paths)]
    ref = Policy("ref", base.model.eval(), base.tokenizer)
    return bank, [bank.view(BASE), *views], [ref, *merged]


@pytest.fixture
def samples(tiny_policies):
    tok = tiny_policies[0].tokenizer
    prompts = encode_prompts(
        tok, ["explain cats please <sep>", "cats <sep>", "tell me about space now <sep>"]
    )
    torch.manual_seed(0)
    return sample(MixedPolicy.single(tiny_policies[0]), prompts * 4, max_new_tokens=8), prompts


def test_the_saved_stage_is_the_adapter_only(bank_and_merged, tmp_path):
    files = {p.name for p in (tmp_path / "adapter0").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    cfg = json.loads((tmp_path / "adapter0" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_batched_adapter_scoring_equals_the_merged_models(bank_and_merged, samples):
    bank, views, merged = bank_and_merged
    batch, _ = samples
    assert shared_bank(views) is bank
    batched = score_policies(views, batch, batch_size=6)  # one forward per chunk for all three
    separate = torch.stack([score_sequences([m.model], [1.0], batch) for m in merged], dim=-1)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=1e-5)
    # the adapters matter (the test would pass trivially otherwise), and pi_ref is the base
    assert (separate[:, 1] - separate[:, 0]).abs().max() > 0.5
    for view, m in zip(views, merged, strict=True):  # each view alone, too
        torch.testing.assert_close(
            score_sequences([view], [1.0], batch), score_sequences([m.model], [1.0], batch)
        )


def test_a_mixture_of_views_scores_like_the_mixture_of_merged_models(bank_and_merged, samples):
    _, views, merged = bank_and_merged
    batch, _ = samples
    w = [0.0, 0.3, 0.7]
    torch.testing.assert_close(
        token_logprobs(views, w, batch),
        token_logprobs([m.model for m in merged], w, batch),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("k", [1, 2])
def test_one_hot_adapter_decoder_reproduces_pi_k_exactly(bank_and_merged, samples, k):
    _, views, merged = bank_and_merged
    _, prompts = samples
    weights = [0.0, 0.0, 0.0]
    weights[k] = 1.0
    tok = merged[0].tokenizer
    torch.manual_seed(7)
    from_views = sample(
        MixedPolicy("v", [Policy(f"v{i}", v, tok) for i, v in enumerate(views)], weights),
        prompts * 3,
        max_new_tokens=10,
    )
    torch.manual_seed(7)
    from_merged = sample(MixedPolicy.single(merged[k]), prompts * 3, max_new_tokens=10)
    assert torch.equal(from_views.response_ids, from_merged.response_ids)
    assert torch.equal(from_views.response_mask, from_merged.response_mask)


@pytest.mark.parametrize("sampler", draws.SAMPLERS)
def test_mixed_adapter_decoding_samples_like_the_merged_mixture(bank_and_merged, samples, sampler):
    """One forward per token over K blocks of rows = the K-model LogitsProcessor decoder."""
    with draws.use(sampler):
        _check_mixed_adapter_decoding(bank_and_merged, samples)


def _check_mixed_adapter_decoding(bank_and_merged, samples):
    _, views, merged = bank_and_merged
    _, prompts = samples
    tok = merged[0].tokenizer
    w = [0.2, 0.5, 0.3]
    torch.manual_seed(3)
    a = sample(
        MixedPolicy("v", [Policy(f"v{i}", v, tok) for i, v in enumerate(views)], w),
        prompts * 4,
        10,
        temperature=0.8,
    )
    torch.manual_seed(3)
    b, logp = sample(MixedPolicy("m", merged, w), prompts * 4, 10, temperature=0.8, with_logprobs=True)
    assert torch.equal(a.response_ids, b.response_ids)
    # the adapter decoder's own log-probs are the mixture's at T, as the K-model decoder's are
    torch.manual_seed(3)
    views_pol = MixedPolicy("v", [Policy(f"v{i}", v, tok) for i, v in enumerate(views)], w)
    _, own = sample(views_pol, prompts * 4, 10, temperature=0.8, with_logprobs=True)
    torch.testing.assert_close(own, logp, atol=1e-4, rtol=0)
    scored = score_sequences([m.model for m in merged], w, b, temperature=0.8)
    torch.testing.assert_close(own, scored, atol=1e-4, rtol=0)


def test_lambda_from_adapters_equals_lambda_from_merged_models(bank_and_merged, samples):
    _, views, merged = bank_and_merged
    batch, prompts = samples
    n = len(prompts)
    lv = score_policies(views, batch)
    lm = score_policies([m.model for m in merged], batch)
    ell_v = (lv[:, 1:] - lv[:, :1]).reshape(4, n, 2).transpose(0, 1)
    ell_m = (lm[:, 1:] - lm[:, :1]).reshape(4, n, 2).transpose(0, 1)
    lam_v = solve_bsmd(ell_v, steps=300, lr_scale=1.0, batch_prompts=None, seed=0).weights
    lam_m = solve_bsmd(ell_m, steps=300, lr_scale=1.0, batch_prompts=None, seed=0).weights
    torch.testing.assert_close(lam_v, lam_m, atol=1e-3, rtol=0)


def test_views_count_base_plus_own_adapter_and_merge_back(bank_and_merged):
    bank, views, merged = bank_and_merged
    base = n_params(merged[0].model)
    adapter = n_params(views[1]) - base
    assert n_params(views[0]) == base and adapter > 0 and n_params(views[2]) == base + adapter
    m = full_model(views[2])
    assert not isinstance(m, AdapterModel) and n_params(m) == base
    for (name, p), q in zip(m.state_dict().items(), merged[2].model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
    with pytest.raises(RuntimeError, match="dpo.lora"):
        views[1].train()


def test_the_pipeline_runs_with_lora_policies(smoke_cfg, tmp_path):
    """dpo.lora.r=4: pi_k stored as adapters, one bank in memory, MPO and reward soups run."""
    from mpo_exp.context import RunContext
    from mpo_exp.pipeline import run_pipeline

    lora = ("dpo.lora.r=4", "dpo.max_steps=10", "dpo.module.lr=1e-2", "num_threads=1")
    cfg = smoke_cfg(*lora)
    res = run_pipeline(cfg, tmp_path / "run")
    objectives = res["objectives"]
    assert sum(res["lambda"]) == pytest.approx(1, abs=1e-5)
    for o in objectives:
        assert res["policies"][f"pi_{o}"]["kl"] > 1e-3  # the adapters moved each pi_k
    finished = [d for d in (tmp_path / "cache" / "dpo").iterdir() if d.is_dir() and ".tmp-" not in d.name]
    assert len(finished) == len(objectives)  # temporaries are <key>.tmp-<host>-<pid>-<rand> (artifacts.py)
    for d in finished:
        files = {p.name for p in d.iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    ctx = RunContext(cfg, tmp_path / "ctx")
    singles = ctx.single_objective_policies
    assert ctx.bank is not None and shared_bank(
        [ctx.reference.policies[0].model, *(p.model for p in singles.values())]
    )
    soups = run_pipeline(
        smoke_cfg(*lora, "method=reward_soups"),
        tmp_path / "soups",
    )
    assert "reward_soup" in soups["policies"]
    # MODPO trains on the dpo group's settings: a LoRA adapter too, merged into a plain checkpoint
    modpo = run_pipeline(smoke_cfg(*lora, "method=modpo", "method.rewards=implicit"), tmp_path / "modpo")
    assert abs(modpo["policies"]["modpo"]["kl"]) > 1e-4
    (saved,) = [d for d in (tmp_path / "cache" / "modpo").iterdir() if d.is_dir()]
    (sft,) = [d for d in (tmp_path / "cache" / "sft").iterdir() if d.is_dir()]
    trained = load_file(saved / "model.safetensors")
    base = load_file(sft / "model.safetensors")
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert changed and all(".attn.c_attn." in n for n in changed)  # only LoRA's targets moved


def _lora_model(dropout: float):
    """A tiny GPT-2 (its own dropout 0.1 everywhere) with a LoRA adapter whose B is non-zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mpo_exp.adapters import with_adapter

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    model = with_adapter(model, {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["c_attn"]})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B = 0 at init would hide the adapter's input dropout
    return model


def _train_forwards_differ(model: torch.nn.Module) -> bool:
    model.train()
    ids = torch.arange(12).view(2, 6)
    return not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dpo_and_ppo_turn_the_models_dropout_off_and_keep_the_adapters(dropout):
    """The configured LoRA dropout is live in training; the model's own dropout is off (as in TRL)."""
    from baselines.ppo import PPOModule
    from mpo_exp.training.dpo import DPOModule

    dpo = DPOModule(model=_lora_model(dropout), beta=0.1, lr=1e-3)
    policy = Policy("p", _lora_model(dropout), tokenizer=None)
    ppo = PPOModule(policy=policy, reference=None, reward_fn=None, beta=0.1, max_new_tokens=4)
    for module in (dpo.model, ppo.net):
        rates = {n: m.p for n, m in module.named_modules() if isinstance(m, torch.nn.Dropout)}
        adapter = {n: p for n, p in rates.items() if "lora_dropout" in n}
        assert set(adapter.values()) <= {dropout} and len(adapter) == (dropout > 0)  # peft: Identity at 0
        assert rates and all(p == 0.0 for n, p in rates.items() if n not in adapter)
        assert _train_forwards_differ(module if module is dpo.model else module.lm) == (dropout > 0)
