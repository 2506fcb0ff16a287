"""Each stage of the pipeline against this machine's ceiling: tokens/s, fraction of peak, memory.

    python benchmarks/bench_stages.py --tiny                          # seconds (CI runs this)
    python benchmarks/bench_stages.py                                 # SmolLM2-135M, fp32 and bf16
    python benchmarks/bench_stages.py --precisions bf16-mixed --stages dpo --batches 8,16

First the ceiling: the measured GFLOP/s of a large matmul at each precision (the threads this
process has). Then, for the model, per precision and batch size, the stages the pipeline spends
its time in, each measured in a fresh process (so the peak RSS is the stage's own):

* sampling: ancestral sampling from one model (``generation.sample``), generated tokens/s;
* scoring: teacher-forced log-probs of prompt + response (``scoring.score_sequences``);
* mixed decoding: the token-level mixture of two models (``MixedPolicy``), generated tokens/s;
* dpo: a DPO step (chosen + rejected forward, backward, AdamW) with the preset's LoRA adapter.

"% of peak" is the stage's analytic FLOP rate (2N per forwarded token; 2N + 2N + 2N_trainable
per trained token, as the cost meter counts) over the measured matmul rate of its precision. The
markdown table is written beside the JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

STAGES = ("sampling", "scoring", "mixed_decoding", "dpo")
SAMPLING = ("sampling", "mixed_decoding")  # the stages that draw tokens (``--samplers``)
# precision -> the weights' dtype; bf16-mixed keeps fp32 weights and autocasts the matmuls to bf16
# (what trainer.precision=bf16-mixed does in training)
WEIGHTS = {"float32": "float32", "bfloat16": "bfloat16", "bf16-mixed": "float32"}
MATMUL = {"float32": "float32", "bfloat16": "bfloat16", "bf16-mixed": "bfloat16"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of an n x n matmul at ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def load(model: str, dtype: str):
    """(policy, encoded prompts source) for ``smollm2`` (the preset's model and chat task) or ``tiny``."""
    from mpo_exp.generation import encode_prompts

    if model == "tiny":
        from mpo_exp.policies import TinyGPT2Spec
        from mpo_exp.tasks.toy import ToyTask

        task = ToyTask()
        torch.manual_seed(0)
        policy = TinyGPT2Spec().build(task.build_tokenizer())
        policy.model.to(getattr(torch, dtype))
        lora = {**LORA, "target_modules": ["c_attn"]}
    else:
        from mpo_exp.policies import GGUFPackageSpec
        from mpo_exp.tasks.chat import ChatTask

        task = ChatTask(objectives=["sentiment", "concise"], max_new_tokens=48)
        policy = GGUFPackageSpec(cache_dir=str(REPO / "outputs" / "cache"), dtype=dtype).build(None)
        lora = LORA
    task.bind_tokenizer(policy.tokenizer)
    return policy.eval(), lambda n: encode_prompts(policy.tokenizer, task.prompts("train", n, 0)), lora


def full_length_batch(policy, prompts: list[list[int]], new: int):
    """Prompts with random full-length responses: every row costs the same to score or train."""
    from mpo_exp.data import SequenceBatch, pad

    gen = torch.Generator().manual_seed(0)
    p_ids, p_mask = pad(prompts, policy.tokenizer.pad_token_id, left=True)
    r_ids = torch.randint(0, policy.model.config.vocab_size, (len(p_ids), new), generator=gen)
    return SequenceBatch(p_ids, p_mask, r_ids, torch.ones_like(r_ids))


def one(spec: dict) -> dict:
    """One stage at one precision and batch size (run in its own process)."""
    from mpo_exp.cost import CostMeter, n_params

    torch.set_num_threads(spec["threads"])
    policy, prompts_of, lora = load(spec["model"], WEIGHTS[spec["precision"]])
    prompts = prompts_of(spec["rows"])
    new = spec["new_tokens"]
    work = {
        "sampling": lambda: _sampling(policy, None, prompts, spec, meter),
        "mixed_decoding": lambda: _sampling(policy, _perturbed(policy), prompts, spec, meter),
        "scoring": lambda: _scoring(policy, full_length_batch(policy, prompts, new), spec, meter),
        "dpo": lambda: _dpo(policy, full_length_batch(policy, prompts, new), lora, spec, meter),
    }[spec["stage"]]
    meter = CostMeter()
    from mpo_exp import draws

    bf16 = spec["precision"] == "bf16-mixed"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), draws.use(spec["sampler"]):
        tokens, seconds, flops = work()
    return {
        **spec,
        "n_params": n_params(policy.model),
        "tokens": int(tokens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "gflops_per_s": flops / seconds / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _perturbed(policy):
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return other


def _timed(meter, fn) -> tuple[int, float, float]:
    start = time.perf_counter()
    with meter.stage("bench") as cost:
        tokens = fn()
    return tokens, time.perf_counter() - start, cost.flops


def _sampling(policy, other, prompts, spec: dict, meter):
    """Generated tokens/s of one model, or of the 50/50 token-level mixture with ``other``."""
    from mpo_exp.generation import sample
    from mpo_exp.mpo.mixing import MixedPolicy

    pol = MixedPolicy.single(policy) if other is None else MixedPolicy("mix", [policy, other], [0.5, 0.5])
    torch.manual_seed(0)
    return _timed(
        meter, lambda: sample(pol, prompts, spec["new_tokens"], spec["batch"], meter=meter).n_response_tokens
    )


def _scoring(policy, batch, spec: dict, meter):
    from mpo_exp.scoring import score_sequences

    def run() -> int:
        score_sequences([policy.model], [1.0], batch, spec["batch"], meter)
        return batch.n_tokens

    return _timed(meter, run)


def _dpo(policy, batch, lora: dict, spec: dict, meter):
    """DPO steps (the module's own step: chosen + rejected in one forward) with a LoRA adapter."""
    from mpo_exp.adapters import with_adapter
    from mpo_exp.cost import n_params
    from mpo_exp.data import PreferenceBatch
    from mpo_exp.scoring import pair_logprobs
    from mpo_exp.training.dpo import dpo_loss

    model = with_adapter(policy.model, lora).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n, trainable = n_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    b, rows = spec["batch"], len(batch) // 2

    def run() -> int:
        tokens = 0
        for s in range(0, rows - b + 1, b):
            zeros = torch.zeros(b)
            pairs = PreferenceBatch(batch[s : s + b], batch[rows + s : rows + s + b], zeros, zeros)
            loss, _ = dpo_loss(*pair_logprobs(model, pairs), zeros, zeros, 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_tokens = pairs.chosen.n_tokens + pairs.rejected.n_tokens
            meter.charge(n, step_tokens, True, trainable)
            tokens += step_tokens
        return tokens

    return _timed(meter, run)


def _stage(r: dict) -> str:
    return f"{r['stage']} ({r['sampler']})" if r["stage"] in SAMPLING else r["stage"]


def markdown(res: dict) -> str:
    lines = [
        f"Machine: {res['threads']} threads; matmul ceiling "
        + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in res["ceiling_gflops"].items()),
        "",
        "| model | precision | stage | batch | tokens/s | GFLOP/s | % of peak | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|",  # stage: sampling stages name their draw
    ]
    for r in res["runs"]:
        peak = res["ceiling_gflops"][MATMUL[r["precision"]]]
        lines.append(
            f"| {r['model']} | {r['precision']} | {_stage(r)} | {r['batch']} | {r['tokens_per_s']:.0f} | "
            f"{r['gflops_per_s']:.1f} | {100 * r['gflops_per_s'] / peak:.1f} | {r['peak_rss_gb']:.2f} |"
        )
    for r in res.get("failed", []):
        what = f"| {r['model']} | {r['precision']} | {_stage(r)} | {r['batch']} |"
        lines.append(f"{what} failed: {r['error']} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the embedded default's tiny GPT-2, small sizes")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--precisions", default="float32,bfloat16,bf16-mixed", help=f"of {sorted(WEIGHTS)}")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--samplers", default="multinomial,inverse_cdf", help="token draws (mpo_exp/draws.py)")
    ap.add_argument("--rows", type=int, default=128, help="prompts per stage")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="outputs/bench_stages.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one stage, JSON in and out
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.tiny:  # a smoke test of every code path: one batch size, no bf16 weights
        args.model, args.batches, args.rows, args.new_tokens = "tiny", "8", 32, 8
        args.precisions = "float32,bf16-mixed"
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(WEIGHTS):
        ap.error(f"--precisions: unknown {sorted(unknown)} (known: {sorted(WEIGHTS)})")
    res: dict = {"threads": args.threads, "ceiling_gflops": {}, "runs": [], "failed": []}
    for d in sorted({MATMUL[p] for p in precisions}):
        res["ceiling_gflops"][d] = matmul_gflops(getattr(torch, d), seconds=0.5 if args.tiny else 2.0)
        print(f"matmul {d}: {res['ceiling_gflops'][d]:.0f} GFLOP/s", flush=True)
    for d in precisions:
        runs = [
            (st, sampler)
            for st in args.stages.split(",")
            for sampler in (args.samplers.split(",") if st in SAMPLING else ["multinomial"])
        ]
        for stage, sampler in runs:
            for b in (int(x) for x in args.batches.split(",")):
                spec = dict(
                    model=args.model,
                    precision=d,
                    stage=stage,
                    sampler=sampler,
                    batch=b,
                    rows=args.rows,
                    new_tokens=args.new_tokens,
                    threads=args.threads,
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:  # e.g. killed for memory: recorded, the rest still runs
                    why = "killed (out of memory?)" if out.returncode < 0 else out.stderr.strip()[-300:]
                    res["failed"].append({**spec, "error": why})
                    print(f"{args.model} {d} {_stage(spec)} batch {b}: failed: {why}", flush=True)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                res["runs"].append(r)
                print(
                    f"{args.model} {d} {_stage(spec)} batch {b}: {r['tokens_per_s']:.0f} tokens/s, "
                    f"{100 * r['gflops_per_s'] / res['ceiling_gflops'][MATMUL[d]]:.0f}% of peak, "
                    f"{r['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))
    out_path.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
