"""SIFA's segmentation-side networks (models/sifa.py) against hand counts and numpy computations.

Layer lists and counts are derived by hand from methods.md §3.5 and SIFA's model.py / layers.py
(cchen-cc/SIFA master), not from the implementation. Full-size shapes use jax.eval_shape (no
compute); numerical checks use tiny widths.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.models.sifa import (PixelClassifier, SIFADecoder, SIFAEncoder, SIFAResidualBlock,
                                    SIFASegmenter)

KEY = jax.random.PRNGKey(0)
S = 1.0 / np.sqrt(1.0 + 1e-3)     # BN in inference with fresh statistics (mean 0, var 1, eps 1e-3)


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def set_kernels(params, fn):
  """params with every conv kernel k at path p replaced by fn(p, k)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat = {p: (fn(p, v) if p[-1] == "kernel" else v) for p, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


# --- Full-size shapes and parameter counts (SIFA: F = 16 encoder, ngf = 32 decoder, 256² input) ---


def test_full_size_shapes_and_parameter_counts():
  x = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  (latent, latent_ll), enc_vars = jax.eval_shape(
      lambda v: SIFAEncoder().init_with_output(KEY, v), x)
  assert latent.shape == latent_ll.shape == (1, 32, 32, 512)

  def res(c_in, c_out):                # two 3×3 convs without bias + two BN (γ, β)
    return 9 * c_in * c_out + 9 * c_out * c_out + 2 * 2 * c_out

  f = 16
  enc_hand = (7 * 7 * 1 * f + 2 * f                                  # c1 + BN
              + res(f, f) + res(f, 2 * f)                            # r1, r2
              + res(2 * f, 4 * f) + res(4 * f, 4 * f)                # r3, r4
              + res(4 * f, 8 * f) + res(8 * f, 8 * f)                # r5, r6
              + res(8 * f, 16 * f) + 3 * res(16 * f, 16 * f)         # r7, r8–r10
              + res(16 * f, 32 * f) + res(32 * f, 32 * f)            # r11, r12
              + 2 * res(32 * f, 32 * f)                              # d1, d2 (dilated)
              + 2 * (9 * 32 * f * 32 * f + 2 * 32 * f))              # c2, c3 + BN
  assert n_params(enc_vars["params"]) == enc_hand == 27_517_424
  # BN moving mean + var: 2 per channel of every BN: c1, 2 per block, c2, c3.
  bn_channels = f + 2 * (f + 2 * f + 4 * f + 4 * f + 8 * f + 8 * f + 4 * 16 * f + 4 * 32 * f) + 2 * 32 * f
  assert n_params(enc_vars["batch_stats"]) == 2 * bn_channels

  image = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  out, dec_vars = jax.eval_shape(
      lambda z, im: SIFADecoder().init_with_output(KEY, z, im), latent, image)
  assert out.shape == (1, 256, 256, 1) and out.dtype == jnp.float32
  g = 32                               # ngf; IN has γ, β per channel
  dec_hand = (9 * 512 * 4 * g + 2 * 4 * g                            # c1 + IN
              + 4 * 2 * (9 * 4 * g * 4 * g + 2 * 4 * g)              # r1–r4
              + 9 * 4 * g * 2 * g + 2 * 2 * g                        # c3 deconv + IN
              + 9 * 2 * g * 2 * g + 2 * 2 * g                        # c4
              + 9 * 2 * g * g + 2 * g                                # c5
              + 7 * 7 * g * 1)                                       # c6, no bias
  assert n_params(dec_vars["params"]) == dec_hand == 1_902_688
  assert "batch_stats" not in dec_vars

  logits, cls_vars = jax.eval_shape(
      lambda z: PixelClassifier(5, (256, 256)).init_with_output(KEY, z), latent)
  assert logits.shape == (1, 256, 256, 5) and logits.dtype == jnp.float32
  assert n_params(cls_vars["params"]) == 512 * 5


def test_segmenter_bfloat16_compute_keeps_float32_params_and_logits():
  x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  out, variables = jax.eval_shape(
      lambda v: SIFASegmenter(5, dtype=jnp.bfloat16).init_with_output(KEY, v, return_all=True), x)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert out["logits"].dtype == out["logits_ll"].dtype == jnp.float32
  assert out["latent"].dtype == jnp.bfloat16 and out["latent"].shape == (2, 8, 8, 512)


# --- Residual blocks ---------------------------------------------------------------------------


def test_res_ds_shortcut_is_the_centred_channel_zero_padding():
  x = np.asarray(jax.random.normal(KEY, (2, 4, 4, 4)))
  block = SIFAResidualBlock(8)
  variables = block.init(KEY, x)
  params = set_kernels(variables["params"], lambda p, k: jnp.zeros_like(k))
  # Zero kernels and fresh BN statistics: the residual branch is 0, the output relu(x').
  out = block.apply({**variables, "params": params}, x, train=False)
  expected = np.zeros((2, 4, 4, 8), np.float32)
  expected[..., 2:6] = x               # (8 − 4) / 2 = 2 zero channels on each side
  np.testing.assert_array_equal(out, np.maximum(expected, 0))
  with pytest.raises(ValueError, match="even"):
    SIFAResidualBlock(7).init(KEY, x)


def dilated_correlation(x, k, rate):
  """'SAME' zero-padded correlation of x [B, H, W, Ci] with a 3×3 kernel k [3, 3, Ci, Co]."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (rate, rate), (rate, rate), (0, 0)))
  return sum(xp[:, rate * a:rate * a + h, rate * b:rate * b + w] @ k[a, b]
             for a in range(3) for b in range(3))


def test_dilated_block_against_numpy():
  x = np.asarray(jax.random.normal(KEY, (2, 9, 9, 3)))
  block = SIFAResidualBlock(3, dilation=2)
  variables = block.init(KEY, x)
  k1 = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 3)))
  k2 = np.zeros((3, 3, 3, 3), np.float32)
  k2[1, 1] = np.eye(3)                 # the second conv passes its input through
  params = set_kernels(variables["params"], lambda p, k: k1 if "c1" in p else k2)
  out = block.apply({**variables, "params": params}, x, train=False)
  hidden = np.maximum(S * dilated_correlation(x, k1, 2), 0)
  np.testing.assert_allclose(out, np.maximum(x + S * hidden, 0), rtol=1e-5, atol=1e-5)


def test_dilated_block_receptive_field_is_the_rate_2_footprint():
  x = np.zeros((1, 13, 13, 1), np.float32)
  x[0, 6, 6, 0] = 1.0
  block = SIFAResidualBlock(1, dilation=2)
  variables = block.init(KEY, x)
  params = set_kernels(variables["params"], lambda p, k: jnp.abs(k) + 0.1)   # all taps positive
  out = np.asarray(block.apply({**variables, "params": params}, x, train=False))
  # Two rate-2 3×3 convs: offsets {−4, −2, 0, 2, 4}² around the delta, a 9×9 span.
  footprint = {(6 + 2 * i, 6 + 2 * j) for i in range(-2, 3) for j in range(-2, 3)}
  assert set(zip(*np.nonzero(out[0, :, :, 0]))) == footprint


# --- Decoder ---------------------------------------------------------------------------------


def test_decoder_skip_adds_the_image_and_validates_sizes():
  latent = jax.random.normal(KEY, (2, 2, 2, 6))
  image = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  for out_channels, residual in ((1, image[..., 1:2]), (3, image)):   # 1: the middle slice
    dec = SIFADecoder(features=2, num_blocks=1, out_channels=out_channels)
    variables = dec.init(KEY, latent, image)
    params = set_kernels(variables["params"], lambda p, k: jnp.zeros_like(k) if "c6" in p else k)
    out = dec.apply({"params": params}, latent, image)
    np.testing.assert_array_equal(out, jnp.tanh(residual))
    assert np.any(dec.apply(variables, latent, image) != out)   # c6 does contribute otherwise
  dec = SIFADecoder(features=2, num_blocks=1, skip=False)
  variables = dec.init(KEY, latent, image)
  params = set_kernels(variables["params"], lambda p, k: jnp.zeros_like(k) if "c6" in p else k)
  np.testing.assert_array_equal(dec.apply({"params": params}, latent, image), 0.0)
  with pytest.raises(ValueError, match=r"latent \(2, 2, 2, 6\) and image \(2, 8, 8, 3\)"):
    dec.init(KEY, latent, image[:, :8, :8])
  with pytest.raises(ValueError, match="middle"):
    SIFADecoder(features=2, num_blocks=1, out_channels=1).init(KEY, latent, image[..., :2])


# --- Pixel classifier ------------------------------------------------------------------------


def test_pixel_classifier_is_1x1_conv_then_bilinear_resize():
  x = np.asarray(jax.random.normal(KEY, (2, 4, 5, 6)))
  head = PixelClassifier(3, (8, 12))
  variables = head.init(KEY, x)
  k = np.asarray(variables["params"]["c8"]["kernel"])[0, 0]       # [6, 3]
  assert set(variables["params"]["c8"]) == {"kernel"}             # no bias
  out = head.apply(variables, x)
  resize = lambda v: np.asarray(jax.image.resize(v, (2, 8, 12, v.shape[-1]), method="linear"))
  np.testing.assert_allclose(out, resize(x @ k), rtol=1e-5, atol=1e-6)
  # Linear resizing commutes with a per-pixel linear map: the same as conv(resize(x)).
  np.testing.assert_allclose(out, resize(x) @ k, rtol=1e-5, atol=1e-6)
  drop = PixelClassifier(3, (8, 12), dropout_rate=0.5)
  np.testing.assert_array_equal(drop.apply(variables, x, train=False), out)
  a, b = (drop.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(i)})
          for i in (1, 2))
  assert np.any(a != b) and np.any(a != out)


# --- Segmenter -------------------------------------------------------------------------------


def test_segmenter_outputs_params_and_batch_stats_updates():
  x = jax.random.normal(KEY, (2, 16, 16, 1))
  model = SIFASegmenter(3, base_features=2)
  variables = model.init(KEY, x, train=False)
  assert set(variables["params"]) == {"encoder", "classifier", "classifier_ll"}
  out = model.apply(variables, x, return_all=True)
  assert set(out) == {"logits", "logits_ll", "latent", "latent_ll"}
  assert out["logits"].shape == out["logits_ll"].shape == (2, 16, 16, 3)
  assert out["latent"].shape == out["latent_ll"].shape == (2, 2, 2, 64)
  np.testing.assert_array_equal(model.apply(variables, x), out["logits"])
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  plain = SIFASegmenter(3, base_features=2, deep_supervision=False)
  plain_vars = plain.init(KEY, x)
  assert set(plain_vars["params"]) == {"encoder", "classifier"}
  assert "logits_ll" not in plain.apply(plain_vars, x, return_all=True)
  with pytest.raises(ValueError, match="multiples of 8"):
    jax.eval_shape(lambda v: model.init(KEY, v), jnp.zeros((1, 12, 16, 1)))


def test_synchronized_batch_norm_under_pmap_matches_one_device():
  x = jax.random.normal(KEY, (4, 16, 16, 1))
  local = SIFASegmenter(3, base_features=2)
  variables = local.init(KEY, x)
  whole, whole_stats = local.apply(variables, x, train=True, return_all=True,
                                   mutable=["batch_stats"])

  def split(model):
    fn = jax.pmap(lambda v, xs: model.apply(v, xs, train=True, return_all=True,
                                            mutable=["batch_stats"]),
                  axis_name="batch", in_axes=(None, 0), devices=jax.devices()[:2])
    out, stats = fn(variables, x.reshape(2, 2, 16, 16, 1))
    return jax.tree.map(lambda a: a.reshape(4, *a.shape[2:]), out), stats

  synced, synced_stats = split(SIFASegmenter(3, base_features=2, bn_axis_name="batch"))
  for key in whole:                    # float32 rounding only: 1e-5 of each output's scale
    scale = max(1.0, float(np.max(np.abs(whole[key]))))
    np.testing.assert_allclose(synced[key], whole[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
               synced_stats, whole_stats)
  unsynced, _ = split(local)           # per-device statistics: a different function
  assert np.max(np.abs(unsynced["logits"] - whole["logits"])) > 1e-3
