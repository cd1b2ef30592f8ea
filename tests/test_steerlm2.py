"""SteerLM 2.0: the rows' format, the Beta binning of P(a|x,y), the loss against its listwise cross-entropy
form, the baseline at theta = Q', TP/PP/DP parity, and prepare → train end to end on the synthetic world."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import mpmath
import pytest
import torch

from steerlm import runtime
from steerlm.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, compose, to_typed
from steerlm.config.lora import LoraConfig
from steerlm.config.sft import SFTConfig
from steerlm.data.attributes import AttributeSchema
from steerlm.data.collate import Example, pad_batch
from steerlm.data.jsonl import json_line
from steerlm.data.records import Role, Turn
from steerlm.data.steerlm2 import (
    LOG_Q,
    ResponseGroup,
    SampledResponse,
    attribute_level_log_probability,
    blank_group,
    group_batch,
    read_steerlm2_rows,
    to_steerlm2_json,
)
from steerlm.errors import DataError
from steerlm.models import build_model_chunks, lora
from steerlm.models.sharding import gather_full, named_global_parameters
from steerlm.training import STEERLM2, microbatches_for_rank, predict, wrap_for_training
from steerlm.training.step import _prepared as step_prepared
from steerlm.training.step import forward_backward_metrics
from tests.conftest import TEST_MODEL
from tests.multiproc import run_distributed
from tests.recipe_runner import TORCHRUN_2, metric_rows, run_recipe

SCHEMA = AttributeSchema("helpsteer2", ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
N = 3  # responses per prompt


def _groups(prompts: int, seed: int, vocab: int = TEST_MODEL.vocab_size) -> list[ResponseGroup]:
    """Random responses of different lengths (a shared prompt prefix, the response trained), random targets
    and random log Q'."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(prompts):
        prefix = torch.randint(1, vocab, (6,), generator=generator).tolist()
        examples = []
        for _ in range(N):
            response = torch.randint(
                1, vocab, (int(torch.randint(3, 12, (1,), generator=generator)),), generator=generator
            )
            ids = prefix + response.tolist()
            examples.append(Example(tuple(ids), (False,) * len(prefix) + (True,) * len(response), f"p{g}"))
        weights = torch.softmax(3 * torch.randn(N, generator=generator, dtype=torch.float64), 0).tolist()
        log_q = (-20 * torch.rand(N, generator=generator, dtype=torch.float64)).tolist()
        groups.append(ResponseGroup(tuple(examples), tuple(weights), tuple(log_q), f"p{g}"))
    return groups


def _log_pi(chunk, batch) -> torch.Tensor:
    """Independent log pi(y): full-vocabulary log-softmax of the logits, gathered at the labels, summed over
    the trained positions."""
    logits = chunk(batch["tokens"], batch["position_ids"], None).float()
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * batch["loss_mask"]).sum(-1)


@pytest.fixture(scope="module")
def chunk(layout):
    return build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=11)[0], layout


def _prepared(chunk, layout, batch):
    return STEERLM2.prepare([batch], lambda batches, task: predict([chunk], batches, layout, task))[0]


def test_loss_gradient_equals_the_listwise_cross_entropy_gradient(chunk) -> None:
    model, layout = chunk
    groups = _groups(2, seed=1)
    batch = _prepared(model, layout, group_batch(groups, pad_id=0))
    model.zero_grad()
    loss_sum, count, report = STEERLM2.loss(batch, STEERLM2.forward(model, batch))
    (loss_sum / count).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    log_pi = _log_pi(model, batch).view(-1, N)
    scores = log_pi - batch["log_q"].view(-1, N).float()
    target = batch["target_weight"].view(-1, N).float()
    tokens = batch["loss_mask"].sum(-1).view(-1, N).mean(-1)
    cross_entropy = -(target * torch.log_softmax(scores, -1)).sum(-1) / tokens
    cross_entropy.mean().backward()
    assert int(count) == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    baseline = torch.softmax(scores.detach().double(), -1)
    torch.testing.assert_close(batch["baseline_log_weight"].exp().view(-1, N), baseline, rtol=1e-5, atol=1e-6)
    kl = (target.double() * (target.double().log() - baseline.log())).sum(-1).sum()
    assert report["distance"][0].item() == pytest.approx(kl.item(), rel=1e-5)


def test_baseline_is_uniform_when_the_model_is_q(chunk) -> None:
    model, layout = chunk
    groups = _groups(2, seed=2)
    with torch.no_grad():  # log Q' one response at a time, unpadded: another batching than the training step's
        log_q = [_log_pi(model, pad_batch([e], pad_id=0)).item() for g in groups for e in g.examples]
    groups = [
        ResponseGroup(g.examples, g.target_weights, tuple(log_q[i * N : (i + 1) * N]), g.source)
        for i, g in enumerate(groups)
    ]
    batch = _prepared(model, layout, group_batch(groups, pad_id=0))
    uniform = torch.full((2 * N,), 1 / N, dtype=torch.float64)
    torch.testing.assert_close(batch["baseline_log_weight"].exp(), uniform, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        _, _, report = STEERLM2.loss(batch, STEERLM2.forward(model, batch))
    kl_to_uniform = sum(w * math.log(N * w) for g in groups for w in g.target_weights)
    assert report["distance"][0].item() == pytest.approx(kl_to_uniform, rel=1e-4)


def test_the_baseline_pass_is_the_model_s_own_without_dropout(layout) -> None:
    """A training step's baseline pass runs in eval mode: with LoRA dropout on, a model that is Q' still gives a
    uniform b (a pass in training mode would draw masks and score other models), and the model is left training."""
    model = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=11)[0]
    lora.attach([model], LoraConfig(rank=4, alpha=8.0, dropout=0.5), seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora_b"):
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    groups = _groups(2, seed=2)
    model.eval()
    with torch.no_grad():
        log_q = [_log_pi(model, pad_batch([e], pad_id=0)).item() for g in groups for e in g.examples]
    model.train()
    groups = [
        ResponseGroup(g.examples, g.target_weights, tuple(log_q[i * N : (i + 1) * N]), g.source)
        for i, g in enumerate(groups)
    ]
    batch = step_prepared([model], [group_batch(groups, pad_id=0)], layout, STEERLM2)[0]
    uniform = torch.full((2 * N,), 1 / N, dtype=torch.float64)
    torch.testing.assert_close(batch["baseline_log_weight"].exp(), uniform, rtol=1e-5, atol=1e-6)
    assert model.training
    with torch.no_grad():  # in training mode the masks do change the model's scores
        assert abs(_log_pi(model, pad_batch([groups[0].examples[0]], pad_id=0)).item() - log_q[0]) > 1e-3


def test_a_blank_group_counts_for_nothing(chunk) -> None:
    model, layout = chunk
    groups = _groups(1, seed=3)
    alone = _prepared(model, layout, group_batch(groups, pad_id=0))
    filled = _prepared(model, layout, group_batch(groups + [blank_group(N, 0)], pad_id=0))
    with torch.no_grad():
        one = STEERLM2.loss(alone, STEERLM2.forward(model, alone))
        two = STEERLM2.loss(filled, STEERLM2.forward(model, filled))
    assert int(one[1]) == int(two[1]) == 1
    torch.testing.assert_close(two[0], one[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(two[2]["distance"], one[2]["distance"], rtol=1e-5, atol=1e-7)


def _row(n: int = N, label: str | None = "helpfulness:4,verbosity:1") -> dict:
    """A row as NeMo-Aligner's docs show it (numbers where its docs write "v1"…)."""
    return {
        "system": "be brief",
        "prompt_turns": [
            {"from": "User", "value": "hi"},
            {"from": "Assistant", "value": "hello"},
            {"from": "User", "value": "what is 2+2?"},
        ],
        "label": label,
        "responses": [
            {"from": "Assistant", "value": f"answer {i}", "log(P(a|x,y))": -1.5 * i, "log(P(y|x))": -10.0 - i,
             "log(Q(y|a,x))": -9.0 + 0.5 * i, "finish_reason": "stop"}
            for i in range(n)
        ],
    }  # fmt: skip


def test_rows_round_trip_and_give_nemo_aligners_targets(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [_row(), _row(label=None)]
    path.write_text("".join(json_line(row) for row in rows))
    read = list(read_steerlm2_rows(path, SCHEMA))
    assert [to_steerlm2_json(row, SCHEMA) for row in read] == rows
    assert read[0].prompt_turns[-1] == Turn(Role.user, "what is 2+2?") and read[0].labels["verbosity"] == 1
    assert read[0].responses[1] == SampledResponse("answer 1", -1.5, -11.0, -8.5, {"finish_reason": "stop"})
    # NeMo-Aligner's SteerLM2Dataset: ws = softmax(logP(a|x,y) + logP(y|x) - logQ(y|a,x)) over the responses
    scores = [-1.5 * i + (-10.0 - i) - (-9.0 + 0.5 * i) for i in range(N)]
    expected = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    assert read[0].target_weights() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("row", "line", "field"),
    [
        ({**_row(), "label": "verbosity:1,helpfulness:4"}, 2, "label"),
        (_row(n=2), 2, "responses"),
        ({**_row(), "prompt_turns": _row()["prompt_turns"][:2]}, 2, "prompt_turns"),
        ({**_row(), "responses": [{**_row()["responses"][0], LOG_Q: "v3"}] * N}, 2, f"responses[0].{LOG_Q}"),
        ({**_row(), "responses": [{**_row()["responses"][0], "value": " "}] * N}, 2, "responses[0].value"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_field(tmp_path: Path, row: dict, line: int, field: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json_line(_row()) + json_line(row))
    with pytest.raises(DataError) as error:
        list(read_steerlm2_rows(path, SCHEMA))
    assert (error.value.line, error.value.field) == (line, field)


@pytest.mark.parametrize("concentration", [4.0, 20.0, 200.0])
def test_beta_binning_matches_an_independent_beta_integral(concentration: float) -> None:
    schema = AttributeSchema("s", ("a",), 0, 4, True)
    for score in (-0.7, 0.0, 1.3, 2.0, 3.9, 4.0, 6.0):
        mean = (min(max(score, 0.0), 4.0) + 0.5) / 5
        alpha, beta = mean * concentration, (1 - mean) * concentration
        probabilities = []
        for level in range(5):
            got = attribute_level_log_probability(score, level, schema, concentration)
            with mpmath.workdps(150):  # tail masses down to 1e-102 of the total: enough digits to subtract
                expected = float(mpmath.log(mpmath.betainc(alpha, beta, level / 5, (level + 1) / 5, regularized=True)))
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
            probabilities.append(math.exp(got))
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-12)
        assert max(range(5), key=probabilities.__getitem__) == round(min(max(score, 0.0), 4.0))


def test_steerlm2_objective_refuses_what_would_change_the_scored_tokens(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json_line(_row()))
    overrides = [f"data.train_file={rows}", f"tokenizer.path={tmp_path}", "sft.objective=steerlm2"]
    cfg = to_typed(compose("train_sft", overrides), SFTConfig)
    cfg.sft.validate()
    for key, value in (("packing", "true"), ("answer_only_loss", "false"), ("system_prompt", "hi")):
        with pytest.raises(ConfigError) as error:
            to_typed(compose("train_sft", [*overrides, f"sft.{key}={value}"]), SFTConfig).sft.validate()
        assert error.value.key == f"sft.{key}"


# --- TP=2, PP=2 and DP=2 (TP=1) agree on the baseline, the loss, the distance and the gradients ------------

PARITY_MODEL = ModelConfig(
    num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2, vocab_size=300,
    max_position_embeddings=64,
)  # fmt: skip
PARITY_LAYOUTS = {
    "dp2": ParallelConfig(),
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}


def _parity_run(name: str) -> dict:
    layout = runtime.initialize(PARITY_LAYOUTS[name], seed=7)
    chunks = build_model_chunks(PARITY_MODEL, PrecisionConfig(), layout, seed=7)
    model = wrap_for_training(chunks, PrecisionConfig(), False, layout)
    batch = group_batch(_groups(4, seed=9, vocab=PARITY_MODEL.vocab_size), pad_id=0)
    microbatches = microbatches_for_rank(batch, 1 * N, layout)  # one prompt per micro-batch
    for chunk in model:
        chunk.zero_grad_buffer()
    baseline = STEERLM2.prepare(microbatches, lambda b, task: predict(model, b, layout, task))
    loss, count, metrics = forward_backward_metrics(model, microbatches, layout, STEERLM2)
    grads = {
        name: gather_full(p.main_grad.detach(), p, layout.pg_collection.tp).clone()
        for name, p in named_global_parameters([chunk.module for chunk in model])
    }
    out = {
        "baseline": torch.cat([mb["baseline_log_weight"] for mb in baseline]),
        "target": torch.cat([mb["target_weight"] for mb in baseline]),
        "loss": loss,
        "count": count,
        "distance": metrics["distance"],
        "grads": grads,
    }
    runtime.shutdown(destroy_process_group=False)
    return out


def _parity_all() -> dict:
    results = {name: _parity_run(name) for name in PARITY_LAYOUTS}
    runtime.shutdown()
    return results


@pytest.mark.slow
def test_tp2_pp2_and_dp2_agree_on_baseline_loss_distance_and_gradients() -> None:
    ranks = run_distributed(_parity_all, 2)
    dp = {  # each data-parallel rank holds two of the four prompts
        "baseline": torch.cat([ranks[0]["dp2"]["baseline"], ranks[1]["dp2"]["baseline"]]),
        "target": torch.cat([ranks[0]["dp2"]["target"], ranks[1]["dp2"]["target"]]),
    }
    grads = {**ranks[0]["pp2"]["grads"], **ranks[1]["pp2"]["grads"]}  # each pipeline stage holds half the layers
    assert set(grads) == set(ranks[0]["dp2"]["grads"])
    for name in ("tp2", "pp2"):
        torch.testing.assert_close(ranks[0][name]["baseline"], dp["baseline"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[0][name]["target"], dp["target"], rtol=0, atol=0)
        for key in ("loss", "distance", "count"):
            for rank in ranks:
                assert rank[name][key] == pytest.approx(ranks[0]["dp2"][key], rel=1e-5), (name, key)
    assert ranks[0]["dp2"]["count"] == 4
    assert (dp["baseline"].exp() - 1 / N).abs().max() > 0.01  # the random model is not Q': b is not uniform
    for parameter, expected in ranks[0]["dp2"]["grads"].items():
        scale = expected.abs().max().clamp_min(1e-12)
        for got in (ranks[0]["tp2"]["grads"][parameter], grads[parameter]):
            assert ((got - expected).abs().max() / scale).item() < 1e-4, parameter


# --- prepare_steerlm2 → train_sft sft.objective=steerlm2 on the synthetic world ------------------------------


@pytest.fixture(scope="module")
def steerlm2_models(steerable, tmp_path_factory) -> dict:
    """Q' (the shared steerable SFT run), a plain-SFT model and a regression APM trained a few steps: any weights
    serve the recomputation checks."""
    root, data = tmp_path_factory.mktemp("steerlm2_models"), steerable["data"]
    short = [
        f"data.train_file={data}/annotated.jsonl",
        f"tokenizer.path={data}/tokenizer",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        "trainer.eval_interval=null",
        "checkpoint.save_interval=null",
    ]
    plain = run_recipe("train_sft", [*short, "sft.condition_on_attributes=false", f"output_dir={root / 'plain'}"])
    assert plain.returncode == 0, plain.stderr[-2000:]
    apm = run_recipe("train_attribute_model", [*short, f"output_dir={root / 'apm'}"])
    assert apm.returncode == 0, apm.stderr[-2000:]
    return {"data": data, "sft": steerable["sft"], "plain": root / "plain", "apm": root / "apm"}


def _prepare_args(models: dict, output: Path) -> list[str]:
    return [
        f"steerlm_checkpoint={models['sft']}",
        f"plain_sft_checkpoint={models['plain']}",
        f"apm_checkpoint={models['apm']}",
        f"input={models['data']}/annotated.jsonl",
        "format=helpsteer2",
        f"output={output}",
        "max_prompts=6",
        "num_responses=3",
        "shard_size=3",
        "max_new_tokens=48",
    ]


def _recomputed_log_probs(checkpoint: Path, rows: list, layout) -> list[float]:
    """log p(y|prompt) of every response, one sequence at a time from the full logits: the prompt generation
    reads (attribute line only if the model was trained with them), then `{y}\\n<extra_id_1>`."""
    from steerlm.data.collate import prompt_ids
    from steerlm.inference.loading import load_generator

    loaded = load_generator(str(checkpoint), layout, PrecisionConfig())
    model, config, out = loaded.generator.model, loaded.template.config, []
    for row in rows:
        prompt = prompt_ids(loaded.template, loaded.tokenizer, row.system, row.prompt_turns, row.labels)
        for response in row.responses:
            ids = prompt + loaded.tokenizer.encode(response.text + config.turn_suffix + config.end_of_turn)
            tokens = torch.tensor([ids[:-1]])
            with torch.no_grad():
                logits = model(tokens, torch.arange(len(ids) - 1)[None], None).float()
            picked = torch.log_softmax(logits[0], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            out.append(picked[len(prompt) - 1 :].sum().item())
    return out


def _beta_log_probability(scores: list[float], labels: dict, schema: AttributeSchema, concentration: float) -> float:
    total = 0.0
    levels = int(schema.max_value - schema.min_value) + 1
    for name, score in zip(schema.attributes, scores):
        if labels.get(name) is None:
            continue
        mean = (min(max(score, schema.min_value), schema.max_value) - schema.min_value + 0.5) / levels
        with mpmath.workdps(150):
            low, high = (labels[name] - schema.min_value) / levels, (labels[name] - schema.min_value + 1) / levels
            mass = mpmath.betainc(mean * concentration, (1 - mean) * concentration, low, high, regularized=True)
            total += float(mpmath.log(mass))
    return total


@pytest.mark.slow
def test_prepare_steerlm2_rows_resume_tp2_and_training_lowers_distance(steerlm2_models, layout, tmp_path) -> None:
    from steerlm.data.records import Conversation
    from steerlm.inference.loading import read_checkpoint_setup
    from steerlm.inference.scoring import AttributeScorer

    models, output = steerlm2_models, tmp_path / "rows.jsonl"
    made = run_recipe("prepare_steerlm2", _prepare_args(models, output))
    assert made.returncode == 0, made.stderr[-3000:]
    schema = read_checkpoint_setup(str(models["sft"])).schema
    rows = list(read_steerlm2_rows(output, schema))
    assert len(rows) == json.loads(Path(f"{output}.summary.json").read_text())["prompts"] >= 4
    responses = [r for row in rows for r in row.responses]
    assert len({r.text for r in responses}) > len(rows)  # sampled, not greedy copies

    log_q = _recomputed_log_probs(models["sft"], rows, layout)
    assert [r.log_q for r in responses] == pytest.approx(log_q, rel=1e-5, abs=1e-3)
    log_p = _recomputed_log_probs(models["plain"], rows, layout)
    assert [r.log_p_response for r in responses] == pytest.approx(log_p, rel=1e-5, abs=1e-3)
    scorer = AttributeScorer.from_checkpoint(models["apm"], layout)
    conversations = [
        Conversation(row.system, (*row.prompt_turns, Turn(Role.assistant, r.text)))
        for row in rows
        for r in row.responses
    ]
    scores = iter(scorer.score(conversations))
    for row in rows:
        for response in row.responses:
            values = [value for name, value in next(scores).items() if name in schema.attributes]
            assert response.extra["attribute_scores"] == pytest.approx(values, abs=1e-4)
            expected = _beta_log_probability(values, row.labels, schema, 20.0)
            assert response.log_p_attributes == pytest.approx(expected, rel=1e-6)

    # an interrupted run: the last shard's attribute pass never finished, and the output was never written
    text = output.read_text()
    manifest = Path(f"{output}.parts") / "attributes" / "manifest.json"
    saved = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**saved, "done": saved["done"][:-1]}))
    output.unlink()
    again = run_recipe("prepare_steerlm2", _prepare_args(models, output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["shards_skipped"] == {"sample": 2, "plain": 2, "attributes": 1}
    assert output.read_text() == text

    # the first shard at TP=2 and at PP=2: the same seeded draws, the same log-probabilities
    for parallel in ("tp2", "pp2"):
        args = [*_prepare_args(models, tmp_path / f"{parallel}.jsonl"), "max_prompts=3", f"parallel={parallel}"]
        split_run = run_recipe("prepare_steerlm2", args, TORCHRUN_2)
        assert split_run.returncode == 0, split_run.stderr[-3000:]
        split = [r for row in read_steerlm2_rows(tmp_path / f"{parallel}.jsonl", schema) for r in row.responses]
        assert split and [r.text for r in split] == [r.text for r in responses[: len(split)]], parallel
        for ours, theirs in zip(split, responses):
            logs = (ours.log_q, ours.log_p_response, ours.log_p_attributes)
            assert logs == pytest.approx((theirs.log_q, theirs.log_p_response, theirs.log_p_attributes), abs=1e-3)

    # SteerLM 2.0 from Q' itself: b starts uniform, so the distance starts at the mean KL(w || uniform)
    run = tmp_path / "steerlm2"
    trained = run_recipe(
        "train_sft",
        [
            "sft.objective=steerlm2",
            f"sft.init_from={models['sft']}",
            f"data.train_file={output}",
            f"data.validation_file={output}",
            f"tokenizer.path={models['data']}/tokenizer",
            f"output_dir={run}",
            "trainer.micro_batch_size=3",
            "trainer.global_batch_size=6",  # every prompt each step: the distance falls smoothly
            "trainer.max_steps=6",
            "trainer.log_interval=1",
            "trainer.eval_interval=null",
            "checkpoint.save_interval=null",
            "optim.lr=3e-5",
            "optim.min_lr=3e-5",
            "optim.lr_warmup_steps=0",
        ],
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    uniform = sum(w * math.log(N * w) for row in rows for w in row.target_weights() if w > 0) / len(rows)
    assert result["initial_validation"]["distance"] == pytest.approx(uniform, rel=1e-3)
    assert result["final_validation"]["distance"] < 0.1 * result["initial_validation"]["distance"]
    logged = [row["distance"] for row in metric_rows(run) if "distance" in row]
    assert len(logged) == 6 and logged[-1] < 0.2 * logged[0]
    # what it was trained to answer: every response carries its row's attribute line
    written = json.loads((run / "attribute_lines.json").read_text())
    assert written == result["attribute_lines"] and written["lines"] == N * len(rows)
    for name in schema.attributes:
        expected = Counter(
            f"{row.labels[name]:g}" for row in rows if row.labels for _ in range(N) if row.labels.get(name) is not None
        )
        assert written["levels"][name] == dict(sorted(expected.items())), name
