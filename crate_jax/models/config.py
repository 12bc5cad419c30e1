"""Model configurations: frozen dataclasses that validate themselves.

A bad value raises ValueError naming the field, at construction, before any parameter exists.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

BLOCKS = ("crate", "crate_alpha", "vit", "tost")
REMAT_POLICIES = ("none", "minimal", "dots", "full")
ATTENTION_IMPLS = (None, "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
MLP_ACTIVATIONS = ("gelu", "gelu_tanh")
TEXT_POOLS = ("eot", "first", "last", "last_token", "mean")


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def _check_choice(value, field: str, choices) -> None:
    _check(value in choices, field, f"must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """What every token encoder shares: the layer stack and its numerics.

    block: 'crate' (MSSA + ISTA), 'crate_alpha' (MSSA + ODL), 'vit' (MHSA + MLP) or 'tost'
      (TSSA + MLP, models/tssa.py; causal TSSA in a causal language model).
    """

    block: str
    width: int
    depth: int
    heads: int
    mlp_dim: int | None = None  # ViT MLP width; None = 4·width
    eta: float = 0.1  # ISTA / ODL step size η
    lam: float = 0.1  # sparsity penalty λ
    overcomplete_ratio: int = 4  # ODL dictionary size C (D ∈ R^{d×C·d})
    ista_steps: int = 2  # ODL unrolled ISTA steps
    layer_norm_eps: float | None = None  # None: 1e-5 for CRATE, 1e-6 otherwise (docs/design.md §1)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this at the last layer
    layer_scale_init: float | None = None  # None: no LayerScale
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
    # What each layer keeps for the backward pass (models/encoder.py REMAT_POLICIES): 'minimal'
    # (the matmul products; norms, activations and softmax recomputed), 'none' (everything
    # autodiff keeps), 'dots' (every unbatched matmul's output), 'full' (only the layer input)
    remat: str = "minimal"
    # One scanned layer body (compiled once, whatever the depth) or, False, the scan fully
    # unrolled into per-layer code. The parameters are stacked (L, ...) either way.
    scan_layers: bool = True
    mlp_activation: str = "gelu"  # ViT MLP: 'gelu' (exact, erf) or 'gelu_tanh' (CLIPA's text)

    def __post_init__(self):
        _check_choice(self.block, "block", BLOCKS)
        for name in ("width", "depth", "heads"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.width % self.heads == 0, "width",
               f"width={self.width} is not divisible by heads={self.heads}")
        _check(self.overcomplete_ratio >= 1, "overcomplete_ratio",
               f"must be ≥ 1, got {self.overcomplete_ratio}")
        _check(self.ista_steps >= 1, "ista_steps", f"must be ≥ 1, got {self.ista_steps}")
        _check(self.eta > 0, "eta", f"must be positive, got {self.eta}")
        _check(self.lam >= 0, "lam", f"must be non-negative, got {self.lam}")
        _check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate",
               f"must be in [0, 1), got {self.drop_path_rate}")
        _check_choice(self.dtype, "dtype", DTYPES)
        _check_choice(self.param_dtype, "param_dtype", DTYPES)
        _check_choice(self.attention_impl, "attention_impl", ATTENTION_IMPLS)
        _check_choice(self.remat, "remat", REMAT_POLICIES)
        _check_choice(self.mlp_activation, "mlp_activation", MLP_ACTIVATIONS)
        self._check_family_fields()

    # Fields that only some block families read: (field, families that use it, why not).
    _FAMILY_FIELDS = (
        ("mlp_dim", ("vit", "tost"), "has no MLP: its sparse-coding step is ISTA (CRATE) or "
         "ODL (CRATE-α, width overcomplete_ratio·width)"),
        ("mlp_activation", ("vit", "tost"), "has no MLP activation: its sparse-coding step is "
         "ISTA (CRATE) or ODL (CRATE-α), both ReLU thresholds"),
        ("overcomplete_ratio", ("crate_alpha",), "has no overcomplete dictionary (only "
         "CRATE-α's ODL does)"),
        ("ista_steps", ("crate_alpha",), "unrolls no ISTA steps (CRATE's ISTA block is one "
         "step; only CRATE-α's ODL unrolls several)"),
        ("eta", ("crate", "crate_alpha"), "has no ISTA step size"),
        ("lam", ("crate", "crate_alpha"), "has no sparsity penalty"),
        ("layer_scale_init", ("crate_alpha", "vit", "tost"), "has no residual around its ISTA "
         "step, so LayerScale cannot apply to every branch"),
    )

    def _check_family_fields(self) -> None:
        """A field the chosen block family does not read is an error, never silently
        ignored (docs/design.md §5): it names the field and the family."""
        defaults = {f.name: f.default for f in dataclasses.fields(TowerConfig)}
        for name, families, why in self._FAMILY_FIELDS:
            if self.block not in families and getattr(self, name) != defaults[name]:
                raise ValueError(f"{name}: the '{self.block}' block {why}; {name} applies to "
                                 f"{' and '.join(repr(f) for f in families)} only, got "
                                 f"{name}={getattr(self, name)!r}")

    @property
    def eps(self) -> float:
        if self.layer_norm_eps is not None:
            return self.layer_norm_eps
        return 1e-5 if self.block == "crate" else 1e-6

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 4 * self.width

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(TowerConfig):
    """An image classifier or image encoder (num_classes=0: pooled features, no head)."""

    patch_size: int
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    pool: str = "cls"  # 'cls' token, or 'gap'/'mean': mean of the tokens
    # 'learn', or fixed: 'sincos2d' (big_vision's table) or 'sincos2d_mae' (MAE's, CRATE-MAE)
    posemb: str = "learn"
    # 'linear' (CRATE's LN → Linear → LN on flattened patches) or 'conv' (a P×P stride-P
    # convolution: CRATE-α, ViT, CRATE-MAE's encoder); None: 'linear' for 'crate', else 'conv'
    stem: str | None = None
    stem_bias: bool = True  # bias of the convolutional stem (CRATE-α, ViT)
    head_norm_eps: float | None = None  # final LayerNorm eps; None = layer_norm_eps
    # ViT register tokens (DINOv2's `register_tokens`): learned rows put after the cls token,
    # with no position embedding; pooling skips them. 0: none (every other tool's layout).
    registers: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check(self.patch_size > 0, "patch_size", f"must be positive, got {self.patch_size}")
        _check(self.image_size % self.patch_size == 0, "image_size",
               f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        _check(self.num_classes >= 0, "num_classes", f"must be ≥ 0, got {self.num_classes}")
        _check_choice(self.pool, "pool", ("cls", "gap", "mean"))
        _check_choice(self.posemb, "posemb", ("learn", "sincos2d", "sincos2d_mae"))
        if self.posemb != "learn":
            _check(self.width % 4 == 0, "width",
                   f"{self.posemb} position embedding needs width divisible by 4, got "
                   f"{self.width}")
        _check_choice(self.stem, "stem", (None, "linear", "conv"))
        _check(self.stem != "linear" or self.block == "crate", "stem",
               f"the linear stem is CRATE's; the '{self.block}' block has the conv stem")
        _check(self.stem_bias or self.patch_stem == "conv", "stem_bias",
               "CRATE's linear patch embedding always has a bias (docs/design.md §1); stem_bias "
               "applies to the conv stem only")
        _check(self.registers >= 0, "registers", f"must be ≥ 0, got {self.registers}")
        _check(self.registers == 0 or self.block == "vit", "registers",
               f"register tokens apply to the 'vit' block only, got block={self.block!r}")

    @property
    def patch_stem(self) -> str:
        """'linear' or 'conv': `stem`, or the family's when it is None."""
        if self.stem is not None:
            return self.stem
        return "linear" if self.block == "crate" else "conv"

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def final_eps(self) -> float:
        return self.eps if self.head_norm_eps is None else self.head_norm_eps


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig(TowerConfig):
    """A text encoder over token ids (B, T); it returns pooled features of width `width`.

    pool, the position whose final token is the feature:
      'eot'        the first `eot_id` token, else the last non-pad token (CLIP);
      'first'      position 0 (a [CLS] token put first by the tokenizer);
      'last'       position T−1 of the input, whatever token it holds (CLIPA: its rows are
                   padded to the context length, so this is usually a pad position that has
                   attended to the whole caption);
      'last_token' the last non-pad token;
      'mean'       the mean over the non-pad tokens.
    causal: each token sees only the tokens before it (GPT-style); False: bidirectional.
    mask_padding (bidirectional towers): pad keys are masked out of the attention. CLIPA's
      text tower masks nothing (False). A causal tower needs no padding mask: its padding
      comes after the real tokens, which the causal mask already hides it from.
    """

    block: str = "vit"
    context_length: int = 77
    vocab_size: int = 32_000
    causal: bool = True
    mask_padding: bool = True
    pool: str = "eot"
    eot_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check(self.block != "crate", "block", "the text tower is 'vit' or 'crate_alpha'")
        _check(self.context_length > 0, "context_length",
               f"must be positive, got {self.context_length}")
        _check(self.vocab_size > 1, "vocab_size", f"must be > 1, got {self.vocab_size}")
        _check_choice(self.pool, "pool", TEXT_POOLS)
        if self.pool == "eot":
            _check(self.eot_id is not None, "eot_id", "pool='eot' needs eot_id")
        if self.eot_id is not None:
            _check(0 <= self.eot_id < self.vocab_size, "eot_id",
                   f"must be in [0, vocab_size={self.vocab_size}), got {self.eot_id}")
        _check(0 <= self.pad_id < self.vocab_size, "pad_id",
               f"must be in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
