"""Metrics that merge themselves: averages weighted by their own counts, sums, summaries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import metrics as metrics_lib
from t5x_lite.metrics import Average, Sum


def test_averages_merge_by_their_weights_and_sums_add():
  history = [{"loss": Average.of(1.0, 10.0), "grad_norm": Average.of(2.0), "tokens": Sum.of(10)},
             {"loss": Average.of(4.0, 30.0), "grad_norm": Average.of(4.0), "tokens": Sum.of(30)}]
  summary = metrics_lib.summarize(history)
  assert summary["loss"] == pytest.approx((10 + 120) / 40)
  assert summary["grad_norm"] == pytest.approx(3.0)
  assert summary["tokens"] == 40.0


def test_merging_works_inside_jit_and_under_scan():
  def body(carry, x):
    return metrics_lib.merge(carry, {"mean": Average.of(x, x), "count": Sum.of(1.0)}), None
  zeros = metrics_lib.zeros_like({"mean": Average.of(0.0, 0.0), "count": Sum.of(0.0)})
  merged, _ = jax.jit(lambda xs: jax.lax.scan(body, zeros, xs))(jnp.arange(1.0, 5.0))
  values = metrics_lib.compute(merged)
  assert values["mean"] == pytest.approx((1 + 4 + 9 + 16) / 10) and values["count"] == 4.0
  assert float(merged["mean"]) == values["mean"]


def test_an_empty_average_reports_zero_and_mismatched_names_are_refused():
  assert float(Average.of(3.0, 0.0)) == 0.0
  with pytest.raises(ValueError, match=r"different names: \['a'\] vs \['b'\]"):
    metrics_lib.merge({"a": Sum.of(1.0)}, {"b": Sum.of(1.0)})
  np.testing.assert_allclose(float(Average(jnp.float32(6.0), jnp.float32(4.0))), 1.5)
