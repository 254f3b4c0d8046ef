"""The MaskGIT decode loop, driven by fake logits functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.sampling import mask_schedule
from phenaki_jax.sampling import parallel_decode as pd

V = 16  # codebook size; [MASK] = V
MASK = V
N = 48  # flat tokens, e.g. 3 token frames of 4x4
MAX_STEPS = 12


def prefer_position(tokens):
  """Strongly prefers code (position mod V) everywhere."""
  target = jnp.arange(tokens.shape[1]) % V
  return jnp.broadcast_to(30.0 * jax.nn.one_hot(target, V), tokens.shape + (V,))


_TABLE = jnp.asarray(np.random.default_rng(42).normal(size=(N, V)), jnp.float32)


def random_logits(tokens):
  """Fixed random logits, nudged by the current tokens so the loop's state matters."""
  context = jnp.sum(tokens == MASK, axis=1, keepdims=True)
  return _TABLE[None] + 0.5 * jax.nn.one_hot((tokens + context) % V, V)


def run(logits_fn, rng, tokens, num_steps, **kw):
  kw.setdefault("record_tokens", True)
  return pd.decode_jit(logits_fn, rng, tokens, num_steps, mask_id=MASK, max_steps=MAX_STEPS,
                       **kw)


def all_masked(batch=2):
  return jnp.full((batch, N), MASK, jnp.int32)


def with_prefix():
  """Example 0 generates everything; example 1 keeps a frozen prefix of 16 tokens."""
  frozen = jnp.stack([jnp.zeros(N, bool), jnp.arange(N) < 16])
  given = jnp.full((2, N), V - 1, jnp.int32)  # never the preferred code at positions 0..14
  return pd.initial_tokens(given, frozen, MASK), frozen


def expected_counts(initial, steps):
  """The schedule the loop promises: γ-driven, at least one revealed per step."""
  out, prev = [], np.asarray(initial)
  for s in range(steps):
    target = np.asarray(mask_schedule.num_masked(s, steps, initial))
    prev = np.maximum(np.minimum(target, prev - 1), 0)
    out.append(prev)
  return np.stack(out)


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_unmasks_exactly_the_scheduled_number_per_step(steps):
  tokens, _ = with_prefix()
  out = run(prefer_position, jax.random.key(0), tokens, steps)
  counts = np.asarray(out.num_masked)
  np.testing.assert_array_equal(counts[:steps], expected_counts(np.array([N, N - 16]), steps))
  assert (counts[steps:] == -1).all()
  assert (np.diff(np.concatenate([[[N, N - 16]], counts[:steps]]), axis=0) < 0).all()
  assert not (np.asarray(out.tokens) == MASK).any()
  # Generated positions took the strongly preferred code.
  np.testing.assert_array_equal(out.tokens[0], np.arange(N) % V)
  np.testing.assert_array_equal(out.tokens[1, 16:], np.arange(16, N) % V)


def test_frozen_tokens_unchanged_and_decided_tokens_never_change():
  tokens, frozen = with_prefix()
  out = run(random_logits, jax.random.key(1), tokens, 8)
  history = np.asarray(out.token_history[:8])
  np.testing.assert_array_equal(np.asarray(out.tokens)[np.asarray(frozen)], V - 1)
  before = np.asarray(tokens)
  for step in history:
    decided = before != MASK
    np.testing.assert_array_equal(step[decided], before[decided])
    before = step
  np.testing.assert_array_equal(history[-1], out.tokens)
  assert (out.tokens < V).all()


def test_seeds_are_deterministic():
  a = run(random_logits, jax.random.key(7), all_masked(), 6).tokens
  b = run(random_logits, jax.random.key(7), all_masked(), 6).tokens
  c = run(random_logits, jax.random.key(8), all_masked(), 6).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_more_steps_than_tokens_still_ends_at_zero():
  tokens = all_masked().at[:, 5:].set(0)  # only 5 tokens to generate, 12 steps
  out = run(prefer_position, jax.random.key(0), tokens, 12)
  counts = np.asarray(out.num_masked)
  np.testing.assert_array_equal(counts[:, 0], [4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.tokens[:, :5], np.broadcast_to(np.arange(5), (2, 5)))


def test_compiles_once_for_any_step_count():
  traces = []

  def counting_logits(tokens):
    traces.append(1)  # runs only while tracing
    return prefer_position(tokens)

  rng = jax.random.key(0)
  run(counting_logits, rng, all_masked(), 4, record_tokens=False)
  first = len(traces)
  out = run(counting_logits, rng, all_masked(), jnp.int32(12), record_tokens=False)
  run(counting_logits, rng, all_masked(), 7, record_tokens=False, choice_temperature=1.0,
      temperature=0.5)
  assert first >= 1 and len(traces) == first
  assert out.token_history is None
  assert (np.asarray(out.num_masked)[-1] == 0).all()


def test_top_k_one_is_greedy():
  out = run(random_logits, jax.random.key(3), all_masked(1), 4, top_k=1)
  history = np.asarray(out.token_history[:4])
  before = np.asarray(all_masked(1))
  for step in history:
    # Each token decided at this step is the argmax of the logits this step saw.
    decided_now = (before == MASK) & (step != MASK)
    greedy = np.asarray(random_logits(jnp.asarray(before))).argmax(-1)
    np.testing.assert_array_equal(step[decided_now], greedy[decided_now])
    before = step
  np.testing.assert_array_equal(history[-1], out.tokens)


def test_guidance():
  tokens = all_masked()
  cond, uncond = prefer_position, random_logits
  np.testing.assert_allclose(pd.guided_logits_fn(cond, uncond, 1.0)(tokens), cond(tokens),
                             atol=1e-5)
  np.testing.assert_allclose(pd.guided_logits_fn(cond, uncond, 0.0)(tokens), uncond(tokens),
                             atol=1e-6)
  np.testing.assert_allclose(pd.guided_logits_fn(cond, uncond, 3.0)(tokens),
                             uncond(tokens) + 3.0 * (cond(tokens) - uncond(tokens)), atol=1e-4)


def test_grid_helpers_round_trip():
  grid = (3, 4, 4)
  tokens = jnp.arange(2 * N).reshape((2,) + grid)
  flat = pd.flatten_tokens(tokens)
  assert flat.shape == (2, N)
  np.testing.assert_array_equal(pd.unflatten_tokens(flat, grid), tokens)
  fn = pd.flat_logits_fn(lambda t: jax.nn.one_hot(t % V, V), grid)
  np.testing.assert_array_equal(fn(flat).argmax(-1), flat % V)


def test_bad_num_steps():
  with pytest.raises(ValueError, match="num_steps"):
    run(prefer_position, jax.random.key(0), all_masked(), MAX_STEPS + 1)
  with pytest.raises(ValueError, match="num_steps"):
    run(prefer_position, jax.random.key(0), all_masked(), 0)


def test_guidance_with_memory():
  tokens = all_masked()
  cond, uncond = prefer_position(tokens), random_logits(tokens)
  with_memory = random_logits(tokens.at[:, 0].set(3))
  # Memory scale 0 is plain CFG; otherwise the memory's difference adds on its own scale.
  np.testing.assert_array_equal(pd.guide_with_memory(cond, uncond, with_memory, 3.0, 0.0),
                                pd.guide(cond, uncond, 3.0))
  np.testing.assert_allclose(pd.guide_with_memory(cond, uncond, with_memory, 3.0, 2.0),
                             uncond + 3.0 * (cond - uncond) + 2.0 * (with_memory - cond),
                             atol=1e-4)
  np.testing.assert_allclose(pd.guide_with_memory(cond, uncond, with_memory, 1.0, 1.0),
                             with_memory, atol=1e-4)


# --- Seam blending (stories): a random split inside the frozen prefix at every step.

TPF = 8  # tokens per token frame: N = 6 token frames of 8


def story_window(prefix_frames=(3, 2)):
  """Example b keeps its first prefix_frames[b] token frames (codes V-1, then V-2, ...)."""
  frame = np.arange(N) // TPF
  given = np.broadcast_to((V - 1 - frame) % V, (2, N))
  frozen = frame[None] < np.asarray(prefix_frames)[:, None]
  return pd.initial_tokens(jnp.asarray(given), jnp.asarray(frozen), MASK), frozen


# The output of the loop before seam blending existed (random_logits, key 7, 5 steps,
# choice_temperature 2, the `with_prefix` start): the plain path must stay bit-identical.
_PLAIN_GOLDEN = [
    [12, 14, 2, 0, 10, 7, 12, 14, 10, 12, 6, 14, 4, 2, 9, 8, 9, 1, 14, 8, 4, 13, 2, 7, 10, 4, 3,
     10, 5, 15, 15, 10, 14, 1, 4, 0, 9, 10, 9, 7, 12, 5, 4, 2, 7, 5, 5, 6],
    [15] * 16 + [9, 3, 14, 6, 4, 1, 13, 7, 12, 0, 1, 2, 4, 12, 13, 10, 7, 9, 9, 8, 1, 6, 11, 7,
                 2, 5, 0, 4, 3, 14, 0, 3]]


def test_seam_blending_off_is_the_plain_loop_bit_for_bit():
  tokens, _ = with_prefix()
  out = run(random_logits, jax.random.key(7), tokens, 5, choice_temperature=2.0)
  np.testing.assert_array_equal(out.tokens, _PLAIN_GOLDEN)
  assert out.seam_splits is None
  # A one-frame prefix has nothing to blend (split ≥ 1): the same tokens as without.
  tokens, _ = story_window((1, 1))
  plain = run(random_logits, jax.random.key(2), tokens, 6)
  blended = run(random_logits, jax.random.key(2), tokens, 6,
                seam_prefix_frames=jnp.array([1, 1]), tokens_per_frame=TPF)
  np.testing.assert_array_equal(plain.tokens, blended.tokens)
  np.testing.assert_array_equal(plain.token_history, blended.token_history)


@pytest.mark.parametrize("steps", [3, 12])
def test_seam_blending_keeps_the_prefix_before_each_split(steps):
  k = np.array([3, 2])
  tokens, frozen = story_window(tuple(k))
  out = run(random_logits, jax.random.key(5), tokens, steps,
            seam_prefix_frames=jnp.asarray(k), tokens_per_frame=TPF)
  splits = np.asarray(out.seam_splits)
  assert (splits[steps:] == -1).all()
  splits = splits[:steps]
  assert ((splits >= 1) & (splits <= k[None])).all()  # the first prefix frame is always kept
  history = np.asarray(out.token_history[:steps])
  start = np.asarray(tokens)
  for s in range(steps):
    for b in range(2):
      kept = slice(0, splits[s, b] * TPF)
      np.testing.assert_array_equal(history[s, b, kept], start[b, kept])
      # Prefix frames after the split were re-sampled this step (never left [MASK]).
      assert (history[s, b, :k[b] * TPF] != MASK).all()
  # The generated tokens follow the plain schedule, whatever the splits.
  np.testing.assert_array_equal(np.asarray(out.num_masked)[:steps],
                                expected_counts(np.array([N - 24, N - 16]), steps))
  np.testing.assert_array_equal(history[-1], out.tokens)
  assert (np.asarray(out.tokens) < V).all()
  if steps == 12:  # drawn afresh every step, not once
    assert len(set(splits[:, 0].tolist())) > 1


def test_seam_blending_is_deterministic_per_seed_and_resamples_after_the_last_split():
  k = jnp.array([3, 3])
  tokens, _ = story_window((3, 3))
  runs = [run(random_logits, jax.random.key(seed), tokens, 6, seam_prefix_frames=k,
              tokens_per_frame=TPF) for seed in (9, 9, 10)]
  np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
  np.testing.assert_array_equal(runs[0].seam_splits, runs[1].seam_splits)
  assert not np.array_equal(runs[0].tokens, runs[2].tokens)
  # After the last step's split the prefix frames hold the model's own samples.
  out = run(prefer_position, jax.random.key(9), tokens, 6, seam_prefix_frames=k,
            tokens_per_frame=TPF)
  last = np.asarray(out.seam_splits)[5]
  for b in range(2):
    cut = last[b] * TPF
    np.testing.assert_array_equal(out.tokens[b, :cut], np.asarray(tokens)[b, :cut])
    np.testing.assert_array_equal(out.tokens[b, cut:], np.arange(cut, N) % V)


def test_seam_blending_needs_the_frame_size():
  tokens, _ = story_window()
  with pytest.raises(ValueError, match="tokens_per_frame"):
    run(random_logits, jax.random.key(0), tokens, 4, seam_prefix_frames=jnp.array([3, 2]))


def test_scheduled_guidance_moves_linearly_between_one_and_the_scale():
  revealed = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(pd.scheduled_guidance(3.0, revealed, "constant"),
                             [3.0, 3.0, 3.0])
  np.testing.assert_allclose(pd.scheduled_guidance(3.0, revealed, "increasing"),
                             [1.0, 1.5, 3.0])
  np.testing.assert_allclose(pd.scheduled_guidance(3.0, revealed, "decreasing"),
                             [3.0, 2.5, 1.0])
  with pytest.raises(ValueError, match="'cosine'"):
    pd.scheduled_guidance(3.0, revealed, "cosine")
