"""A battery of bad inputs: each fails before any stage is built, with one line naming the field.

Every case goes through the CLI's own job function (``mpo_exp.cli.run_job``) on the composed
config; a few also run the real ``mpo-exp`` entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpo_exp.cli import run_job
from tests.conftest import compose_config


def _local_data(root: Path, rows: list[dict] | None = None, empty: bool = False) -> Path:
    data = root / "data"
    data.mkdir(exist_ok=True)
    rows = rows if rows is not None else [{"prompt": "explain cats please <sep>", "chosen": "purr"}]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("" if empty else "\n".join(json.dumps(r) for r in rows))
    return data


def _local_model(root: Path) -> Path:
    from mpo_exp.policies import TinyGPT2Spec, save_policy
    from mpo_exp.tasks.toy import ToyTask

    path = root / "lm"
    if not path.exists():
        save_policy(TinyGPT2Spec(n_layer=1, n_embd=16, n_head=2).build(ToyTask().build_tokenizer()), path)
    return path


def _hf(root: Path, **kw) -> list[str]:
    data = kw.get("data") or _local_data(root)
    objectives = kw.get("objectives", "{a: 'builtin:concise'}")
    return ["task=hf", f"task.dataset={data}", f"+task.objectives={objectives}", "task.max_new_tokens=8"]


# (overrides, the field the one-line error must name); a callable builds overrides from tmp_path
BAD = [
    (["+dpo.module.lrr=1"], "dpo.module.lrr"),
    (["+sft.module.foo=1"], "sft.module.foo"),
    (["+reward_model.module.dropout=0.1"], "reward_model.module.dropout"),
    (["+rl.module.kl_coef=0.1"], "rl.module.kl_coef"),
    (["+task.topics=3"], "task.topics"),
    (["+model.n_ctx=32"], "model.n_ctx"),
    (["+method.lr=1"], "method.lr"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch"),
    (["rl.iterations=0"], "rl.iterations"),
    (["rl.module.estimator=bogus"], "rl.module.estimator"),
    (["task.max_new_tokens=70"], "task.max_new_tokens"),
    (["beta=inf"], "must be a finite number"),
    (["eval.temperature=nan"], "eval.temperature"),
    (["eval.temperature=0"], "eval.temperature"),  # the sampler's own check came after every stage
    # the training modules' settings: read only when their stage starts, so checked up front
    (["reward_model.module.warmup_steps=-3"], "reward_model.module.warmup_steps must be an integer >= 0"),
    (["rl.module.clip_range=-1"], "rl.module.clip_range must be a number > 0"),
    (["rl.module.rloo_k=1"], "rl.module.rloo_k must be an integer >= 2"),
    (["rl.module.lam=1.5"], "rl.module.lam must be a number in [0, 1]"),
    (["dpo.module.weight_decay=-0.1"], "dpo.module.weight_decay must be a number >= 0"),
    (["sampling_batch_size=0"], "sampling_batch_size"),
    (["dpo.lora.r=4", "dpo.lora.target_modules=[c_atn]"], "dpo.lora.target_modules: 'c_atn' is no module"),
    (["beta=0"], "beta must be a number > 0"),
    (["beta=-1"], "beta must be a number > 0"),
    (["seed=true"], "seed must be a non-negative integer"),
    (["seed=1.5"], "seed must be a non-negative integer"),
    (["seed=-1"], "seed must be a non-negative integer"),
    (["dpo.module.beta=0.5"], "dpo.module.beta=0.5 differs from beta=0.1"),
    (["sft.max_steps=-1"], "sft.max_steps must be a non-negative integer"),  # 0: pi_ref as loaded
    (["rl.batch_size=1.5"], "rl.batch_size"),
    (["inference_batch_size=0"], "inference_batch_size"),
    (["num_threads=0"], "num_threads"),
    (["preferences.bt_temperature=-1"], "preferences.bt_temperature"),
    (["task.objectives=[helpful,funny]"], "task.objectives: unknown objective(s) ['funny']"),
    (["task.objectives=[]"], "task.objectives"),
    (["method=fixed_mix", "method.weights=[0.9,0.3,0.1]"], "method.weights must sum to 1"),
    (["method=fixed_mix", "method.weights=[0.5,0.5]"], "method.weights has 2 entries for 3 objectives"),
    (["method=morlhf", "method.weights={witty:1.0}"], "method.weights: unknown objective"),
    (["method=morlhf", "method.normalization=rank"], "method.normalization must be one of"),
    (["method=maxmin_rlhf", "method.variants=[mean]"], "method.variants"),
    (["method=maxmin_rlhf", "method.groups=clusters"], "method.groups"),
    (["method.exclude=[kind]"], "method.exclude: unknown objective"),
    (["method.steps=0"], "method.steps must be >= 1"),
    (["method.step_size=bogus"], "method.step_size"),
    (["paths.output_dir=/proc/mpo-exp-not-writable"], "paths.output_dir"),
    (["paths.cache_dir=/proc/mpo-exp-not-writable"], "paths.cache_dir"),
    (["model=hf", "model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': no such local"),
    (["model=hf", "model.name_or_path=someone/not-cached-model"], "model.name_or_path='someone/not-cached"),
    (
        lambda t: ["task=hf", "task.dataset=/no/such/data", "+task.objectives={a: 'builtin:concise'}"],
        "task.dataset",
    ),
    (lambda t: _hf(t, objectives="{a: /no/such/rm}"), "task.objectives.a='/no/such/rm'"),
    (lambda t: _hf(t, objectives="{a: {model: /no/such/rm}}"), "task.objectives.a.model"),
    (
        lambda t: _hf(t, data=_local_data(t, rows=[{"prompt": "x"}])),
        "has no field 'chosen' (set by task.response_field)",
    ),
    (lambda t: _hf(t, data=_local_data(t, empty=True)), "train.jsonl is empty"),
    (
        lambda t: [*_hf(t), "task.split_marker=x", "task.prefix_words=3"],
        "task.prefix_words and task.split_marker are two ways to split a row: set one",
    ),
]


def _overrides(case, tmp_path: Path) -> list[str]:
    return case(tmp_path) if callable(case) else list(case)


@pytest.mark.parametrize(("case", "field"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_fails_before_compute_with_one_line(case, field, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    cfg = compose_config(
        [f"paths.cache_dir={cache}", f"paths.output_dir={out}", "logger=none", *_overrides(case, tmp_path)]
    )
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg, cfg.paths.output_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mpo-exp: error: ") and field in err[0], err[0]
    assert "Traceback" not in err[0]
    built = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not built, built  # no stage was built (not even started)


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "MPO_EXP_CACHE": str(tmp_path / "c"),
    }
    return subprocess.run(
        [sys.executable, "-m", "mpo_exp.cli", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["+dpo.module.lrr=1"], "dpo.module.lrr"),
        (["beta=inf"], "finite"),
        (["model=hf", "model.name_or_path=/no/such/model"], "model.name_or_path"),
    ],
)
def test_cli_prints_one_line_and_exits_non_zero(args, field, tmp_path):
    out = _cli(args, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and field in lines[0] and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "c").exists() or not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


def test_a_local_model_path_passes_validation(tmp_path):
    from mpo_exp.config import validate_config

    model = _local_model(tmp_path)
    cfg = compose_config(
        ["model=hf", f"model.name_or_path={model}", *_hf(tmp_path), "paths.output_dir=/tmp/x"]
    )
    validate_config(cfg)  # no error: a real local model and data set are accepted


def test_a_full_disk_fails_before_compute(tmp_path, monkeypatch, capsys):
    """The output disk is checked with a real write (and fsync) before the first stage."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    cfg = compose_config(
        [f"paths.cache_dir={tmp_path / 'c'}", f"paths.output_dir={tmp_path / 'out'}", "logger=none"]
    )
    with pytest.raises(SystemExit):
        run_job(cfg, cfg.paths.output_dir)
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpo-exp: error: paths.output_dir=") and "No space left on device" in err
    assert not list((tmp_path / "out").iterdir())  # the probe is removed again


def test_results_survive_a_failing_disk_at_the_end(smoke_cfg, tmp_path, monkeypatch):
    """Compute finished, then results.json cannot be written: the table was already announced,
    every policy's evaluation is in evaluations.partial.jsonl, and no empty .tmp is left."""
    import errno
    from pathlib import Path as RealPath

    from mpo_exp.pipeline import run_pipeline

    write_text = RealPath.write_text

    def disk_full_for_results(self, text, *args, **kwargs):
        if self.name.startswith("results."):
            self.open("w").close()  # the file is created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    announced = []
    monkeypatch.setattr(RealPath, "write_text", disk_full_for_results)
    with pytest.raises(OSError, match="No space"):
        run_pipeline(smoke_cfg("method=fixed_mix"), tmp_path / "job", announce=announced.append)
    assert announced and "fixed_mix_0.33_0.33_0.33" in announced[0]["policies"]
    rows = [
        json.loads(line) for line in (tmp_path / "job" / "evaluations.partial.jsonl").read_text().splitlines()
    ]
    assert [r["policy"] for r in rows] == list(announced[0]["policies"])
    assert not list((tmp_path / "job").glob("*.tmp"))
