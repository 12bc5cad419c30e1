"""ToST models: parameter counts of every name against the official definitions, the stem's
BatchNorm (batch statistics in training, running ones in eval, synchronised over data-parallel
devices), and the train step carrying the running statistics (nnx.BatchStat) forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from crate_jax import models
from crate_jax.models import tost
from crate_jax.models.registry import count_params
from crate_jax.models.state import batch_stats_of, split_batch_stats
from crate_jax.train.step import make_train_step


def _official_vision_count(d: int, depth: int, heads: int, classes: int = 1000) -> int:
    """Parameters of tost_vision/tost.py's VisionTransformer (patch 16), term by term."""
    stem = (3 * 9 * d // 8 + 9 * (d // 8) * (d // 4) + 9 * (d // 4) * (d // 2)
            + 9 * (d // 2) * d + 2 * (d // 8 + d // 4 + d // 2 + d))  # bias-free convs + BN
    pos = 64 * d + d  # Conv2d(64, d, 1)
    block = (2 * d + d * d + d + heads + d * d + d + 2 * d + 4 * d * d + 4 * d
             + 4 * d * d + d + 2 * d)  # norm1 qkv temp to_out norm2 fc1 fc2 gammas
    cab = 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + 8 * d * d + 5 * d + 2 * d
    return stem + pos + d + depth * block + 2 * cab + 2 * d + d * classes + classes


def _official_lm_count(d: int, depth: int, heads: int, vocab: int = 50_304,
                       block_size: int = 1024) -> int:
    """Parameters of tost_lang/model_TSSA.py's GPT(TSSA=True) (tied head), all of them."""
    layer = (2 * d + d * d + d + d * d + d + heads + heads * block_size + 2 * d
             + 4 * d * d + 4 * d + 4 * d * d + d + 2 * d)
    return vocab * d + block_size * d + depth * layer + 2 * d


@pytest.mark.parametrize("name,dims", [
    ("tost-t-12/16", (192, 12, 4)), ("tost-s-12/16", (384, 12, 8)),
    ("tost-t-24/16", (192, 24, 4)), ("tost-s-24/16", (384, 24, 8)),
    ("tost-m-24/16", (512, 24, 8)), ("tost-l-24/16", (768, 24, 16))])
def test_vision_parameter_counts(name, dims):
    model = nnx.eval_shape(lambda: models.create(name))
    assert count_params(model) == _official_vision_count(*dims)
    assert model.cfg.layer_scale_init == (1.0 if dims[1] == 12 else 1e-5)


@pytest.mark.parametrize("name,dims", [("tost-gpt-base", (768, 12, 12)),
                                       ("tost-gpt-medium", (1024, 24, 16)),
                                       ("tost-gpt-large", (1280, 36, 20))])
def test_language_parameter_counts(name, dims):
    model = nnx.eval_shape(lambda: models.create(name))
    assert count_params(model) == _official_lm_count(*dims)


def test_known_counts():
    """The figures README and docs/tost.md quote."""
    assert _official_vision_count(192, 12, 4) == 5_769_328
    assert _official_vision_count(384, 12, 8) == 22_589_944
    assert _official_lm_count(768, 12, 12) == 110_467_728


def test_bad_names_and_settings_are_named():
    with pytest.raises(ValueError, match="no size 'm' with 12 layers"):
        models.create("tost-m-12/16")
    with pytest.raises(ValueError, match="patch_size"):
        models.config_for("tost-t-12/4")
    with pytest.raises(ValueError, match="eta"):
        models.config_for("tost-t-12/16", eta=0.2)
    with pytest.raises(ValueError, match="unknown model setting"):
        models.config_for("tost-t-12/16", posemb="learn")


def _tiny(**kw):
    return models.create("tost-t-12/16", image_size=32, num_classes=5, width=32, heads=4,
                         depth=2, **kw)


def _images(n=8, seed=0, size=32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)),
                       jnp.float32)


def test_batch_norm_train_and_eval():
    bn = tost.BatchNorm(6, axis_name=None, eps=1e-5, momentum=0.1, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.linspace(0.5, 1.5, 6)
    bn.bias[...] = jnp.linspace(-1, 1, 6)
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(4, 5, 5, 6)).astype(np.float32)
    y = bn(jnp.asarray(x))
    flat = x.reshape(-1, 6).astype(np.float64)
    mean, var = flat.mean(0), flat.var(0)
    want = (x - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 1.5, 6) + np.linspace(-1, 1, 6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    bn.use_running_average = True
    before = np.asarray(bn.mean[...])
    y_eval = bn(jnp.asarray(x))
    want_eval = ((x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * flat.var(0, ddof=1) + 1e-5)
                 * np.linspace(0.5, 1.5, 6) + np.linspace(-1, 1, 6))
    np.testing.assert_allclose(y_eval, want_eval, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(bn.mean[...], before)  # eval leaves the statistics


def test_running_stats_are_batch_stats_not_params():
    model = _tiny()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "mean" not in params["stem"]["norm_0"]
    stats, _ = split_batch_stats(nnx.split(model, nnx.Param, ...)[2])
    assert set(nnx.to_pure_dict(stats)["stem"]) == {"norm_0", "norm_1", "norm_2", "norm_3"}
    model.eval()
    a = model(_images())
    b = model(_images())
    np.testing.assert_array_equal(a, b)
    model.train()
    c = model(_images()[:4])
    assert not np.allclose(c, a[:4])  # batch statistics of another batch


def test_sharded_batch_statistics_are_global():
    """SyncBatchNorm: with the batch split over 4 devices under jit, the statistics are the
    whole batch's (the single-device values), not one shard's."""
    model = _tiny()
    graphdef, state = nnx.split(model)
    images = _images(8)

    def stats(state, x):
        m = nnx.merge(graphdef, state)
        m.train()
        m(x)
        return batch_stats_of(m)

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    got = jax.jit(stats)(state, sharded)
    want = jax.jit(stats)(state, images)
    shard = jax.jit(stats)(state, images[:2])
    start = batch_stats_of(model)
    for a, b, c, s in zip(*(jax.tree.leaves(t) for t in (got, want, shard, start)),
                          strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # the batch's own contribution, (new − 0.9·old)/0.1: one shard's differs
        assert not np.allclose(a - 0.9 * s, c - 0.9 * s, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_carries_batch_stats(accum):
    model = _tiny()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = _images(8)

    def loss(model, batch, rng):
        return jnp.mean(model(batch["image"]) ** 2), {}

    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(loss, graphdef, tx, optax.constant_schedule(0.0), seed=0,
                                   accum_steps=accum))
    params = nnx.to_pure_dict(params)
    start = nnx.to_pure_dict(split_batch_stats(rest)[0])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "batch_stats": start}
    new, metrics = step(state, rest, {"image": images})
    assert bool(metrics["train/state_finite"])

    def updated(x):  # the forward pass on its own, from the same statistics
        m = nnx.merge(graphdef, nnx.state(model, nnx.Param), rest, copy=True)
        m.train()
        m(x)
        return batch_stats_of(m)

    # accumulation: micro-batch i takes rows i, i + accum, ...; the mean of their updates
    parts = [updated(images[i::accum]) for i in range(accum)]
    want = jax.tree.map(lambda *xs: sum(xs) / accum, *parts)
    for a, b, s in zip(jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(want),
                       jax.tree.leaves(start), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, s)
    again, _ = step(new, rest, {"image": images})  # the second step starts from the first's
    first = jax.tree.leaves(new["batch_stats"])[0]
    assert not np.allclose(jax.tree.leaves(again["batch_stats"])[0], first)


def test_language_model_is_causal_and_bf16_runs():
    lm = models.create("tost-gpt-base", width=32, depth=2, heads=4, vocab_size=64,
                       context_length=16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 64)
    a, b = lm(tokens), lm(changed)
    np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])
    half = models.create("tost-gpt-base", width=32, depth=2, heads=4, vocab_size=64,
                         context_length=16, dtype="bfloat16")
    nnx.update(half, nnx.state(lm, nnx.Param))
    np.testing.assert_allclose(half(tokens), a, atol=0.1)


@pytest.mark.parametrize("remat,scan", [("full", True), ("none", False), ("dots", True)])
def test_remat_and_unrolled_stacks_agree(remat, scan):
    base = _tiny()
    other = _tiny(remat=remat, scan_layers=scan)
    base.eval(), other.eval()
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    g2, _, rest2 = nnx.split(other, nnx.Param, ...)

    def loss(g, r, p):
        return jnp.sum(nnx.merge(g, p, r)(_images(2)) ** 2)

    # jitted: op by op, the unrolled and the remat stacks took half a minute to dispatch
    want = jax.jit(jax.grad(lambda p: loss(graphdef, rest, p)))(params)
    got = jax.jit(jax.grad(lambda p: loss(g2, rest2, p)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_key_value_cache_refuses_tost():
    from crate_jax.models.lm_cache import init_cache

    lm = models.create("tost-gpt-base", width=32, depth=1, heads=4, vocab_size=64,
                       context_length=16)
    with pytest.raises(ValueError, match="block 'tost'"):
        init_cache(lm, 1, 8)
