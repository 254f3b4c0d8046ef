"""Where each logical axis goes on the ('data', 'fsdp', 'tensor') mesh.

Model code names logical axes only; these two rule sets (the tokenizer's and
the generator step's) are the one place that maps them to mesh axes. A job's
config carries its set as `config.logical_axis_rules` (lists, so it can be
saved and overridden like any other key).
"""
from __future__ import annotations

from typing import Any, Iterable

# The tokenizer. Batch-like activation axes go over data and fsdp; weights are
# split along 'embed' by fsdp and along heads / mlp by tensor.
TOKENIZER_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("grid", None),
    ("code", None),
    ("codebook", None),
    # The discriminator is small: its convolutions stay replicated.
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
)

# The generator step: the MaskGIT transformer, the T5 text encoder, and the
# frozen tokenizer's encoder that runs inside the same jitted step. Batch-like
# activations over data + fsdp; weights split along 'embed' by fsdp and along
# heads / mlp / vocab by tensor (the embedding rows are padded to a multiple of
# 128, so 'vocab' splits).
GENERATOR_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    # Small tables and kernels: replicated.
    ("text_embed", None),
    ("frames", None),
    ("grid", None),
    ("relpos_buckets", None),
    # The stacked axis of scanned layers (model.scan_layers): never split.
    ("layers", None),
    # Used only by the tokenizer's encoder (its parameters are replicated).
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
    ("patch", None),
    ("code", None),
    ("codebook", None),
)


def as_lists(rules: Iterable[tuple[str, Any]]) -> list:
  """The rules as config values: [[name, [axes...] or axis or None], ...]."""
  return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]
