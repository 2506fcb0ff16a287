"""The real-model code path (model=hf, task=hf) on a tiny model, reward models and data set saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from mpo_exp.config import build_task
from mpo_exp.pipeline import run_pipeline
from mpo_exp.policies import TinyGPT2Spec, save_policy
from mpo_exp.tasks.hf import (
    BuiltinObjective,
    HFDatasetTask,
    RewardModelObjective,
    parse_objective,
    resolve_head,
)
from mpo_exp.tasks.toy import ToyTask
from tests.conftest import compose_config


def make_local_assets(root):
    """A tiny causal LM, two tiny reward models (a single-logit GPT-2 reward model and a two-class
    DistilBERT classifier) and a JSONL data set whose test prompts are disjoint from train's."""
    if (root / "data").exists():
        return root / "data"
    toy = ToyTask()
    tok = toy.build_tokenizer()
    torch.manual_seed(0)
    save_policy(TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok), root / "lm")
    gpt2 = GPT2Config(
        vocab_size=len(tok),
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    bert = DistilBertConfig(
        vocab_size=len(tok),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        id2label={0: "BORING", 1: "FUNNY"},
        label2id={"BORING": 0, "FUNNY": 1},
    )
    torch.manual_seed(1)
    GPT2ForSequenceClassification(gpt2).save_pretrained(root / "rm_a")
    torch.manual_seed(2)
    DistilBertForSequenceClassification(bert).save_pretrained(root / "rm_b")
    for name in ("rm_a", "rm_b"):
        tok.save_pretrained(root / name)
    data = root / "data"
    data.mkdir()
    train = [{"prompt": p, "chosen": r} for p, r in toy.corpus(64, 0)]  # corpus prompts: toy train split
    test_responses = [r for _, r in toy.corpus(64, 1)]
    test = [
        {"prompt": p, "chosen": r} for p, r in zip(toy.prompts("eval", 64, 1), test_responses, strict=True)
    ]
    for split, rows in (("train", train), ("test", test)):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return data


def local_hf_overrides(root, data) -> list[str]:
    """The real-model path on the assets under ``root``: a local HF checkpoint and data set, one
    objective a saved reward model (``a``) and one programmatic (``b``)."""
    return [
        "task=hf",
        f"task.dataset={data}",
        "task.max_new_tokens=8",
        f"+task.objectives={{a: {root / 'rm_a'}, b: {{builtin: concise, scale: 0.5}}}}",
        "model=hf",
        f"model.name_or_path={root / 'lm'}",
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = make_local_assets(root)
    rows = {
        s: [json.loads(x) for x in (data / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")
    }
    return root, data, rows


def objectives(root):
    return {
        "a": str(root / "rm_a"),  # a plain path: single-logit head -> its logit
        "b": {"model": str(root / "rm_b"), "label": "FUNNY", "output": "prob", "input": "response"},
    }


def test_local_splits_are_disjoint_and_the_task_reads_the_right_one(assets):
    root, data, rows = assets
    train_prompts = {r["prompt"] for r in rows["train"]}
    test_prompts = {r["prompt"] for r in rows["test"]}
    assert train_prompts and test_prompts and not train_prompts & test_prompts
    task = HFDatasetTask(str(data), objectives(root))
    eval_prompts = task.prompts("eval", 20, seed=0)
    assert len(eval_prompts) == 20 and set(eval_prompts) <= test_prompts
    assert set(task.prompts("train", 20, seed=0)) <= train_prompts
    corpus = task.corpus(20, seed=0)
    assert len(corpus) == 20 and set(corpus) <= {(r["prompt"], r["chosen"]) for r in rows["train"]}
    assert len(set(corpus)) > 1


def test_rewards_equal_a_direct_computation_with_each_reward_model(assets):
    root, data, rows = assets
    task = HFDatasetTask(str(data), {**objectives(root), "c": "builtin:concise"}, reward_batch_size=3)
    prompts = [r["prompt"] for r in rows["test"][:7]]
    responses = [r["chosen"] for r in rows["test"][:7]]
    got = task.rewards(prompts, responses)
    tok = AutoTokenizer.from_pretrained(root / "rm_a")
    rm_a = AutoModelForSequenceClassification.from_pretrained(root / "rm_a").eval()
    rm_b = AutoModelForSequenceClassification.from_pretrained(root / "rm_b").eval()
    with torch.no_grad():
        want_a = [
            rm_a(**tok(p + r, return_tensors="pt")).logits[0, 0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        want_b = [rm_b(**tok(r, return_tensors="pt")).logits.softmax(-1)[0, 1] for r in responses]
    torch.testing.assert_close(got[:, 0], torch.stack(want_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1], torch.stack(want_b), atol=1e-5, rtol=1e-5)
    assert got[:, 2].tolist() == [-float(len(r.split())) for r in responses]


@pytest.mark.parametrize("side", ["left", "right"])
def test_oracle_scores_do_not_depend_on_the_batch_or_padding_side(assets, side):
    root, data, rows = assets
    task = HFDatasetTask(str(data), objectives(root))
    for tok, *_ in task._reward_models.values():
        tok.padding_side = side
    prompt, response = rows["test"][0]["prompt"], "whiskers purr"
    alone = task.rewards([prompt], [response])[0]
    longer = "kitten fur paws nap whiskers purr the a and so really very"
    batches = [
        ([prompt, prompt], [response, longer]),  # a longer row: our row is padded
        ([prompt, prompt], [longer, response]),
        ([prompt, prompt, prompt], ["nap", response, "purr"]),  # shorter rows: they are padded
    ]
    for ps, rs in batches:
        inside = task.rewards(ps, rs)[rs.index(response)]
        torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)


def test_objective_specs_are_validated_and_name_the_field():
    assert parse_objective("x", "org/rm") == RewardModelObjective("x", "org/rm")
    assert parse_objective("c", "builtin:concise") == BuiltinObjective("c", "concise")
    spec = parse_objective("c", {"builtin": "concise", "scale": 0.5, "free_words": 2})
    assert spec.params == {"scale": 0.5, "free_words": 2} and spec("p", "one two three four") == -1.0
    bad = [
        ({"builtin": "shortness"}, r"task.objectives.o.builtin: unknown built-in"),
        ({"builtin": "concise", "scale": -1}, r"task.objectives.o.scale must be a number > 0"),
        ({"builtin": "concise", "alpha": 1}, r"task.objectives.o.alpha: unknown parameter"),
        ({"model": "m", "builtin": "concise"}, r"task.objectives.o needs exactly one of"),
        ({"model": "m", "output": "score"}, r"task.objectives.o.output must be one of"),
        ({"model": "m", "input": "prompt"}, r"task.objectives.o.input must be one of"),
        ({"model": "m", "label": -1}, r"task.objectives.o.label must be >= 0"),
        ({"model": "m", "head": 1}, r"task.objectives.o: unknown key"),
        (3, r"task.objectives.o must be a reward model"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_objective("o", value)
    with pytest.raises(ValueError, match="task.objectives must map"):
        HFDatasetTask("x/y", {})


def test_reward_head_defaults_are_explicit():
    def cfg(n, **kw):
        return GPT2Config(num_labels=n, **kw)

    assert resolve_head(RewardModelObjective("o", "m"), cfg(1)) == (0, "logit")
    assert resolve_head(RewardModelObjective("o", "m"), cfg(2)) == (1, "prob")
    assert resolve_head(RewardModelObjective("o", "m", label=0, output="logit"), cfg(2)) == (0, "logit")
    named = cfg(2, id2label={0: "NO_HUMOR", 1: "HUMOR"}, label2id={"NO_HUMOR": 0, "HUMOR": 1})
    assert resolve_head(RewardModelObjective("o", "m", label="HUMOR"), named) == (1, "prob")
    with pytest.raises(ValueError, match=r"task.objectives.o.label: 'FUN' is not a label"):
        resolve_head(RewardModelObjective("o", "m", label="FUN"), named)
    with pytest.raises(ValueError, match=r"task.objectives.o.label: m has 3 classes"):
        resolve_head(RewardModelObjective("o", "m"), cfg(3))
    with pytest.raises(ValueError, match=r"task.objectives.o.label=1 is out of range"):
        resolve_head(RewardModelObjective("o", "m", label=1), cfg(1))


def test_split_marker_absent_is_a_clear_error():
    task = HFDatasetTask("x/y", {"h": "a/b"}, prompt_field="chosen", split_marker="\n\nAssistant:")
    with pytest.raises(
        ValueError, match=r"task.split_marker='\\n\\nAssistant:' does not occur.*Human: hi there"
    ):
        task.split_text({"chosen": "\n\nHuman: hi there\n\nBot: hello"})


def test_prefix_rows_give_review_prefix_prompts_and_continuation_targets(tmp_path):
    text = " ".join(f"w{i}" for i in range(30))
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"text": text}) + "\n" + json.dumps({"text": "too short"})
    )
    task = HFDatasetTask(
        str(tmp_path), {"c": "builtin:concise"}, prompt_field="text", prefix_words=8, response_words=5
    )
    assert task.split_text({"text": text}) == ("w0 w1 w2 w3 w4 w5 w6 w7", " w8 w9 w10 w11 w12")
    assert set(task.corpus(6, seed=0)) == {
        ("w0 w1 w2 w3 w4 w5 w6 w7", " w8 w9 w10 w11 w12")
    }  # no empty targets
    assert (
        HFDatasetTask("x/y", {"c": "builtin:concise"}, prefix_words=8, max_new_tokens=64).response_words == 48
    )
    with pytest.raises(ValueError, match="task.prefix_words and task.split_marker"):
        HFDatasetTask("x/y", {"c": "builtin:concise"}, prefix_words=8, split_marker="A:")
    with pytest.raises(ValueError, match="task.prefix_words must be an integer >= 1"):
        HFDatasetTask("x/y", {"c": "builtin:concise"}, prefix_words=0)


def test_paper_imdb_preset_is_sentiment_classifier_plus_programmatic_conciseness():
    cfg = compose_config(["experiment=paper_imdb", "paths.output_dir=/tmp/x"])
    task = build_task(cfg)
    sentiment, concise = task.objective_specs["sentiment"], task.objective_specs["concise"]
    assert sentiment == RewardModelObjective(
        "sentiment", "lvwerra/distilbert-imdb", 1, "logit", "prompt_response"
    )
    assert isinstance(concise, BuiltinObjective) and concise.builtin == "concise"
    assert task.reward_model_names == {"sentiment": "lvwerra/distilbert-imdb"}
    assert task.prefix_words == 8 and task.split_marker is None
    prompt, response = task.split_text(
        {"text": "This film was a delight from start to finish and I laughed."}
    )
    assert prompt == "This film was a delight from start to" and response == " finish and I laughed."
    hh = build_task(compose_config(["experiment=paper_hh", "paths.output_dir=/tmp/x"]))
    assert [hh.objective_specs[o].label for o in hh.objectives] == [0, 0, 1]


def test_pipeline_on_a_local_hf_model_and_data_set(smoke_cfg, assets, tmp_path):
    root, data, rows = assets
    cfg = smoke_cfg(
        *local_hf_overrides(root, data),
        "eval.n_examples=32",  # = eval.n_prompts: every evaluated (prompt, response) comes back
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["objectives"] == ["a", "b"]
    assert {"pi_ref", "pi_a", "pi_b", "uniform_mix", "mpo_decoded"} <= set(res["policies"])
    lam = res["lambda"]
    assert len(lam) == 2 and all(x >= 0 for x in lam) and sum(lam) == pytest.approx(1, abs=1e-5)
    # evaluation used held-out prompts only
    test_prompts = {r["prompt"] for r in rows["test"]}
    for name, examples in res["examples"].items():
        assert len(examples) == 32 and {" ".join(p.split()) for p, _ in examples} <= test_prompts, name
    # DPO moved each pi_k away from pi_ref (a pi_k equal to pi_ref has KL exactly 0)
    assert res["policies"]["pi_ref"]["kl"] == pytest.approx(0, abs=1e-6)
    assert all(abs(res["policies"][p]["kl"]) > 1e-4 for p in ("pi_a", "pi_b"))
    # the reward columns come from the right oracle: recompute pi_ref's by hand
    tok = AutoTokenizer.from_pretrained(root / "rm_a")
    rm_a = AutoModelForSequenceClassification.from_pretrained(root / "rm_a").eval()
    prompts, responses = zip(*res["examples"]["pi_ref"], strict=True)
    with torch.no_grad():
        a = [
            float(rm_a(**tok(p + r, return_tensors="pt")).logits[0, 0])
            for p, r in zip(prompts, responses, strict=True)
        ]
    b = [-0.5 * len(r.split()) for r in responses]
    reward = res["policies"]["pi_ref"]["reward"]
    assert reward["a"] == pytest.approx(sum(a) / len(a), abs=1e-5)
    assert reward["b"] == pytest.approx(sum(b) / len(b), abs=1e-6)


def test_rl_trains_the_model_lora_adapter_and_saves_it_merged(smoke_cfg, assets, tmp_path):
    """model.lora applies to RL as to SFT and DPO: only the adapter trains, the artifact is a plain model."""
    from safetensors.torch import load_file

    root, data, _ = assets
    cfg = smoke_cfg(
        *local_hf_overrides(root, data),
        "+model.lora={r: 4, alpha: 8, dropout: 0.1, target_modules: [c_attn]}",
        "method=morlhf",
        "rl.iterations=2",
        "rl.batch_size=8",
        "rl.module.lr=1e-2",
    )
    res = run_pipeline(cfg, tmp_path / "run")

    def built(kind: str) -> Path:
        (path,) = [d for d in (tmp_path / "cache" / kind).iterdir() if d.is_dir() and ".tmp-" not in d.name]
        return path / "model.safetensors"

    weights, sft = load_file(built("rl_policy")), load_file(built("sft"))
    assert not any("lora" in k for k in weights)  # merged back into a from_pretrained checkpoint
    moved = [k for k in weights if not torch.equal(weights[k], sft[k])]
    # the adapter targets c_attn only: RL moved those weights and nothing else (full RL moves all)
    assert moved and all("c_attn" in k for k in moved), moved
    assert abs(res["policies"][res["method_policies"][0]]["kl"]) > 0
