"""Optimizers and schedules: schedule values and errors, the weight-decay mask and layer ids on
the real parameter trees, masked decoupled weight decay, clipping, layer-wise lr decay,
bf16 first moments, tree_map_params over the state, and LAMB / Lion on a quadratic."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from crate_jax import models
from crate_jax.models import layer_stack
from crate_jax.train import optim

TINY = dict(width=32, depth=2, heads=4, image_size=16, num_classes=5)
NAMES = ("crate-alpha-ti/8", "crate-t/8", "vit-ti/8")
OPTIMIZERS = ("adamw", "lamb", "lion")


def _random_values(tree, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), tree)


@functools.cache
def _params(name: str, **overrides) -> dict:
    """The model's parameter tree (paths and shapes) with seeded random values, one entry per
    layer ('encoder/layers/0/...'); built from nnx.eval_shape, so nothing is initialised or
    compiled. `_stacked_params` gives the model's own (stacked) layout."""
    return layer_stack.unstack_layers(_stacked_params(name, **overrides))


def _stacked_params(name: str, **overrides) -> dict:
    model = nnx.eval_shape(lambda: models.create(name, **{**TINY, **overrides}))
    return _random_values(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flat(tree) -> dict:
    """{'encoder/layers/0/attn/proj': leaf, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _cfg(**fields) -> ml_collections.ConfigDict:
    base = dict(name="adamw", lr=1.0, total_steps=10, warmup_steps=0, schedule="constant")
    return ml_collections.ConfigDict({**base, **fields})


def _clip_tree() -> dict:
    """A two-tower tree in the CLIP layout, with LayerScale in the image tower."""
    text = nnx.eval_shape(lambda: models.create("crate-alpha-text-ti", width=32, depth=2,
                                                heads=4, vocab_size=64, context_length=8,
                                                pool="last"))
    text = layer_stack.unstack_layers(
        _random_values(nnx.to_pure_dict(nnx.state(text, nnx.Param))))
    return {
        "image": _params("crate-alpha-ti/8", layer_scale_init=0.1),
        "text": text,
        "image_proj": jnp.ones((32, 16)),
        "text_proj": jnp.ones((32, 16)),
        "logit_scale": jnp.asarray(math.log(10.0)),
    }


def _small_tree() -> dict:
    """A few leaves in the model layout, for the numerical checks (small programs compile fast)."""
    return _random_values({"stem": {"kernel": jax.ShapeDtypeStruct((6, 4), jnp.float32),
                                    "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                           "norm": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32),
                                    "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                           "head": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)}})


def _first_update(tx: optax.GradientTransformation, grads, params):
    """The updates of the first step, compiled as one program (fast even on a loaded CPU)."""
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def _randn_like(tree, seed: int = 0):
    return _random_values(tree, seed + 100)


# --- schedule --------------------------------------------------------------------------------

SCHED = dict(lr=1.0, warmup_steps=10, total_steps=110, end_lr=0.1, warmup_init_lr=0.01)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_values(kind):
    cfg = ml_collections.ConfigDict({**SCHED, "schedule": kind})
    sched = optim.make_schedule(cfg)
    assert float(sched(0)) == pytest.approx(0.01)
    assert float(sched(5)) == pytest.approx(0.01 + 0.99 * 0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    mid, quarter, end = float(sched(60)), float(sched(35)), float(sched(110))
    if kind == "constant":
        assert mid == quarter == end == pytest.approx(1.0)
    else:
        assert mid == pytest.approx((1.0 + 0.1) / 2, rel=1e-6)
        assert end == pytest.approx(0.1)
        assert float(sched(1000)) == pytest.approx(0.1)
        want = (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)) if kind == "cosine"
                else 1.0 - 0.9 * 0.25)
        assert quarter == pytest.approx(want, rel=1e-6)
    assert optim.current_lr(cfg, 35) == pytest.approx(quarter)
    assert float(jax.jit(sched)(jnp.int32(35))) == pytest.approx(quarter)


def test_schedule_defaults_and_no_warmup():
    sched = optim.make_schedule(ml_collections.ConfigDict(dict(lr=2.0, total_steps=100,
                                                               warmup_steps=10)))
    assert float(sched(0)) == 0.0  # warmup_init_lr defaults to 0
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)  # cosine to end_lr = 0
    sched = optim.make_schedule(ml_collections.ConfigDict(dict(lr=2.0, total_steps=100,
                                                               warmup_steps=0)))
    assert float(sched(0)) == pytest.approx(2.0)


@pytest.mark.parametrize("fields, field", [
    (dict(schedule="step"), "schedule"),
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(lr=-1.0), "lr"),
    (dict(end_lr=-0.1), "end_lr"),
    (dict(warmup_init_lr=-0.1), "warmup_init_lr"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=-10), "total_steps"),
])
def test_schedule_errors(fields, field):
    with pytest.raises(ValueError, match=field):
        optim.make_schedule(ml_collections.ConfigDict({**SCHED, **fields}))


def test_schedule_requires_lr():
    with pytest.raises(ValueError, match="'lr'"):
        optim.make_schedule(ml_collections.ConfigDict(dict(total_steps=10)))


# --- decay mask and layer ids ----------------------------------------------------------------

def test_decay_mask_names():
    decayed = {f"{name}:{k}": v for name in NAMES
               for k, v in _flat(optim.decay_mask(_params(name))).items()}
    for key in ["crate-alpha-ti/8:encoder/layers/0/sparse/D",
                "crate-alpha-ti/8:encoder/layers/1/sparse/D1",
                "crate-alpha-ti/8:encoder/layers/0/attn/proj",
                "crate-alpha-ti/8:encoder/layers/0/attn/out",
                "crate-alpha-ti/8:stem/kernel", "crate-alpha-ti/8:head/kernel",
                "crate-t/8:encoder/layers/0/sparse/weight", "crate-t/8:stem/proj/kernel",
                "vit-ti/8:encoder/layers/0/attn/query", "vit-ti/8:encoder/layers/1/attn/value",
                "vit-ti/8:encoder/layers/0/sparse/fc1/kernel"]:
        assert decayed[key] is True, key
    for key, value in decayed.items():
        leaf = key.split(":")[1]
        last = leaf.split("/")[-1]
        if last in ("scale", "cls", "embedding") or last.endswith("bias"):
            assert value is False, key
    assert decayed["vit-ti/8:encoder/layers/0/attn/query_bias"] is False  # a 2-D bias


@pytest.mark.parametrize("name", NAMES)
def test_decay_mask_counts(name):
    flat = _flat(_params(name))
    mask = _flat(optim.decay_mask(_params(name)))
    matrices = [k for k, v in flat.items() if v.ndim >= 2]
    excluded = {"cls", "posemb/embedding"} | {k for k in matrices if k.endswith("bias")}
    assert {"cls", "posemb/embedding"} <= set(matrices)
    assert sum(mask.values()) == len(matrices) - len(excluded)
    assert {k for k, v in mask.items() if v} == set(matrices) - excluded


def test_decay_mask_and_layer_ids_two_towers():
    tree = _clip_tree()
    mask = _flat(optim.decay_mask(tree))
    for key in ["text/token_embedding", "text/pos_embedding", "logit_scale", "image/cls",
                "image/posemb/embedding", "image/encoder/layers/0/scale_attn/gamma",
                "text/norm/scale"]:
        assert mask[key] is False, key
    for key in ["image_proj", "text_proj", "text/encoder/layers/1/attn/proj",
                "image/encoder/layers/1/sparse/D"]:
        assert mask[key] is True, key
    ids = _flat(optim.layer_ids(tree, num_layers=2))
    assert ids["image/stem/kernel"] == ids["image/cls"] == ids["image/posemb/embedding"] == 0
    assert ids["text/token_embedding"] == ids["text/pos_embedding"] == 0
    assert ids["image/encoder/layers/0/attn/proj"] == ids["text/encoder/layers/0/attn/out"] == 1
    assert ids["image/encoder/layers/1/scale_attn/gamma"] == 2
    assert ids["text/encoder/layers/1/sparse/norm/bias"] == 2
    for key in ["image/norm/scale", "image/head/kernel", "text/norm/bias", "image_proj",
                "logit_scale"]:
        assert ids[key] == 3, key
    with pytest.raises(ValueError, match="num_layers"):
        optim.layer_ids(tree, num_layers=1)  # layer 1 exists


# --- the optimizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_weight_decay_only_under_mask(name):
    params = _params("crate-alpha-ti/8")
    tx = optim.make_optimizer(_cfg(name=name, weight_decay=0.1), params)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)

    @jax.jit
    def step(grads, params):
        updates = tx.update(grads, tx.init(params), params)[0]
        return updates, optax.apply_updates(params, updates)

    updates, new = step(zeros, params)
    mask, flat_p, flat_u, flat_new = (_flat(t) for t in (optim.decay_mask(params), params,
                                                         updates, new))
    assert sum(mask.values()) > 0
    for key, decayed in mask.items():
        if decayed:
            np.testing.assert_array_equal(flat_u[key], -1.0 * 0.1 * flat_p[key])  # lr·wd·θ
        else:
            np.testing.assert_array_equal(flat_new[key], flat_p[key])


def test_clip_before_optimizer():
    params = _small_tree()
    g1 = _randn_like(params, seed=1)
    g1 = jax.tree.map(lambda g: g * (10.0 / optax.tree.norm(g1)), g1)
    g2 = jax.tree.map(lambda g: 0.05 * g, _randn_like(params, seed=2))
    assert float(optax.tree.norm(g1)) == pytest.approx(10.0, rel=1e-5)

    def second_update(tx):
        state = tx.init(params)
        _, state = tx.update(g1, state, params)
        return tx.update(g2, state, params)[0]

    with_clip = optim.make_optimizer(_cfg(clip_norm=1.0, lr=1e-2), params)
    without = optim.make_optimizer(_cfg(lr=1e-2), params)
    chained = optax.chain(optax.clip_by_global_norm(1.0), without)
    clipped, manual, unclipped = jax.jit(
        lambda: tuple(second_update(tx) for tx in (with_clip, chained, without)))()
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(unclipped), strict=True))
    assert diff > 1e-3  # the check would fail without clipping


def test_layer_decay_and_decay_mask_on_stacked_layers():
    """The model's stacked layout gets per layer what the per-layer layout gets."""
    stacked, depth, decay = _stacked_params("crate-alpha-ti/8"), 2, 0.5
    per_layer = layer_stack.unstack_layers(stacked)
    mask, mask_per_layer = _flat(optim.decay_mask(stacked)), _flat(optim.decay_mask(per_layer))
    for key, value in mask.items():
        want = mask_per_layer.get(key.replace("encoder/layers/", "encoder/layers/1/"),
                                  mask_per_layer.get(key))
        assert value is want, key
    assert mask["encoder/layers/attn/norm/scale"] is False  # (L, d): not a matrix
    scales = optim.layer_scales(stacked, depth, decay)
    want = layer_stack.stack_layers(jax.tree.map(
        lambda s: np.float32(s), optim.layer_scales(per_layer, depth, decay)))
    for a, b in zip(jax.tree.leaves(scales), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.ravel(a), np.ravel(b), rtol=1e-6)
    grads = _randn_like(stacked)
    tx = optim.make_optimizer(_cfg(lr=1e-2, weight_decay=0.05, layer_decay=decay), stacked,
                              num_layers=depth)
    tx_per_layer = optim.make_optimizer(_cfg(lr=1e-2, weight_decay=0.05, layer_decay=decay),
                                        per_layer, num_layers=depth)
    update = tx.update(grads, tx.init(stacked), stacked)[0]
    update_per_layer = tx_per_layer.update(layer_stack.unstack_layers(grads),
                                           tx_per_layer.init(per_layer), per_layer)[0]
    for a, b in zip(jax.tree.leaves(update),
                    jax.tree.leaves(layer_stack.stack_layers(update_per_layer)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_layer_decay():
    params, depth, decay = _params("crate-alpha-ti/8"), 2, 0.5
    ids = _flat(optim.layer_ids(params, depth))
    assert ids["stem/kernel"] == ids["cls"] == ids["posemb/embedding"] == 0
    assert ids["encoder/layers/0/attn/proj"] == 1 and ids["encoder/layers/1/sparse/D"] == 2
    assert ids["head/kernel"] == ids["norm/scale"] == depth + 1
    scales = _flat(optim.layer_scales(params, depth, decay))
    assert scales["stem/kernel"] == decay ** 3
    assert scales["encoder/layers/0/sparse/D"] == decay ** 2
    assert scales["head/kernel"] == 1.0

    grads = _randn_like(params)
    cfg = _cfg(lr=1e-2, weight_decay=0.05)
    plain = optim.make_optimizer(cfg, params)
    decayed = optim.make_optimizer(_cfg(lr=1e-2, weight_decay=0.05, layer_decay=decay),
                                   params, num_layers=depth)
    u_plain, u_decayed = jax.jit(
        lambda g, p: (plain.update(g, plain.init(p), p)[0],
                      decayed.update(g, decayed.init(p), p)[0]))(grads, params)
    u_plain, u_decayed = _flat(u_plain), _flat(u_decayed)
    for key, scale in scales.items():
        np.testing.assert_allclose(u_decayed[key], scale * u_plain[key], rtol=1e-6)


@pytest.mark.parametrize("fields, match", [
    (dict(layer_decay=0.5), "num_layers"),
    (dict(layer_decay=1.5), "layer_decay"),
    (dict(layer_decay=0.0), "layer_decay"),
    (dict(name="sgd"), "name"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(mu_dtype="int8"), "mu_dtype"),
    (dict(eps=-1.0), "eps"),
])
def test_optimizer_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(_cfg(**fields), {"w": jnp.ones((2, 2))})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mu_dtype(name):
    for mu_dtype, want in [(None, jnp.float32), ("bfloat16", jnp.bfloat16)]:
        params = _params("crate-alpha-ti/8")
        tx = optim.make_optimizer(_cfg(name=name, mu_dtype=mu_dtype), params)
        moments = jax.eval_shape(tx.init, params)[1].inner_state[0]
        assert {x.dtype for x in jax.tree.leaves(moments.mu)} == {jnp.dtype(want)}
        if name != "lion":
            assert {x.dtype for x in jax.tree.leaves(moments.nu)} == {jnp.dtype(jnp.float32)}
        if mu_dtype is None:
            continue
        params = _small_tree()  # and it stays so through an update
        tx = optim.make_optimizer(_cfg(name=name, mu_dtype=mu_dtype), params)
        state = jax.jit(tx.update)(_randn_like(params), tx.init(params), params)[1]
        assert {x.dtype for x in jax.tree.leaves(state[1].inner_state[0].mu)} == {
            jnp.dtype(want)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tree_map_params_maps_exactly_the_params(name):
    params = _params("crate-alpha-ti/8")
    cfg = _cfg(name=name, lr=1e-3, schedule="cosine", warmup_steps=2, clip_norm=1.0,
               layer_decay=0.7, weight_decay=0.05)
    tx = optim.make_optimizer(cfg, params, num_layers=2)
    state = tx.init(params)
    specs = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), params)
    mapped = optax.tree_map_params(tx, lambda _, spec: spec, state, specs,
                                   transform_non_params=lambda _: "other")
    moments = mapped[1].inner_state[0]
    assert moments.mu == specs
    if name != "lion":
        assert moments.nu == specs
    copies = 1 if name == "lion" else 2
    flat_p = {jax.tree_util.keystr(path): x
              for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mapped_leaves = jax.tree.leaves(mapped)
    state_leaves = jax.tree.leaves(state)
    assert len(mapped_leaves) == len(state_leaves)
    assert sum(v != "other" for v in mapped_leaves) == copies * len(flat_p)
    for spec, leaf in zip(mapped_leaves, state_leaves, strict=True):
        if spec == "other":
            assert jnp.ndim(leaf) == 0  # counts and the learning rate
        else:
            assert leaf.shape == flat_p[spec].shape


def test_learning_rate_readable_and_jit():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    cfg = _cfg(lr=0.5, schedule="cosine", warmup_steps=2, total_steps=6, end_lr=0.05)
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    assert float(optim.learning_rate(state)) == pytest.approx(optim.current_lr(cfg, 0))
    update = jax.jit(tx.update)
    for step in range(5):
        _, state = update(jax.tree.map(jnp.ones_like, params), state, params)
        assert float(optim.learning_rate(state)) == pytest.approx(optim.current_lr(cfg, step))


def test_abstract_params():
    params = _params("vit-ti/8")
    abstract = jax.eval_shape(lambda: params)
    tx = optim.make_optimizer(_cfg(layer_decay=0.8, weight_decay=0.1), abstract, num_layers=2)
    assert jax.tree.structure(jax.eval_shape(tx.init, abstract)) == jax.tree.structure(
        tx.init(params))
    assert optim.decay_mask(abstract) == optim.decay_mask(params)


def test_lamb_matches_optax_lamb():
    params = _small_tree()
    cfg = _cfg(name="lamb", lr=1e-2, weight_decay=0.1, eps=1e-6)
    ours = optim.make_optimizer(cfg, params)
    ref = optax.lamb(1e-2, eps=1e-6, weight_decay=0.1, mask=optim.decay_mask(params))

    @jax.jit
    def two_steps(params):
        s_ours, s_ref = ours.init(params), ref.init(params)
        for seed in range(2):
            grads = _randn_like(params, seed=seed)
            u_ours, s_ours = ours.update(grads, s_ours, params)
            u_ref, s_ref = ref.update(grads, s_ref, params)
        return u_ours, u_ref

    u_ours, u_ref = two_steps(params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name, lr", [("adamw", 0.05), ("lamb", 0.05), ("lion", 0.05)])
def test_optimizers_reduce_a_quadratic(name, lr):
    target = {"w": jnp.arange(12.0).reshape(4, 3) / 6.0, "b": jnp.linspace(-1.0, 1.0, 3)}
    params = jax.tree.map(jnp.zeros_like, target)
    params["w"] = params["w"] + 0.1  # LAMB's trust ratio needs a non-zero weight norm

    def loss(p):
        return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    tx = optim.make_optimizer(_cfg(name=name, lr=lr, total_steps=200, schedule="cosine",
                                   warmup_steps=5, weight_decay=1e-4, clip_norm=10.0), params)

    def step(_, carry):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    start = float(loss(params))
    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 200, step, (p, tx.init(p))))(params)
    assert float(loss(params)) < 0.05 * start


def test_rules_accept_an_nnx_state():
    model = nnx.eval_shape(lambda: models.create("vit-ti/8", **TINY))
    state, params = nnx.state(model, nnx.Param), _stacked_params("vit-ti/8")
    assert nnx.to_pure_dict(optim.decay_mask(state)) == optim.decay_mask(params)
    ids_state = jax.tree.leaves(nnx.to_pure_dict(optim.layer_ids(state, 2)))
    for a, b in zip(ids_state, jax.tree.leaves(optim.layer_ids(params, 2)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_freeze_takes_paths_and_merges_back():
    from crate_jax.train.step import merge_params, split_frozen

    tree = _clip_tree()
    frozen = ("text", "logit_scale", "image/encoder/layers/0", "image/norm/scale")
    trainable, fixed = split_frozen(tree, frozen)
    assert set(fixed) == {"text", "logit_scale", "image"} and "text" not in trainable
    assert list(fixed["image"]["encoder"]["layers"]) == [0]
    assert 0 not in trainable["image"]["encoder"]["layers"]
    assert 1 in trainable["image"]["encoder"]["layers"]
    assert set(fixed["image"]["norm"]) == {"scale"} and set(trainable["image"]["norm"]) == {
        "bias"}
    merged = merge_params(trainable, fixed)
    paths = lambda t: [jax.tree_util.keystr(p) for p, _ in
                       jax.tree_util.tree_flatten_with_path(t)[0]]
    assert paths(merged) == paths(tree)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(tree), strict=True):
        assert a is b
    with pytest.raises(ValueError, match=r"freeze: \['image/encoder/layers/9'\] name no "):
        split_frozen(tree, ("image/encoder/layers/9",))
