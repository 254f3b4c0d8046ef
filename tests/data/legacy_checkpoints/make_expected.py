# expected.npz's tokens were regenerated on 2026-12-02 (issue 25), when every sample
# got its own key (seed + index): the same checkpoints, the same frames and codes.
import numpy as np
from phenaki_jax.tokenizer import Tokenizer
from phenaki_jax.generator import Generator, SamplingOptions
tok = Tokenizer.load("/tmp/legacy/tokenizer")
rng = np.random.RandomState(0)
frames = rng.randint(0, 256, (2, 5, 16, 16, 3)).astype(np.uint8)
codes = np.asarray(tok.encode(frames))
gen = Generator.load("/tmp/legacy/generator", tokenizer_workdir="/tmp/legacy/tokenizer")
prompts = ["a small red circle moves left", "a large blue square moves up"]
tokens = gen.sample_tokens(prompts, seed=3, options=SamplingOptions(num_steps=4))
np.savez("/work/main/tests/data/legacy_checkpoints/expected.npz", frames=frames, codes=codes, tokens=tokens)
print(codes.shape, tokens.shape, tok.step, gen.step)
