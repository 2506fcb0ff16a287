"""Throughput and memory of MPO's inference pieces for one model, K adapters vs K full models.

    python benchmarks/bench_scale.py --tiny                        # seconds, CPU (CI runs this)
    python benchmarks/bench_scale.py --model qwen2-0.5b            # a 0.5B Qwen2 built from config
    python benchmarks/bench_scale.py --model llama-0.5b --k 3 --batch 64 --new-tokens 64
    python benchmarks/bench_scale.py --model /path/or/hub-name     # a saved causal LM (+ its tokenizer)

Weights are random (config-built sizes need no download); LoRA adapters are random too, so
the models differ. Reported (JSON under ``--out`` and a markdown table beside it):

* sampling: generated tokens/s of one model (``mpo_exp.generation.sample``);
* scoring: tokens/s for scoring pi_ref and K pi_k on the same samples, as K+1 full models
  (one forward each) and as one base + K LoRA adapters in one mixed-adapter forward;
* mixed decoding: tokens/s of pi_lambda with K full models (one KV cache each, the
  LogitsProcessor decoder) and with K adapters (one forward per token over K row blocks),
  against single-model decoding; the target is mixed >= 0.8 x single / K;
* BSMD: lambda-updates/s on a (n_prompts, samples, K) log-ratio tensor;
* memory: parameter bytes held (K+1 full models vs one base + K adapters) and, on a GPU, the
  peak allocated memory of each scoring and decoding run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

#: architectures built from a config (random weights, no download)
SIZES = {
    "tiny": (
        "gpt2",
        dict(
            n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512, bos_token_id=0, eos_token_id=511
        ),
    ),
    "qwen2-0.5b": (  # Qwen2.5-0.5B's shape
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
    ),
    "llama-0.5b": (
        "llama",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    ),
}


class IdsTokenizer(SimpleNamespace):
    """What sampling needs of a tokenizer, for config-built models that have none."""

    def get_vocab(self) -> dict:
        return {}


def build_base(model: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model in SIZES:
        kind, kwargs = SIZES[model]
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(kind, **kwargs)
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # an EOS no random model picks on purpose: every row decodes the full length
        tok = IdsTokenizer(pad_token_id=0, eos_token_id=cfg.vocab_size - 1, bos_token_id=None)
    else:
        base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return base.to(device).eval(), tok


def build_policies(base, k: int, r: int, tmp: Path):
    """K random LoRA adapters on ``base``: the bank's views (pi_ref first) and K+1 full models."""
    from peft import get_peft_model

    from mpo_exp.adapters import BASE, AdapterBank, lora_config

    paths = []
    for i in range(k):
        torch.manual_seed(1 + i)
        cfg = lora_config({"r": r, "alpha": 2 * r})
        cfg.init_lora_weights = False
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
        peft_model.save_pretrained(str(tmp / f"a{i}"))
        paths.append(tmp / f"a{i}")
        del peft_model
    bank = AdapterBank(copy.deepcopy(base))
    views = [bank.view(BASE), *(bank.add(f"a{i}", p) for i, p in enumerate(paths))]
    return bank, views


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return out, seconds, peak


def run(args) -> dict:
    import tempfile

    from mpo_exp.generation import sample
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.policies import Policy
    from mpo_exp.scoring import score_policies

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    base, tok = build_base(args.model, dtype, device)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab - 1, (args.batch, args.prompt_tokens), generator=gen).tolist()
    k = args.k
    with tempfile.TemporaryDirectory() as tmp:
        bank, views = build_policies(base, k, args.lora_r, Path(tmp))
    out: dict = {
        "model": args.model,
        "n_params": sum(p.numel() for p in base.parameters()),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "k": k,
        "lora_r": args.lora_r,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    adapters_bytes = param_bytes(bank.base_parameters()) + sum(
        param_bytes(bank.adapter_parameters(v.adapter)) for v in views[1:]
    )
    full_bytes = (k + 1) * param_bytes(base.parameters())
    out["memory"] = {"full_models_param_bytes": full_bytes, "adapters_param_bytes": adapters_bytes}

    def policy(name, model):
        return Policy(name, model, tok)

    torch.manual_seed(0)
    ref = MixedPolicy.single(policy("ref", base))
    batch, s, peak = timed(lambda: sample(ref, prompts, args.new_tokens, args.batch), device)
    n_new = batch.n_response_tokens
    out["sampling"] = {"tokens_per_s": n_new / s, "seconds": s, "peak_bytes": peak}

    # full models: merged copies (pi_ref = the base), one forward each on the samples
    full = [base, *(v.merged().to(device).eval() for v in views[1:])]
    scored_tokens = (k + 1) * batch.n_tokens
    res = {}
    for label, models in (("full_models", full), ("adapters_batched", views)):
        _, s, peak = timed(lambda models=models: score_policies(models, batch, args.batch * (k + 1)), device)
        res[label] = {"tokens_per_s": scored_tokens / s, "seconds": s, "peak_bytes": peak}
    out["scoring"] = res

    w = [1.0 / k] * k
    dec = {}
    for label, pol in (
        ("single", MixedPolicy.single(policy("p0", full[1]))),
        ("mixed_full_models", MixedPolicy("mix", [policy(f"p{i}", m) for i, m in enumerate(full[1:])], w)),
        ("mixed_adapters", MixedPolicy("mixa", [policy(f"v{i}", m) for i, m in enumerate(views[1:])], w)),
    ):
        torch.manual_seed(1)
        b, s, peak = timed(lambda pol=pol: sample(pol, prompts, args.new_tokens, args.batch * k), device)
        dec[label] = {"tokens_per_s": b.n_response_tokens / s, "seconds": s, "peak_bytes": peak}
    target = dec["single"]["tokens_per_s"] / k
    for label in ("mixed_full_models", "mixed_adapters"):
        dec[label]["vs_single_over_k"] = dec[label]["tokens_per_s"] / target
    out["mixed_decoding"] = dec
    out["bsmd"] = bench_bsmd(args.bsmd_prompts, args.bsmd_samples, k, args.bsmd_steps)
    out["memory"]["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def bench_bsmd(n_prompts: int, samples: int, k: int, steps: int) -> dict:
    from mpo_exp import solve_bsmd

    ell = torch.randn(n_prompts, samples, k, generator=torch.Generator().manual_seed(0)) * 5
    solve_bsmd(ell, steps=10, objective_every=0)
    start = time.perf_counter()
    solve_bsmd(ell, steps=steps, objective_every=0)
    seconds = time.perf_counter() - start
    return {"shape": [n_prompts, samples, k], "steps": steps, "updates_per_s": steps / seconds}


def markdown(r: dict) -> str:
    def mb(x):
        return "–" if x is None else f"{x / 2**20:,.0f} MiB"

    lines = [
        f"**{r['model']}** ({r['n_params'] / 1e6:,.1f} M params, {r['dtype']}, {r['device']}), K={r['k']}, "
        f"LoRA r={r['lora_r']}, batch {r['batch']} × {r['prompt_tokens']} prompt + "
        f"{r['new_tokens']} new tokens",
        "",
        "| what | tokens/s | peak memory | note |",
        "|---|---:|---:|---|",
        f"| sampling (one model) | {r['sampling']['tokens_per_s']:,.0f} | "
        f"{mb(r['sampling']['peak_bytes'])} | |",
    ]
    for label, d in r["scoring"].items():
        lines.append(
            f"| scoring π_ref + K π_k, {label.replace('_', ' ')} | {d['tokens_per_s']:,.0f} | "
            f"{mb(d['peak_bytes'])} | |"
        )
    for label, d in r["mixed_decoding"].items():
        note = "" if label == "single" else f"{d['vs_single_over_k']:.2f} × single/K (target ≥ 0.8)"
        lines.append(
            f"| decoding, {label.replace('_', ' ')} | {d['tokens_per_s']:,.0f} | {mb(d['peak_bytes'])} "
            f"| {note} |"
        )
    m = r["memory"]
    saved = m["full_models_param_bytes"] / m["adapters_param_bytes"]
    lines += [
        f"| BSMD on {tuple(r['bsmd']['shape'])} | {r['bsmd']['updates_per_s']:,.0f} λ-updates/s | | |",
        "",
        f"Parameters held: K+1 full models {mb(m['full_models_param_bytes'])}, one base + K adapters "
        f"{mb(m['adapters_param_bytes'])} ({saved:.1f}× less); process peak RSS "
        f"{mb(m['process_peak_rss_bytes'])} (the whole benchmark, both set-ups).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b", help=f"{', '.join(SIZES)}, or a hub name / local path")
    p.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke sizes (model=tiny)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="float32 / bfloat16 / float16")
    p.add_argument("--device", default="auto")
    p.add_argument("--bsmd-prompts", type=int, default=512)
    p.add_argument("--bsmd-samples", type=int, default=64)
    p.add_argument("--bsmd-steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_scale.json"))
    args = p.parse_args()
    if args.tiny:
        args.model, args.dtype, args.batch, args.prompt_tokens, args.new_tokens = "tiny", "float32", 16, 8, 16
        args.bsmd_prompts, args.bsmd_samples, args.bsmd_steps = 64, 16, 500
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
