"""Transformer building blocks with logical axis names.

Parameters carry logical names ('embed', 'mlp', 'heads', 'kv', ...) and big
activations are constrained with 'act_*' names. Which mesh axis each name maps
to lives in the config's rules, never here. Activations use their own names so
that FSDP can shard a weight's 'embed' dimension while the activation's batch
dimension takes the same mesh axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.xavier_uniform()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  return nn.with_logical_constraint(x, names)


# --- Attention implementation (config model.attention_impl).

# '' picks per call: cuDNN's fused kernel where it applies (a GPU, bf16/fp16,
# head_dim a multiple of 8 up to 128), else XLA's. 'xla' always XLA. 'cudnn'
# asks for the fused kernel and falls back to XLA, with a logged warning,
# where it cannot run (no GPU, float32, unsupported shapes).
ATTENTION_IMPLS = ("", "xla", "cudnn")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.warning("%s", message)


def check_attention_impl(impl: str | None) -> str:
  impl = impl or ""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS} "
                     "('' picks cuDNN where it applies, else XLA)")
  return impl


def cudnn_unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
  """Why cuDNN's fused attention cannot take these (B, L, heads, head_dim) inputs; None if it can."""
  if jax.default_backend() != "gpu":
    return f"no GPU (backend {jax.default_backend()!r})"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"dtype {q.dtype} (cuDNN takes bfloat16/float16; set model.dtype='bfloat16')"
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return f"head_dim {head_dim} (cuDNN takes multiples of 8 up to 128)"
  return None


def select_attention_impl(impl: str | None, q: jax.Array, k: jax.Array) -> str:
  """'xla' or 'cudnn' for this call (see ATTENTION_IMPLS)."""
  impl = check_attention_impl(impl)
  if impl == "xla":
    return "xla"
  reason = cudnn_unsupported_reason(q, k)
  if reason is None:
    return "cudnn"
  if impl == "cudnn":
    _warn_once(f"attention_impl='cudnn' is unavailable here ({reason}): using 'xla'")
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          implementation: str | None = None) -> jax.Array:
  """jax.nn.dot_product_attention on (B, L, heads, head_dim) with the implementation chosen."""
  impl = select_attention_impl(implementation, q, k)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                          implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
      _warn_once(f"cuDNN attention rejected shapes q={q.shape} k={k.shape} "
                 f"({type(e).__name__}: {e}): using 'xla'")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation="xla")


# --- Rematerialisation (config model.remat_policy).

# Names -> what the backward pass keeps from the forward (the rest is
# recomputed). 'none' is no remat; 'full' keeps only each block's input.
# 'save_attention_out' / 'save_attention_mlp' keep the tensors tagged with
# checkpoint_name below.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    "save_attention_mlp": jax.checkpoint_policies.save_only_these_names(
        "attention_out", "mlp_hidden"),
}


def remat_policy_name(remat: bool, policy: str = "") -> str:
  """The effective policy: `policy` when set, else 'full' if `remat` else 'none'."""
  name = policy or ("full" if remat else "none")
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}: expected one of {sorted(REMAT_POLICIES)} "
                     "or '' (follow model.remat)")
  return name


# --- Scanned <-> unrolled parameter layouts (model.scan_layers).

def scan_params(params: Any) -> Any:
  """Unrolled Transformer params (block_0 … block_{n-1}) -> scanned ('blocks', stacked on axis 0).

  Walks the whole tree, so it converts a CViViT's or a MaskGIT's params.
  """
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  params = dict(params)
  n = 0
  while f"block_{n}" in params:
    n += 1
  out = {k: scan_params(v) for k, v in params.items() if not (k.startswith("block_") and n)}
  if n:
    blocks = [params[f"block_{i}"] for i in range(n)]
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def unscan_params(params: Any) -> Any:
  """The inverse of scan_params."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  params = dict(params)
  out = {k: unscan_params(v) for k, v in params.items() if k != "blocks"}
  if "blocks" in params:
    n = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(n):
      out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


# --- One transformer stack's sizes and how it runs.

@dataclasses.dataclass(frozen=True)
class TransformerSpec:
  """The sizes and execution of one transformer stack: what every model here builds a
  Transformer from, in one typed field.

  Frozen and hashable, so a Linen module takes it as a field (CViViT's spatial and
  temporal stacks, MaskGIT's stack). Values are checked and put in canonical form
  on construction: `remat_policy` is a REMAT_POLICIES name, `attention_impl` one
  of ATTENTION_IMPLS (None -> ''), the dtypes are jnp.dtype objects.
  `from_config` is the one way a config section becomes a spec.
  """
  width: int  # the residual stream
  num_heads: int
  head_dim: int  # width of one head
  mlp_dim: int  # hidden width of the MLPs
  depth: int  # blocks in the stack
  # What the backward pass keeps (REMAT_POLICIES); 'none': no remat.
  remat_policy: str = "none"
  # nn.scan over the blocks (params stacked under 'blocks'; convert with
  # scan_params / unscan_params): same numbers, one block to compile.
  scan_layers: bool = False
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # dtype the parameters are created in
  # See ATTENTION_IMPLS: '' picks, 'xla', or 'cudnn' (falls back to xla).
  attention_impl: str = ""
  # LayerNorm on queries and keys per head (see MultiHeadAttention).
  qk_norm: bool = False
  # Zero-initialised residual branches: every block starts as the identity,
  # so the stack starts as the (fast-learning) linear path around it.
  zero_init_residual: bool = False

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of "
                       f"{sorted(REMAT_POLICIES)}")
    for name in ("width", "num_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be positive")
    if self.depth < 0:
      raise ValueError(f"depth={self.depth}: must be >= 0")
    # Canonical forms (the dataclass is frozen, hence object.__setattr__).
    object.__setattr__(self, "attention_impl", check_attention_impl(self.attention_impl))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

  def replace(self, **changes: Any) -> TransformerSpec:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, model_config: Any, *, depth: int) -> TransformerSpec:
    """The spec of a `config.model` section's stack of `depth` blocks.

    Reads width, num_heads, head_dim, mlp_dim, remat and remat_policy ('' follows
    remat), scan_layers, dtype, param_dtype, attention_impl, qk_norm and
    zero_init_residual; a key a section does not have (the generator has no
    qk_norm or zero_init_residual) takes the default.
    """
    m = model_config
    return cls(
        width=m.width,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        mlp_dim=m.mlp_dim,
        depth=depth,
        remat_policy=remat_policy_name(m.remat, m.get("remat_policy", "")),
        scan_layers=m.get("scan_layers", False),
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl,
        qk_norm=m.get("qk_norm", False),
        zero_init_residual=m.get("zero_init_residual", False),
    )


class DenseGeneral(nn.Module):
  """nn.DenseGeneral whose kernel (and bias) carry logical axis names."""
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_shape = tuple(x.shape[a] for a in axis)
    # The kernel is created in its full rank (not flattened) so its logical
    # axis names apply to the right dimensions.
    fan_in = int(np.prod(in_shape))

    def init(key, shape, dtype):
      flat = self.kernel_init(key, (fan_in, int(np.prod(features))), dtype)
      return flat.reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    contract = (axis, tuple(range(len(axis))))
    y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                            (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[-len(features):]), features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm computed in float32, scale/bias sharded along 'embed'."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="norm",
    )(x.astype(jnp.float32))
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head attention; self-attention when `context` is None."""
  num_heads: int
  head_dim: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # See ATTENTION_IMPLS: '' / None picks, 'xla', or 'cudnn' (falls back to xla).
  attention_impl: str | None = None
  # LayerNorm on queries and keys per head: keeps attention logits bounded, so
  # higher learning rates train stably (as in ViT-22B).
  qk_norm: bool = False
  out_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    features = x.shape[-1]
    kv_input = x if context is None else context
    proj = lambda name: DenseGeneral(
        (self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = proj("query")(x)
    k = proj("key")(kv_input)
    v = proj("value")(kv_input)
    if self.qk_norm:
      norm = lambda name: nn.LayerNorm(
          use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("kv",)), name=name)
      q = norm("query_norm")(q.astype(jnp.float32)).astype(self.dtype)
      k = norm("key_norm")(k.astype(jnp.float32)).astype(self.dtype)
    q = constrain(q, "act_batch", "act_len", "act_heads", "act_kv")
    k = constrain(k, "act_batch", "act_len", "act_heads", "act_kv")
    v = constrain(v, "act_batch", "act_len", "act_heads", "act_kv")
    mask = None
    if context_mask is not None:
      # (B, Lk) -> (B, 1, 1, Lk): broadcast over heads and queries.
      mask = context_mask[:, None, None, :].astype(bool)
    out = dot_product_attention(
        q, k, v, mask=mask, is_causal=self.causal and context is None,
        implementation=self.attention_impl)
    out = checkpoint_name(out, "attention_out")
    out = constrain(out, "act_batch", "act_len", "act_heads", "act_kv")
    return DenseGeneral(features, kernel_axes=("heads", "kv", "embed"), axis=(-2, -1),
                        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=self.out_init, name="out")(out)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  out_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    h = DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="wi")(x)
    h = nn.gelu(h)
    h = checkpoint_name(h, "mlp_hidden")
    h = constrain(h, "act_batch", "act_len", "act_mlp")
    return DenseGeneral(features, kernel_axes=("mlp", "embed"), dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=self.out_init, name="wo")(h)


class TransformerBlock(nn.Module):
  """Pre-norm block: self-attention, optional cross-attention, MLP (sizes from `spec`)."""
  spec: TransformerSpec
  causal: bool = False
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    s = self.spec
    kw = dict(dtype=s.dtype, param_dtype=s.param_dtype)
    if s.zero_init_residual:
      kw["out_init"] = nn.initializers.zeros
    attn = lambda name, causal: MultiHeadAttention(
        s.num_heads, s.head_dim, causal=causal, attention_impl=s.attention_impl,
        qk_norm=s.qk_norm, name=name, **kw)
    x = constrain(x, "act_batch", "act_len", "act_embed")
    norm = lambda name: LayerNorm(name=name, dtype=s.dtype, param_dtype=s.param_dtype)
    x = x + attn("self_attention", self.causal)(norm("pre_attention_norm")(x))
    if self.cross_attention:
      h = norm("pre_cross_attention_norm")(x)
      x = x + attn("cross_attention", False)(h, context, context_mask)
    x = x + MlpBlock(s.mlp_dim, name="mlp", **kw)(norm("pre_mlp_norm")(x))
    return constrain(x, "act_batch", "act_len", "act_embed")


class _ScanBlock(TransformerBlock):
  """A TransformerBlock with nn.scan's (carry, inputs) -> (carry, outputs) signature."""

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> tuple[jax.Array, None]:
    return super().__call__(x, context, context_mask), None


class Transformer(nn.Module):
  """A stack of spec.depth TransformerBlocks, optionally rematerialised per block.

  `spec.scan_layers` runs one block under `nn.scan` with the layers' parameters
  stacked on a leading 'layers' axis (params['blocks']): it compiles one block
  instead of depth, which matters for deep stacks on pods. The numbers are
  those of the unrolled stack given the same weights (tested).
  """
  spec: TransformerSpec
  causal: bool = False
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    s = self.spec
    if x.shape[-1] != s.width:
      raise ValueError(f"a Transformer of width {s.width} got inputs of width {x.shape[-1]}")
    fields = dict(spec=s, causal=self.causal, cross_attention=self.cross_attention)
    remat = lambda cls, **kw: cls if s.remat_policy == "none" else nn.remat(
        cls, policy=REMAT_POLICIES[s.remat_policy], **kw)
    if s.scan_layers:
      block_cls = remat(_ScanBlock, prevent_cse=False)
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=s.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**fields, name="blocks")(x, context, context_mask)
    else:
      block_cls = remat(TransformerBlock)
      for i in range(s.depth):
        x = block_cls(**fields, name=f"block_{i}")(x, context, context_mask)
    return LayerNorm(name="final_norm", dtype=s.dtype, param_dtype=s.param_dtype)(x)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed sin/cos embedding of integer positions: (..., ) -> (..., dim).

  Used for the temporal axis of the tokenizer: it depends only on a frame's own
  index, so it can never leak information from later frames, and it extends to
  any clip length.
  """
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  angles = positions.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb
