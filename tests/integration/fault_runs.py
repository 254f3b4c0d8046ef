"""The tokenizer run the fault tests interrupt, as a command line and as a config."""
from tests.helpers import load_config

# 10 `:tiny,l2vq` steps, a checkpoint every 3.
TOKENIZER_ARGS = ("--config=configs/cvivit.py:tiny,l2vq", "--config.total_steps=10",
                  "--config.eval_every_steps=0", "--config.checkpoint_every_steps=3")


def tokenizer_config():
  """TOKENIZER_ARGS as a config (the values the command line sets)."""
  config = load_config("cvivit", "tiny,l2vq")
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 10, 0, 3
  return config
