"""The model handle that `llm_jax.load` returns: logits and log-likelihoods from a saved model."""

import jax
import numpy as np
import pytest

import llm_jax
from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax.errors import UserError
from llm_jax.model import presets, transformer


def test_logits_and_log_likelihood(tmp_path):
  config = config_lib.Config(model=presets.get("tiny-gpt2"))
  params = transformer.init_params(config.model, jax.random.key(3))
  checkpoint.save_params(tmp_path / "model", params, config)
  model = llm_jax.load(tmp_path / "model")
  tokens = [5, 9, 17, 33, 2, 71, 8]
  logits = model.logits([tokens])
  assert logits.shape == (1, 7, config.model.vocab_size) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, transformer.forward(params, config.model, np.asarray([tokens])), atol=1e-5)

  log_probs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
  context, continuation = tokens[:3], tokens[3:]
  expected = sum(log_probs[t - 1, tokens[t]] for t in range(3, 7))
  total, is_greedy = model.log_likelihood(context, continuation)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert is_greedy == all(np.argmax(log_probs[t - 1]) == tokens[t] for t in range(3, 7))
  greedy = [int(np.argmax(log_probs[2]))]  # the model's own first choice after the context
  assert model.log_likelihood(context, greedy)[1] is True
  # Many requests at once through the engine: the same figures; a request longer than the model is refused.
  many = model.log_likelihoods([(context, continuation), (context, greedy)], batch_size=2)
  np.testing.assert_allclose([many[0][0], many[1][0]], [total, model.log_likelihood(context, greedy)[0]], rtol=1e-5)
  with pytest.raises(UserError) as e:
    model.log_likelihood(list(range(4, 70)), [5])
  assert "context of 66 tokens and continuation of 1 are longer than the model's context of model.max_len=64" in str(e.value)
