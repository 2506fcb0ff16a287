"""Time every pipeline stage (from the shared cost meter) and the BSMD solver's throughput.

    python benchmarks/bench_pipeline.py            # the default config, fresh cache
    python benchmarks/bench_pipeline.py --tiny     # seconds-long smoke version (CI runs this)

Writes a JSON report (``--out``) and prints a table. BSMD is pure vector arithmetic on cached
scores, so it should manage thousands of lambda-updates per second on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_bsmd(
    n_prompts: int, samples: int, k: int, steps: int, repeats: int = 3, bootstrap: int = 0
) -> dict:
    """lambda-updates/s of the default solve (adaptive step, every prompt a step), of the paper's
    rule (fixed step, 8 prompts a step), and the wall time of a ``bootstrap``-replicate solve."""
    import torch

    from mpo_exp import solve_bsmd

    ell = torch.randn(n_prompts, samples, k, generator=torch.Generator().manual_seed(0)) * 5
    solve_bsmd(ell, steps=10, objective_every=0)  # warm-up

    def best_time(**kwargs) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            res = solve_bsmd(ell, steps=steps, objective_every=0, **kwargs)
            best = min(best, time.perf_counter() - start)
        return best, res

    seconds, res = best_time()
    paper_seconds, _ = best_time(step_size="fixed", batch_prompts=8, average_from=0)
    out = {
        "shape": [n_prompts, samples, k],
        "steps": steps,
        "seconds": seconds,
        "updates_per_s": steps / seconds,
        "fw_gap": res.fw_gap,
        "paper_rule_updates_per_s": steps / paper_seconds,
    }
    if bootstrap:
        boot_seconds, _ = best_time(bootstrap=bootstrap)
        out |= {"bootstrap": bootstrap, "bootstrap_seconds": boot_seconds}
    return out


def bench_decoding(n_prompts: int, k: int, max_new_tokens: int = 12) -> dict:
    """Generated tokens per second: one policy vs the K-model mixed decoder (each keeps a KV cache)."""
    import torch

    from mpo_exp.generation import encode_prompts, sample
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.policies import TinyGPT2Spec
    from mpo_exp.tasks.toy import ToyTask

    task = ToyTask()
    tok = task.build_tokenizer()
    torch.manual_seed(0)
    policies = [TinyGPT2Spec().build(tok) for _ in range(k)]
    for i, p in enumerate(policies):
        p.name = f"p{i}"
    prompts = encode_prompts(tok, task.prompts("train", n_prompts, 0))
    out = {}
    for label, policy in (
        ("single", MixedPolicy.single(policies[0])),
        (f"mixture_k{k}", MixedPolicy("mix", policies, [1 / k] * k)),
    ):
        start = time.perf_counter()
        batch = sample(policy, prompts, max_new_tokens)
        seconds = time.perf_counter() - start
        out[label] = {"seconds": seconds, "tokens_per_s": batch.n_response_tokens / seconds}
    return out


def bench_pipeline(tiny: bool) -> dict:
    from hydra import compose, initialize_config_dir

    from mpo_exp.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "logger=none",
            f"paths.cache_dir={tmp}/cache",
            f"paths.output_dir={tmp}/run",
            "trainer.enable_progress_bar=false",
        ]
        if tiny:
            overrides.append("experiment=smoke")
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        start = time.perf_counter()
        results = run_pipeline(cfg, f"{tmp}/run")
        total = time.perf_counter() - start
    return {"total_wall_s": total, "stages": results["cost"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke sizes")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench.json"))
    args = parser.parse_args()

    steps = 500 if args.tiny else 2000  # 2000 = the default solve
    report = {
        "bsmd": [
            bench_bsmd(64, 16, 3, steps, bootstrap=10 if args.tiny else 50),
            bench_bsmd(512, 64, 4, steps // 5, repeats=1),
        ],
        "decoding": bench_decoding(256 if args.tiny else 2048, k=3),
        "pipeline": bench_pipeline(args.tiny),
        "tiny": args.tiny,
    }
    print("\nBSMD solver (cached scores, CPU):")
    for b in report["bsmd"]:
        print(
            f"  log-ratios {tuple(b['shape'])}: default solve {b['seconds']:.3f} s for {b['steps']} steps = "
            f"{b['updates_per_s']:,.0f} lambda-updates/s (FW gap {b['fw_gap']:.2g}); "
            f"paper rule {b['paper_rule_updates_per_s']:,.0f}/s"
        )
        if "bootstrap" in b:
            print(f"    + bootstrap of {b['bootstrap']} replicates: {b['bootstrap_seconds']:.2f} s")
    print("\nDecoding throughput (tiny GPT-2, CPU):")
    for label, d in report["decoding"].items():
        print(f"  {label:<12} {d['tokens_per_s']:>10,.0f} generated tokens/s")
    print(f"\nPipeline stages ({'tiny' if args.tiny else 'default'} config):")
    print(f"  {'stage':<24}{'wall s':>9}{'FLOPs':>12}{'tokens fwd':>12}{'tokens bwd':>12}")
    for name, c in report["pipeline"]["stages"].items():
        print(f"  {name:<24}{c['wall_s']:>9.2f}{c['flops']:>12.3g}{c['tokens_fwd']:>12}{c['tokens_bwd']:>12}")
    print(f"  {'total (incl. overhead)':<24}{report['pipeline']['total_wall_s']:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nreport: {args.out}")


if __name__ == "__main__":
    main()
