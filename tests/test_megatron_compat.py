"""Items 1-12 of steerlm.megatron_compat checked against the installed megatron-core: a release that changes
what an item relies on fails here, naming the item. Items 13-15: tests/test_megatron_compat_layers.py."""

from __future__ import annotations

import inspect
import queue
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.pipeline_parallel.schedules import custom_backward

from steerlm import megatron_compat
from steerlm.checkpoint.integrity import CheckpointError
from steerlm.checkpoint.sharded import load_checkpoint, save_checkpoint
from steerlm.config import DType, OptimizerConfig, ParallelConfig, PrecisionConfig, TrainConfig
from steerlm.config.validation import transformer_engine_available
from steerlm.megatron_compat import (
    GPTModelWithLossHead,
    GPTModelWithOwnHead,
    SDPACoreAttention,
    check_megatron_version,
    extra_linear_sharded_state,
    pack_qkv,
    split_fc1,
    split_qkv,
    split_qkv_heads,
)
from steerlm.models import build_model_chunks
from steerlm.runtime import cpu_matmul
from steerlm.training import TrainingSetup, build_training, microbatches_for_rank, train_step
from tests.conftest import TEST_MODEL
from tests.parity_scenarios import TRAINER, global_batch
from tests.recipe_runner import checkpoint_tensors

# 1. supported range


@pytest.mark.parametrize("found", ["0.16.1", "0.16.9", "0.16.2rc1"])
def test_supported_versions_pass(found):
    check_megatron_version(found)


@pytest.mark.parametrize("found", ["0.16.0", "0.17.0", "1.0.0"])
def test_unsupported_versions_are_refused_with_the_fix(found):
    with pytest.raises(
        ImportError, match=rf"megatron-core {found} is installed.*pip install 'megatron-core>=0.16.1,<0.17.0'"
    ):
        check_megatron_version(found)


# 2. CPU stand-ins


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-ins are only active without CUDA")
def test_cpu_stand_ins_redirect_cuda_and_name_tensors_like_cuda(layout):
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu" and torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    with megatron_compat.lifted():
        assert torch.ones(1).type() == "torch.FloatTensor"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-ins are only active without CUDA")
def test_recomputations_checkpoint_saves_and_restores_the_cpu_rng_without_a_device_rng(layout):
    """Item 2's device-RNG stand-ins: megatron's checkpoint (layer recomputation) runs on CPU, and a dropout inside it
    draws the same mask again in the backward from the CPU generator it restores."""
    from megatron.core import tensor_parallel

    assert tensor_parallel.random._get_cuda_rng_state is megatron_compat._no_device_rng_state
    assert tensor_parallel.random._set_cuda_rng_state is megatron_compat._restore_no_device_rng_state
    x = torch.randn(64, 8, requires_grad=True)
    torch.manual_seed(5)
    out = tensor_parallel.checkpoint(lambda t: F.dropout(t * 2, p=0.5), False, x)
    out.sum().backward()
    kept = out.detach() != 0  # the forward's mask; the recomputed backward must use it too
    assert kept.any() and not kept.all()
    assert torch.equal(x.grad, kept * 4.0)  # d/dx of dropout(2x) with scale 1/(1-p) = 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-ins are only active without CUDA")
def test_megatrons_linear_products_go_through_the_installed_route(layout):
    """Every linear layer's three products (forward, input gradient, weight gradient) reach the route, and the
    model's gradients with oneDNN's products equal those with torch's BLAS within fp32 rounding."""
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=3)[0]
    linears = [m for m in chunk.modules() if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]
    tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def counted(a, b):
        calls.append((a, b))
        return cpu_matmul.matmul(a, b)

    def gradients(route) -> list[torch.Tensor]:
        previous = megatron_compat.route_matmuls(route)
        try:
            chunk.zero_grad()
            loss = chunk(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).sum()
            # as megatron's schedules run the backward: the engine directly (`Tensor.backward()` is itself a
            # torch function, which the stand-in mode would see as one call, its products unseen)
            custom_backward(loss, torch.ones_like(loss))
        finally:
            megatron_compat.route_matmuls(previous)
        return [p.grad.clone() for p in chunk.parameters()]

    blas = gradients(None)
    assert not calls
    routed = gradients((cpu_matmul.routable, counted))
    for linear in linears:
        weight = linear.weight.data_ptr()
        assert sum(b.data_ptr() == weight for _, b in calls) == 2  # forward (weight.t()) and input gradient
    assert sum(a.stride(0) == 1 and a.stride(1) != 1 for a, _ in calls) >= len(linears)  # weight gradients
    for got, want in zip(routed, blas):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# 3. synchronous dist-checkpoint saves


def test_save_queue_is_replaced_in_process(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    megatron_compat.use_in_process_save_queue.__wrapped__()
    assert isinstance(filesystem_async._results_queue, queue.Queue)


def test_save_queue_refuses_a_megatron_without_it(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.delattr(filesystem_async, "_results_queue")
    with pytest.raises(RuntimeError, match="has no _results_queue"):
        megatron_compat.use_in_process_save_queue.__wrapped__()


# 4. own output heads


class _SumHead(GPTModelWithOwnHead):
    def own_head(self, hidden_states):
        return hidden_states.sum(-1, keepdim=True).transpose(0, 1)


def test_own_head_replaces_the_output_layer(layout):
    from megatron.core.models.gpt import GPTModel

    assert "hidden_states" in inspect.signature(GPTModel._postprocess).parameters
    model = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1, model_class=_SumHead)[0].eval()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)
    captured = {}
    model.decoder.register_forward_hook(lambda module, args, output: captured.setdefault("hidden", output))
    with torch.no_grad():
        scores = model(tokens, positions, None)
    assert scores.shape == (2, 12, 1)
    torch.testing.assert_close(scores, captured["hidden"].sum(-1, keepdim=True).transpose(0, 1))


class _MeanLossHead(GPTModelWithLossHead):
    def loss_head(self, hidden_states, labels):
        return hidden_states.mean(-1).transpose(0, 1) + labels


def test_loss_head_receives_hidden_states_and_labels_and_logits_stay_megatrons(layout):
    from megatron.core.models.gpt import GPTModel

    assert {"hidden_states", "labels"} <= set(inspect.signature(GPTModel._postprocess).parameters)
    ours = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1, model_class=_MeanLossHead)[0].eval()
    plain = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1, model_class=GPTModel)[0].eval()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)
    captured = {}
    ours.decoder.register_forward_hook(lambda module, args, output: captured.setdefault("hidden", output))
    with torch.no_grad():
        loss = ours(tokens, positions, None, labels=tokens)
        torch.testing.assert_close(ours(tokens, positions, None), plain(tokens, positions, None))
    torch.testing.assert_close(loss, captured["hidden"].mean(-1).transpose(0, 1) + tokens)


# 5. SDPA core attention


def test_sdpa_takes_the_core_attention_constructor_megatron_passes():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    theirs = list(inspect.signature(DotProductAttention.__init__).parameters)
    ours = list(inspect.signature(SDPACoreAttention.__init__).parameters)
    assert ours == theirs


def test_sdpa_attention_equals_megatron_dot_product_attention(layout) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from steerlm.megatron_compat import SDPACoreAttention

    config = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=7)[0].config
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)
    generator = torch.Generator().manual_seed(0)
    seq, batch, heads, groups, dim = 16, 2, 4, 2, 16
    query = torch.randn(seq, batch, heads, dim, generator=generator)
    key = torch.randn(seq, batch, groups, dim, generator=generator)
    value = torch.randn(seq, batch, groups, dim, generator=generator)
    torch.testing.assert_close(ours(query, key, value, None), theirs(query, key, value, None), rtol=1e-5, atol=1e-6)
    padding = torch.zeros(batch, 1, seq, seq, dtype=torch.bool)
    padding[1, :, :, 10:] = True  # row 1 may not attend to its last 6 positions
    mask = padding | torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    torch.testing.assert_close(
        ours(query, key, value, mask, attn_mask_type=AttnMaskType.padding),
        theirs(query, key, value, mask, attn_mask_type=AttnMaskType.padding),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_attention_runs_a_fused_kernel_and_equals_repeated_heads(masked) -> None:
    """Where SDPA's `enable_gqa` has no fused kernel (torch 2.6 on CPU) the key/value heads are repeated, so no
    configuration takes the math path, which keeps `[b, heads, s, s]` probabilities for the backward."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, groups, seq, dim = 2, 4, 2, 24, 16
    query = torch.randn(batch, heads, seq, dim, generator=generator, requires_grad=True)
    key = torch.randn(batch, groups, seq, dim, generator=generator, requires_grad=True)
    value = torch.randn(batch, groups, seq, dim, generator=generator, requires_grad=True)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril() if masked else None
    mask = None if mask is None else mask & (torch.arange(seq) < seq - 5)  # the last 5 keys hidden from every query
    with torch.profiler.profile() as profile:
        ours = megatron_compat.grouped_sdpa(query, key, value, attn_mask=mask, is_causal=not masked)
        ours.sum().backward()
    kernels = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in kernels
    assert kernels & {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention"}
    grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    reference = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(heads // groups, dim=1),
        value.repeat_interleave(heads // groups, dim=1),
        attn_mask=mask,
        is_causal=not masked,
    )
    reference.sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for ours_grad, t in zip(grads, (query, key, value)):
        torch.testing.assert_close(ours_grad, t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("rows", "positions", "keys", "folded"),
    [(4, 1, 40, True), (3, 6, 40, True), (1, 300, 300, False)],
    ids=["decode_step", "prefill_chunk", "mask_larger_than_the_keys"],
)
def test_masked_grouped_attention_without_a_fused_kernel_folds_the_groups(monkeypatch, rows, positions, keys, folded):
    """Where `enable_gqa` has no fused kernel with a mask (CUDA's memory-efficient kernel; forced here), a decode step
    or a prefill chunk folds each group's query heads into its positions instead of repeating the key/value heads:
    the same attention (to rounding), and the keys and values are never copied; where the tiled mask would hold more
    than the repeated heads, they are repeated."""
    from tests.memory_meter import PeakMeter

    monkeypatch.setattr(megatron_compat, "_native_gqa_kept", lambda *args: False)
    generator = torch.Generator().manual_seed(0)
    heads, groups, dim = 8, 2, 16
    query = torch.randn(rows, heads, positions, dim, generator=generator)
    key, value = (torch.randn(rows, groups, keys, dim, generator=generator) for _ in range(2))
    ends = torch.arange(keys - positions, keys)  # each query position sees the keys up to its own
    mask = torch.arange(keys)[None] <= ends[:, None]  # [positions, keys], as a prefill chunk's
    if positions == 1:  # a decode step's: each row at its own length
        mask = (torch.arange(keys)[None] < torch.tensor([keys - 3 * r for r in range(rows)])[:, None])[:, None, None]
    with torch.inference_mode(), PeakMeter() as meter:
        ours = megatron_compat.grouped_sdpa(query, key, value, attn_mask=mask)
    repeated = [t.repeat_interleave(heads // groups, dim=1) for t in (key, value)]
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(query, *repeated, attn_mask=mask))
    keys_repeated = 2 * key.nbytes * heads // groups
    assert (meter.peak < keys_repeated) == folded


# 6. weight layouts


def test_split_qkv_inverts_pack_qkv():
    heads, groups, head_dim, hidden = 8, 2, 4, 5
    q, k, v = (
        torch.randn(heads * head_dim, hidden),
        torch.randn(groups * head_dim, hidden),
        torch.randn(groups * head_dim, hidden),
    )
    packed = pack_qkv(q, k, v, heads, groups, head_dim)
    assert packed.shape == ((heads + 2 * groups) * head_dim, hidden)
    for ours, theirs in zip(split_qkv(packed, heads, groups, head_dim), (q, k, v)):
        assert torch.equal(ours, theirs)


def test_qkv_layout_is_megatrons(layout):
    """split_qkv/split_qkv_heads read linear_qkv's output exactly as megatron's attention does."""
    model = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=2)[0].eval()
    attention = model.decoder.layers[0].self_attention
    hidden = torch.randn(6, 2, TEST_MODEL.hidden_size)  # [s, b, h]
    with torch.no_grad():
        query, key, value = attention.get_query_key_value_tensors(hidden)  # [s, b, heads|groups, head_dim]
        fused = F.linear(hidden, attention.linear_qkv.weight)
    heads, groups, head_dim = TEST_MODEL.num_attention_heads, TEST_MODEL.query_groups, TEST_MODEL.head_dim
    for ours, theirs in zip(split_qkv_heads(fused, heads, groups, head_dim), (query, key, value)):
        torch.testing.assert_close(ours, theirs)
    q, k, v = split_qkv(attention.linear_qkv.weight.detach(), heads, groups, head_dim)
    torch.testing.assert_close(F.linear(hidden, q).view_as(query), query)
    torch.testing.assert_close(F.linear(hidden, k).view_as(key), key)


def test_fc1_layout_is_megatrons(layout):
    model = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=3)[0].eval()
    mlp = model.decoder.layers[0].mlp
    hidden = torch.randn(6, 2, TEST_MODEL.hidden_size)
    with torch.no_grad():
        theirs, _ = mlp(hidden)
        gate, up = split_fc1(mlp.linear_fc1.weight)
        ours = F.linear(F.silu(F.linear(hidden, gate)) * F.linear(hidden, up), mlp.linear_fc2.weight)
        gate_out, up_out = split_fc1(F.linear(hidden, mlp.linear_fc1.weight), dim=-1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(F.silu(gate_out) * up_out, F.silu(F.linear(hidden, gate)) * F.linear(hidden, up))


# 7. distributed optimizer over torch's Adam

_needs_torch_adam = pytest.mark.skipif(
    __import__("megatron.core.optimizer.distrib_optimizer", fromlist=["x"]).HAVE_APEX_OR_TE,
    reason="megatron runs fused Adam here (item 7 concerns torch's Adam)",
)


def _distributed_adam(layout, distributed: bool = True, precision: PrecisionConfig | None = None) -> TrainingSetup:
    cfg = TrainConfig(
        model=TEST_MODEL,
        parallel=ParallelConfig(use_distributed_optimizer=distributed),
        precision=precision or PrecisionConfig(),
        trainer=TRAINER,
        optim=OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_warmup_steps=1, lr_decay_steps=10),
        output_dir="unused",
    )
    return build_training(cfg, layout)


def _losses(setup: TrainingSetup, layout, steps: range) -> list[float]:
    return [
        train_step(
            setup.model,
            setup.optimizer,
            setup.scheduler,
            microbatches_for_rank(global_batch(step, TEST_MODEL, TRAINER), TRAINER.micro_batch_size, layout),
            layout,
        ).loss
        for step in steps
    ]


@_needs_torch_adam
def test_completed_adam_state_is_what_adam_creates_and_lets_megatron_read_the_step(layout):
    fresh, completed = _distributed_adam(layout), _distributed_adam(layout)
    with pytest.raises(AssertionError):  # megatron-core 0.16: one `step` value expected among no states
        fresh.optimizer.state_dict()
    megatron_compat.complete_torch_adam_state(completed.optimizer)
    assert {group["step"] for group in completed.optimizer.state_dict()["optimizer"]["param_groups"]} == {0}
    assert _losses(completed, layout, range(3)) == _losses(fresh, layout, range(3))
    for before, after in zip(fresh.chunks[0].parameters(), completed.chunks[0].parameters()):
        assert torch.equal(before, after)


@_needs_torch_adam
def test_distributed_torch_adam_resumes_exactly_with_a_step_tensor_per_parameter(layout, tmp_path):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert callable(DistributedOptimizer._set_main_param_and_optimizer_states)
    cfg = TrainConfig(model=TEST_MODEL, parallel=ParallelConfig(use_distributed_optimizer=True))
    straight = _distributed_adam(layout)
    _losses(straight, layout, range(2))
    save_checkpoint(tmp_path, 2, straight, layout, cfg)
    expected = _losses(straight, layout, range(2, 5))

    resumed = _distributed_adam(layout)
    assert (
        load_checkpoint(
            tmp_path / "checkpoints" / "step_0000002",
            resumed.model,
            resumed.optimizer,
            resumed.scheduler,
            layout,
            TEST_MODEL,
        )
        == 2
    )
    adam = resumed.optimizer.chained_optimizers[0].optimizer
    steps = [state["step"] for state in adam.state.values()]
    assert len({id(step) for step in steps}) == len(steps) and {step.item() for step in steps} == {2.0}
    assert _losses(resumed, layout, range(2, 5)) == expected


@pytest.mark.parametrize("dtype", [DType.fp32, DType.bf16])
def test_a_resume_with_the_other_kind_of_optimizer_continues_the_saved_runs_curve(layout, tmp_path, dtype):
    """Either kind reads the other's checkpoint (`TranslatedLoad`): moments, master weights (the distributed
    optimizer's `param`, a plain bf16 one's `fp32_param`, a plain fp32 one's weights) and step. The resumed run's
    losses are those of the saved kind's run going on, bit for bit; under bf16 the two kinds' own curves differ
    in the last digits, so each direction is told apart."""
    precision = PrecisionConfig(dtype=dtype)
    straight = {}
    for distributed in (False, True):
        setup = _distributed_adam(layout, distributed, precision)
        straight[distributed] = _losses(setup, layout, range(5))
    for saved_distributed in (True, False):
        cfg = TrainConfig(
            model=TEST_MODEL,
            parallel=ParallelConfig(use_distributed_optimizer=saved_distributed),
            precision=precision,
        )
        saved = _distributed_adam(layout, saved_distributed, precision)
        _losses(saved, layout, range(2))
        path = save_checkpoint(tmp_path / str(saved_distributed), 2, saved, layout, cfg)
        common = dist_checkpointing.load_common_state_dict(str(path))["optimizer"]
        assert megatron_compat.saved_by_distributed_optimizer(common) == saved_distributed
        other = _distributed_adam(layout, not saved_distributed, precision)
        assert megatron_compat.is_distributed_optimizer(other.optimizer) != saved_distributed
        assert load_checkpoint(path, other.model, other.optimizer, other.scheduler, layout, TEST_MODEL) == 2
        assert _losses(other, layout, range(2, 5)) == straight[saved_distributed][2:]


LAYOUTS = [(distributed, dtype) for distributed in (False, True) for dtype in (DType.fp32, DType.bf16)]


@pytest.mark.parametrize("saved", LAYOUTS, ids=[f"{'distributed' if d else 'plain'}-{t.value}" for d, t in LAYOUTS])
def test_optimizer_state_survives_a_round_trip_through_another_kind_or_precision(layout, tmp_path, saved) -> None:
    """Saved at step 2 by one kind and precision, read by each other one (`TranslatedLoad` where megatron's own
    load would fail or read the bf16 weights for a plain fp32 run), saved again, read back: the run goes on as if
    never interrupted, bit for bit. So nothing is lost on the way: the moments, the step, and the fp32 master
    weights, which a plain fp32 run keeps as its weights and the others beside them."""
    setups = {}

    def setup(distributed: bool, dtype: DType) -> TrainingSetup:
        setups[distributed, dtype] = _distributed_adam(layout, distributed, PrecisionConfig(dtype=dtype))
        return setups[distributed, dtype]

    def cfg(distributed: bool, dtype: DType) -> TrainConfig:
        parallel = ParallelConfig(use_distributed_optimizer=distributed)
        return TrainConfig(model=TEST_MODEL, parallel=parallel, precision=PrecisionConfig(dtype=dtype))

    expected = _losses(setup(*saved), layout, range(5))[2:]
    first = setup(*saved)
    _losses(first, layout, range(2))
    path = save_checkpoint(tmp_path / "saved", 2, first, layout, cfg(*saved))
    for other in LAYOUTS:
        if other == saved:
            continue
        between = setup(*other)
        assert load_checkpoint(path, between.model, between.optimizer, between.scheduler, layout, TEST_MODEL) == 2
        again = save_checkpoint(tmp_path / f"{other[0]}-{other[1].value}", 2, between, layout, cfg(*other))
        back = setup(*saved)
        load_checkpoint(again, back.model, back.optimizer, back.scheduler, layout, TEST_MODEL)
        assert _losses(back, layout, range(2, 5)) == expected, other


def test_a_shard_that_torch_cannot_read_is_a_checkpoint_error(layout, tmp_path) -> None:
    """torch.distributed.checkpoint's CheckpointException is a BaseException: without checksums
    (`checkpoint.verify=false`) a truncated shard is still refused as a CheckpointError naming the checkpoint."""
    setup = _distributed_adam(layout, False)
    path = save_checkpoint(tmp_path, 1, setup, layout, TrainConfig(model=TEST_MODEL))
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="its shards cannot be read") as error:
        load_checkpoint(path, setup.model, setup.optimizer, setup.scheduler, layout, TEST_MODEL, verify=False)
    assert error.value.path == path


# 8. Transformer Engine layers


def test_local_layers_have_no_fused_norms_and_no_biases(layout):
    layer = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=1)[0].decoder.layers[0]
    for linear in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
        assert megatron_compat.fused_norm_parameters(linear) is None
        assert megatron_compat.linear_bias(linear) is None


def test_fused_norm_names_map_back_as_megatrons_local_spec_maps_them_for_checkpoints():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    assert {fused: own for own, fused in keys_map.items()} == megatron_compat._FUSED_NORM_PREFIXES
    assert (
        megatron_compat.unfused_norm_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
        == "decoder.layers.3.input_layernorm.weight"
    )
    assert megatron_compat.unfused_norm_name("decoder.layers.0.mlp.linear_fc1.layer_norm_bias") == (
        "decoder.layers.0.pre_mlp_layernorm.bias"
    )
    assert megatron_compat.unfused_norm_name("decoder.layers.0.mlp.linear_fc1.weight") == (
        "decoder.layers.0.mlp.linear_fc1.weight"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_available() or not torch.cuda.is_available(), reason="needs TE + CUDA")
def test_transformer_engine_layers_are_laid_out_as_item_8_reads_them(layout):
    from steerlm.config import TransformerImpl
    from steerlm.models.sharding import named_global_parameters

    te = build_model_chunks(
        replace(TEST_MODEL, transformer_impl=TransformerImpl.transformer_engine), PrecisionConfig(), layout, seed=1
    )
    local = build_model_chunks(
        replace(TEST_MODEL, transformer_impl=TransformerImpl.local), PrecisionConfig(), layout, seed=1
    )
    layer = te[0].decoder.layers[0]
    assert type(layer.input_layernorm).__name__ == type(layer.pre_mlp_layernorm).__name__ == "IdentityOp"
    for linear in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
        weight, bias = megatron_compat.fused_norm_parameters(linear)
        assert weight.shape == (TEST_MODEL.hidden_size,) and bias is None  # RMSNorm
        assert megatron_compat.linear_bias(linear) is None
    te_names = {name: p.shape for name, p in named_global_parameters(te)}
    assert te_names == {name: p.shape for name, p in named_global_parameters(local)}


# 9. fused torch optimizers


def _training(layout, fused: bool, distributed: bool) -> TrainingSetup:
    cfg = TrainConfig(
        model=TEST_MODEL,
        parallel=ParallelConfig(use_distributed_optimizer=distributed),
        trainer=TRAINER,
        optim=OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_warmup_steps=1, lr_decay_steps=10, fused=fused),
        output_dir="unused",
    )
    return build_training(cfg, layout)


def _kernel_flags(setup: TrainingSetup) -> set[tuple]:
    adams = [part.optimizer for part in getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])]
    return {(group["fused"], group["foreach"]) for adam in adams for group in adam.param_groups}


@pytest.mark.parametrize(
    "distributed",
    [False, pytest.param(True, marks=_needs_torch_adam)],
    ids=["megatron_optimizer", "distributed_optimizer"],
)
def test_fused_adam_follows_the_config_through_a_checkpoint_of_the_other_kernel(layout, tmp_path, distributed):
    fused, default = _training(layout, True, distributed), _training(layout, False, distributed)
    assert _kernel_flags(fused) == {(True, False)} and _kernel_flags(default) == {(False, None)}
    # the same update to the last bits: 4 steps at lr 1e-2 agree to 1e-5 relative
    torch.testing.assert_close(_losses(fused, layout, range(4)), _losses(default, layout, range(4)), rtol=1e-5, atol=0)
    cfg = TrainConfig(model=TEST_MODEL, parallel=ParallelConfig(use_distributed_optimizer=distributed))
    save_checkpoint(tmp_path, 4, default, layout, cfg)
    expected = _losses(default, layout, range(4, 7))

    resumed = _training(layout, True, distributed)  # loads a checkpoint whose param groups say fused=False
    load_checkpoint(
        tmp_path / "checkpoints" / "step_0000004",
        resumed.model,
        resumed.optimizer,
        resumed.scheduler,
        layout,
        TEST_MODEL,
    )
    assert _kernel_flags(resumed) == {(True, False)}
    torch.testing.assert_close(_losses(resumed, layout, range(4, 7)), expected, rtol=1e-5, atol=0)


# 10. single-pass gradient scaling


def test_single_pass_scale_replaces_megatrons_local_fallback_with_the_same_products():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as base

    megatron_compat.use_single_pass_scale()
    for module in (clip_grads, base):
        assert module.multi_tensor_scale_impl in (megatron_compat._multi_tensor_scale, getattr(module, "amp_C", None))
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(33, 7, generator=generator), torch.randn(5, generator=generator)]
    expected = [grad.clone() for grad in grads]
    utils.local_multi_tensor_scale(0, None, [expected, expected], 0.37)
    megatron_compat._multi_tensor_scale(0, None, [grads, grads], 0.37)  # in place, as clipping calls it
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    master = torch.randn(9, generator=generator)  # fp32 master weights into bf16 ones: megatron's own copy
    ours, theirs = torch.empty(9, dtype=torch.bfloat16), torch.empty(9, dtype=torch.bfloat16)
    megatron_compat._multi_tensor_scale(0, None, [[master], [ours]], 1.0)
    utils.local_multi_tensor_scale(0, None, [[master], [theirs]], 1.0)
    assert torch.equal(ours, theirs)


# 11. a linear layer's extra parameters in checkpoints


def test_extra_linear_parameters_get_sharded_tensors_that_megatron_keys_globally(layout):
    """Extra tensors on fc1 (SwiGLU) and fc2 of the second layer: their ShardedTensors stack the layers as megatron
    stacks the weights (the layer an offset on a leading axis), carry the TP axis asked for (the factory for
    SwiGLU's), and a model's state holds them beside the weight."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model = build_model_chunks(replace(TEST_MODEL, num_layers=2), PrecisionConfig(), layout, seed=3)[0]
    fc1, fc2 = model.decoder.layers[1].mlp.linear_fc1, model.decoder.layers[1].mlp.linear_fc2
    extra = {
        "fc1": torch.nn.Parameter(torch.zeros(fc1.weight.shape[0], 4)),
        "fc2": torch.nn.Parameter(torch.zeros(4, 8)),
    }
    fc1.register_parameter("extra", extra["fc1"])
    fc2.register_parameter("extra", extra["fc2"])
    fc1.sharded_state_dict = lambda prefix="", offsets=(), metadata=None: extra_linear_sharded_state(
        fc1, {"extra": extra["fc1"]}, {"extra": 0}, ("extra",), prefix, offsets, metadata
    )
    fc2.sharded_state_dict = lambda prefix="", offsets=(), metadata=None: extra_linear_sharded_state(
        fc2, {"extra": extra["fc2"]}, {"extra": 1}, (), prefix, offsets, metadata
    )
    state = model.sharded_state_dict()
    swiglu, row = state["decoder.layers.1.mlp.linear_fc1.extra"], state["decoder.layers.1.mlp.linear_fc2.extra"]
    weight = state["decoder.layers.1.mlp.linear_fc2.weight"]
    assert isinstance(swiglu, ShardedTensorFactory) and swiglu.key == "decoder.layers.mlp.linear_fc1.extra"
    assert isinstance(row, ShardedTensor) and row.key == "decoder.layers.mlp.linear_fc2.extra"
    assert (row.global_shape, row.global_offset) == ((2, 4, 8), (1, 0, 0))
    assert (weight.global_shape[0], weight.global_offset[0]) == (2, 1)  # megatron's own stacking of the layers
    assert isinstance(state["decoder.layers.1.mlp.linear_fc1.weight"], ShardedTensorFactory)  # megatron's own


# 12. asynchronous checkpoint writes


def test_an_async_write_holds_the_tensors_of_its_start_and_reports_the_files_it_wrote(layout, tmp_path) -> None:
    """megatron's async request run through `AsyncShardWrite`: the tensors changed right after the fork are written
    as they were at the start, the `in_writer` result comes back from the forked process (the digests of the
    files it wrote, which checksums.json would list), and megatron's finalization writes the index."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from steerlm.checkpoint.integrity import file_digests
    from steerlm.checkpoint.writers import writers_die_with_parent

    weights = {name: torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ab")}
    start = {name: tensor.clone() for name, tensor in weights.items()}
    state = {name: ShardedTensor.from_rank_offsets(name, tensor, replica_id=0) for name, tensor in weights.items()}
    (tmp_path / "async").mkdir()
    with writers_die_with_parent():
        write = megatron_compat.AsyncShardWrite(state, tmp_path / "async", file_digests)
    for tensor in weights.values():
        tensor.add_(1.0)  # training goes on while the writer runs
    assert write.finished(blocking=True)
    saved = checkpoint_tensors(tmp_path / "async")
    assert saved.keys() == start.keys() and all(torch.equal(saved[name], start[name]) for name in start)
    shards = {path.name for path in (tmp_path / "async").glob("*.distcp")}
    assert shards and set(write.in_writer_result) == shards
    assert write.in_writer_result == file_digests(sorted((tmp_path / "async").glob("*.distcp")))
    assert (tmp_path / "async" / ".metadata").exists() and not list((tmp_path / "async").glob(".writer_rank*"))


@pytest.mark.gpu  # and on CPU: the GPU suite runs it where the tensors are copied to host memory first
def test_an_async_checkpoint_equals_the_synchronous_one_though_training_went_on(layout, tmp_path) -> None:
    """`checkpoint.async_save`'s checkpoint of step 2, written while steps 3-4 train, equals the synchronous save of
    step 2 (weights and Adam moments), verifies against its checksums and resumes to the same losses."""
    from steerlm.checkpoint.integrity import verify_checksums
    from steerlm.checkpoint.sharded import AsyncSave

    setup = _distributed_adam(layout, False)
    _losses(setup, layout, range(2))
    cfg = TrainConfig(model=TEST_MODEL, optim=OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_warmup_steps=1))
    synchronous = save_checkpoint(tmp_path / "sync", 2, setup, layout, cfg)
    pending = AsyncSave(tmp_path / "async", 2, setup, layout, cfg)
    expected = _losses(setup, layout, range(2, 4))
    assert pending.published(blocking=True)
    saved, reference = checkpoint_tensors(pending.path), checkpoint_tensors(synchronous)
    assert saved.keys() == reference.keys() and all(torch.equal(saved[key], reference[key]) for key in reference)
    assert verify_checksums(pending.path)
    again = _distributed_adam(layout, False)
    assert load_checkpoint(pending.path, again.model, again.optimizer, again.scheduler, layout, TEST_MODEL) == 2
    assert _losses(again, layout, range(2, 4)) == expected


def test_a_killed_async_writer_is_a_checkpoint_error_and_the_previous_checkpoint_stays_latest(layout, tmp_path):
    import multiprocessing
    import os
    import signal

    from steerlm.checkpoint.sharded import AsyncSave, latest_checkpoint

    setup = _distributed_adam(layout, False)
    cfg = TrainConfig(model=TEST_MODEL)
    previous = save_checkpoint(tmp_path, 1, setup, layout, cfg)
    pending = AsyncSave(tmp_path, 2, setup, layout, cfg)
    (writer,) = multiprocessing.active_children()
    os.kill(writer.pid, signal.SIGKILL)
    with pytest.raises(
        CheckpointError, match="(?s)writing step 2's checkpoint failed.*ended without reporting"
    ) as error:
        pending.published(blocking=True)
    assert error.value.path.name == ".tmp_step_0000002"
    assert latest_checkpoint(tmp_path) == previous and not pending.path.exists()
