"""train/loop.py: the non-finite skip, step rngs, the streak check and TrainLoop's cadence.

TrainLoop runs here with a fake checkpointer and writer (classes recording
their calls) and a hand-written config: no model, no orbax.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from phenaki_jax.train import loop as train_loop

# --- finite_update / keep_if.

OLD = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}
NEW = {"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 0.5)}
GRADS = {"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), -1.0)}


def _with_nan(tree, key="b", value=np.nan):
  return dict(tree, **{key: tree[key].at[1].set(value)})


@pytest.mark.parametrize("where", ["loss", "grads", "updated_tree", "inf_in_updated_tree"])
def test_a_nonfinite_loss_gradient_or_update_skips_the_step(where):
  loss, grads, new = jnp.float32(1.5), GRADS, NEW
  if where == "loss":
    loss = jnp.float32(np.nan)
  elif where == "grads":
    grads = _with_nan(GRADS, "w")
  elif where == "updated_tree":
    new = _with_nan(NEW)
  else:
    new = _with_nan(NEW, value=np.inf)
  finite, _ = jax.jit(train_loop.finite_update)(loss, grads, OLD, new)
  assert not bool(finite)
  kept = jax.jit(train_loop.keep_if)(finite, new, OLD)
  jax.tree.map(np.testing.assert_array_equal, kept, OLD)


def test_finite_values_pass_with_the_gradients_global_norm():
  finite, grad_norm = jax.jit(train_loop.finite_update)(jnp.float32(1.5), GRADS, OLD, NEW)
  assert bool(finite)
  # sqrt(6 · 0.25 + 3 · 1)
  assert float(grad_norm) == pytest.approx(np.sqrt(4.5))
  jax.tree.map(np.testing.assert_array_equal, train_loop.keep_if(finite, NEW, OLD), NEW)
  # The updated trees are optional: loss and gradients alone decide then.
  assert bool(train_loop.finite_update(jnp.float32(0.0), GRADS)[0])


def test_nonfinite_metrics_report_the_skip():
  out = train_loop.nonfinite_metrics(jnp.bool_(False), jnp.float32(3.0), jnp.float32(1e-3))
  assert float(out["train/nonfinite_step_fraction"]) == 1.0
  assert float(out["train/grad_norm"]) == 3.0
  assert float(train_loop.nonfinite_metrics(jnp.bool_(True), jnp.float32(3.0), jnp.float32(1e-3))[
      "train/nonfinite_step_fraction"]) == 0.0


# --- step_rng.

def _bits(key):
  return np.asarray(jax.random.key_data(key))


def test_step_rng_depends_on_seed_and_step_only():
  np.testing.assert_array_equal(_bits(train_loop.step_rng(0, 3)), _bits(train_loop.step_rng(0, 3)))
  # A traced step (as inside the jitted train step) gives the same key.
  np.testing.assert_array_equal(
      _bits(jax.jit(lambda s: train_loop.step_rng(0, s))(jnp.int32(3))),
      _bits(train_loop.step_rng(0, 3)))
  others = [train_loop.step_rng(0, 4), train_loop.step_rng(1, 3), train_loop.step_rng(1, 4)]
  for key in others:
    assert not np.array_equal(_bits(key), _bits(train_loop.step_rng(0, 3)))


# --- check_nonfinite_streak.

def test_nonfinite_streak_raises_at_the_limit_naming_step_and_checkpoint():
  train_loop.check_nonfinite_streak(2, step=7, limit=3, last_saved=5)
  with pytest.raises(train_loop.NonFiniteTrainingError) as err:
    train_loop.check_nonfinite_streak(3, step=7, limit=3, last_saved=5)
  msg = str(err.value)
  assert "3 consecutive steps up to step 7" in msg
  assert "newest checkpoint: step 5" in msg
  assert "max_consecutive_nonfinite=3" in msg
  with pytest.raises(train_loop.NonFiniteTrainingError, match="newest checkpoint: step None"):
    train_loop.check_nonfinite_streak(4, step=4, limit=3, last_saved=None)


def test_nonfinite_streak_limit_zero_is_off():
  train_loop.check_nonfinite_streak(10_000, step=10_000, limit=0, last_saved=None)


# --- TrainLoop's cadence.

class FakeCheckpointer:
  directory = "/fake/checkpoints"

  def __init__(self):
    self.saves, self.waits, self.closed = [], 0, False

  def save(self, step, state, data_iterator, config, *, force=False):
    self.saves.append((step, state, data_iterator, force))
    return True

  def reached_preemption(self, step):  # only asked with several processes
    raise AssertionError("single process: the SIGTERM flag decides")

  def wait(self):
    self.waits += 1

  def close(self):
    self.closed = True


class FakeWriter:
  def __init__(self):
    self.scalars, self.flushed = [], False

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def flush(self):
    self.flushed = True


def _config(**overrides):
  return ml_collections.ConfigDict(dict(dict(
      total_steps=11, log_every_steps=3, eval_every_steps=4, checkpoint_every_steps=5,
      max_consecutive_nonfinite=2, async_checkpointing=False,
      input=dict(batch_size=4)), **overrides))


TRAIN_ITER = object()


def _run(tmp_path, config, streaks=None, start_step=0, resumed=False, stop_after_step=None,
         ckpt=None):
  """Runs the loop as a trainer does; (checkpointer, writer, eval steps, steps run, loop)."""
  ckpt, writer, evals, ran = ckpt or FakeCheckpointer(), FakeWriter(), [], []
  loop = train_loop.TrainLoop(config, str(tmp_path), ckpt, writer, TRAIN_ITER,
                              start_step=start_step, resumed=resumed, per_kind=(),
                              stop_after_step=stop_after_step)

  def run_eval(step):
    evals.append(step)
    return {"eval/x": float(step)}

  try:
    for step in loop.steps():
      ran.append(step)
      loop.record_batch(step, "video", {"frames": np.full((2,), step, np.float32)})
      state = {"step": step}
      streak = jnp.int32((streaks or {}).get(step, 0))
      if loop.end_step(step, "video", state, {"train/loss": jnp.float32(step)}, streak,
                       run_eval):
        break
  finally:
    loop.close()
  return ckpt, writer, evals, ran, loop


def test_trainloop_logs_evaluates_and_saves_on_their_cadence_and_at_the_last_step(tmp_path):
  ckpt, writer, evals, ran, loop = _run(tmp_path, _config())
  assert ran == list(range(1, 12))
  assert [s for s, _ in writer.scalars] == [3, 6, 9, 11]
  assert evals == [4, 8, 11]
  assert [s for s, *_ in ckpt.saves] == [5, 10, 11]
  assert all(state == {"step": s} and it is TRAIN_ITER and not force
             for s, state, it, force in ckpt.saves)
  # The logged loss is the interval's mean: steps 1-3, then 4-6, ..., then 10-11.
  losses = [scalars["train/loss"] for _, scalars in writer.scalars]
  assert losses == pytest.approx([2.0, 5.0, 8.0, 10.5])
  first = writer.scalars[0][1]
  assert first["perf/examples_per_sec"] == pytest.approx(4 * first["perf/steps_per_sec"])
  assert loop.last_saved == 11 and loop.eval_scalars == {"eval/x": 11.0}
  assert ckpt.closed and writer.flushed


def test_trainloop_resumes_after_the_restored_step(tmp_path):
  ckpt, writer, evals, ran, loop = _run(tmp_path, _config(), start_step=8, resumed=True)
  assert ran == [9, 10, 11]
  assert [s for s, *_ in ckpt.saves] == [10, 11]
  assert loop.last_saved == 11


def test_trainloop_without_eval_never_evaluates(tmp_path):
  ckpt = FakeCheckpointer()
  loop = train_loop.TrainLoop(_config(total_steps=4), str(tmp_path), ckpt, FakeWriter(),
                              TRAIN_ITER, start_step=0, resumed=False, per_kind=())
  for step in loop.steps():
    assert not loop.end_step(step, "video", {}, {"train/loss": jnp.float32(0)}, jnp.int32(0),
                             None)
  loop.close()
  assert [s for s, *_ in ckpt.saves] == [4]


def test_stop_after_step_saves_and_stops(tmp_path):
  ckpt, writer, evals, ran, loop = _run(tmp_path, _config(), stop_after_step=7)
  assert ran == list(range(1, 8))
  assert [s for s, *_ in ckpt.saves] == [5, 7]
  assert loop.last_saved == 7
  assert [s for s, _ in writer.scalars] == [3, 6]
  assert evals == [4]


def test_a_streak_reaching_the_limit_raises_one_step_late(tmp_path):
  # Steps 2 and 3 were skipped: the streak reaches the limit (2) at step 3
  # and is read after step 4 (no device stall). Step 2's checkpoint is the newest.
  ckpt = FakeCheckpointer()
  with pytest.raises(train_loop.NonFiniteTrainingError) as err:
    _run(tmp_path, _config(checkpoint_every_steps=2), streaks={2: 1, 3: 2}, ckpt=ckpt)
  assert "2 consecutive steps up to step 3" in str(err.value)
  assert "newest checkpoint: step 2" in str(err.value)
  assert [s for s, *_ in ckpt.saves] == [2]  # raised in step 4's end, before its save


def test_a_streak_below_the_limit_goes_on(tmp_path):
  ckpt, _, _, ran, _ = _run(tmp_path, _config(), streaks={2: 1, 3: 0, 7: 1})
  assert ran == list(range(1, 12)) and [s for s, *_ in ckpt.saves] == [5, 10, 11]


def test_a_streak_at_a_checkpoint_step_is_checked_before_saving(tmp_path):
  # The limit is reached at step 5, a checkpoint step: nothing is saved at 5.
  ckpt = FakeCheckpointer()
  with pytest.raises(train_loop.NonFiniteTrainingError, match="up to step 5"):
    _run(tmp_path, _config(), streaks={4: 1, 5: 2}, ckpt=ckpt)
  assert ckpt.saves == []


def test_a_streak_limit_of_zero_never_raises(tmp_path):
  ckpt, _, _, ran, _ = _run(tmp_path, _config(max_consecutive_nonfinite=0),
                            streaks={s: s for s in range(1, 12)})
  assert ran == list(range(1, 12)) and [s for s, *_ in ckpt.saves] == [5, 10, 11]
