"""TFRecord / tf.train.Example reader (no TensorFlow) and the MM-WHS (PnP-AdaNet/SIFA) release."""

import json
import struct

import numpy as np
import pytest

from medgen_jax.data import check, convert, mmwhs, tfrecord
from medgen_jax.data.errors import DataError
from medgen_jax.data.loading import load_dataset

SHAPE = (8, 6, 3)


def bitwise_crc32c(data: bytes) -> int:
  """Independent oracle: the bit-at-a-time definition (no table)."""
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def masked(c: int) -> int:
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def slice_features(image, label, **extra):
  feats = {"data_vol": image.astype("<f4").tobytes(), "label_vol": label.astype("<f4").tobytes(),
           "dsize_dim0": [image.shape[0]], "dsize_dim1": [image.shape[1]], "dsize_dim2": [image.shape[2]],
           "lsize_dim0": [label.shape[0]], "lsize_dim1": [label.shape[1]], "lsize_dim2": [label.shape[2]]}
  feats.update(extra)
  return feats


def make_slice(rng, shape=SHAPE):
  image = rng.normal(size=shape).astype(np.float32)
  label = rng.integers(0, 6, size=shape).astype(np.float32)
  return image, label


def write_slice(path, image, label, **extra):
  tfrecord.write_tfrecords(path, [tfrecord.encode_example(slice_features(image, label, **extra))])


# ------------------------------------------------------------------------------------------ CRC


def test_crc32c_known_vectors_and_vectorized_path():
  assert tfrecord.crc32c(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 (iSCSI) test vectors
  assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
  assert tfrecord.crc32c(b"") == 0
  rng = np.random.default_rng(0)
  for n in (1, 4095, 40_000, 123_457):  # the long ones take the numpy-lane path
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tfrecord.crc32c(data) == bitwise_crc32c(data) if n < 50_000 else \
        tfrecord.crc32c(data) == tfrecord._crc_bytes_loop(0xFFFFFFFF, data) ^ 0xFFFFFFFF
  assert tfrecord.crc32c(b"56789", tfrecord.crc32c(b"1234")) == 0xE3069283  # continuation


# ------------------------------------------------------------------------------------------ protobuf


def test_parser_reads_hand_assembled_example_and_frame(tmp_path):
  # Example{features{feature{"a": int64_list{value: [3, -1] packed}}, {"b": float_list{1.5 unpacked}},
  #                   {"c": bytes_list{"xy"}}, {"z": unknown field 7 varint}}}
  neg1 = b"\xff" * 9 + b"\x01"
  int_list = b"\x0a" + bytes([1 + len(neg1)]) + b"\x03" + neg1            # Int64List.value packed
  feat_a = b"\x1a" + bytes([len(int_list)]) + int_list                     # Feature.int64_list = 3
  float_list = b"\x0d" + struct.pack("<f", 1.5)                            # field 1, wire 5
  feat_b = b"\x12" + bytes([len(float_list)]) + float_list                 # Feature.float_list = 2
  bytes_list = b"\x0a\x02xy"
  feat_c = b"\x0a" + bytes([len(bytes_list)]) + bytes_list                 # Feature.bytes_list = 1
  feat_z = b"\x38\x05"                                                     # unknown field 7, varint

  def entry(key, feat):
    body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feat)]) + feat
    return b"\x0a" + bytes([len(body)]) + body

  features = entry(b"a", feat_a) + entry(b"b", feat_b) + entry(b"c", feat_c) + entry(b"z", feat_z)
  example = b"\x0a" + bytes([len(features)]) + features + b"\x10\x01"      # + unknown Example field 2
  header = struct.pack("<Q", len(example))
  frame = header + struct.pack("<I", masked(bitwise_crc32c(header))) + example + \
      struct.pack("<I", masked(bitwise_crc32c(example)))
  path = tmp_path / "hand.tfrecords"
  path.write_bytes(frame)
  (parsed,) = list(tfrecord.read_examples(path))
  assert parsed["a"].kind == "int64_list" and parsed["a"].value.tolist() == [3, -1]
  assert parsed["b"].kind == "float_list" and parsed["b"].value.tolist() == [1.5]
  assert parsed["c"].kind == "bytes_list" and parsed["c"].value == [b"xy"]
  assert parsed["z"].kind is None
  # the writer is the parser's inverse and frames byte-identically
  assert tfrecord.frame_record(example) == frame
  again = tfrecord.encode_example({"a": [3, -1], "b": np.array([1.5], np.float32), "c": b"xy"}, packed=False)
  assert tfrecord.parse_example(again)["a"].value.tolist() == [3, -1]
  assert tfrecord.parse_example(again)["b"].value.tolist() == [1.5]


def test_writer_round_trip_packed_and_unpacked(tmp_path):
  feats = {"f": np.arange(5, dtype=np.float32) / 3, "i": [0, 1, 2**40, -7], "b": [b"", b"\x00\x01"]}
  for packed in (True, False):
    path = tmp_path / f"rt{packed}.tfrecords"
    tfrecord.write_tfrecords(path, [tfrecord.encode_example(feats, packed=packed)] * 2)
    records = list(tfrecord.read_examples(path))
    assert len(records) == 2
    np.testing.assert_array_equal(records[1]["f"].value, feats["f"])
    assert records[1]["i"].value.tolist() == feats["i"]
    assert records[1]["b"].value == feats["b"]


# ------------------------------------------------------------------------------------------ MM-WHS slices


def test_full_size_slice_round_trip_label_middle_channel_and_5_to_0(tmp_path):
  rng = np.random.default_rng(1)
  image, label = make_slice(rng, (256, 256, 3))
  path = tmp_path / "ct_train_slice0.tfrecords"
  write_slice(path, image, label, mask=b"extra", bias=np.ones(3, np.float32))  # unknown features ignored
  got_image, got_label = mmwhs.read_slice(path)
  np.testing.assert_array_equal(got_image, image)
  expected = label[..., 1].astype(np.uint8)
  expected[expected == 5] = 0
  np.testing.assert_array_equal(got_label, expected)
  assert got_label.dtype == np.uint8 and got_label.max() <= 4 and (label[..., 1] == 5).any()


def test_label_with_one_channel_as_in_the_readme(tmp_path):
  rng = np.random.default_rng(2)
  image, label = make_slice(rng)
  path = tmp_path / "s.tfrecords"
  write_slice(path, image, label[..., 1:2])
  np.testing.assert_array_equal(mmwhs.read_slice(path)[1], np.where(label[..., 1] == 5, 0, label[..., 1]))


def one_line_error(fn, *args) -> str:
  with pytest.raises(DataError) as e:
    fn(*args)
  message = str(e.value)
  assert "\n" not in message and "Fix:" in message
  return message


@pytest.mark.parametrize("case", ["missing", "wrong_size", "bad_label", "two_records"])
def test_bad_records_are_one_line_errors(tmp_path, case):
  rng = np.random.default_rng(3)
  image, label = make_slice(rng)
  path = tmp_path / f"{case}.tfrecords"
  feats = slice_features(image, label)
  if case == "missing":
    del feats["lsize_dim2"]
  elif case == "wrong_size":
    feats["dsize_dim0"] = feats["lsize_dim0"] = [SHAPE[0] + 1]
  elif case == "bad_label":
    feats["label_vol"] = np.full(SHAPE, 500, "<f4").tobytes()
  records = [tfrecord.encode_example(feats)] * (2 if case == "two_records" else 1)
  tfrecord.write_tfrecords(path, records)
  message = one_line_error(mmwhs.read_slice, path)
  assert str(path) in message
  expected = {"missing": "'lsize_dim2' is missing", "wrong_size": "needs", "bad_label": "raw MM-WHS",
              "two_records": "holds 2 records"}[case]
  assert expected in message


@pytest.mark.parametrize("where", ["data", "length", "truncate", "truncate_header"])
def test_corrupt_crc_and_truncation_name_file_and_record(tmp_path, where):
  rng = np.random.default_rng(4)
  path = tmp_path / "c.tfrecords"
  image, label = make_slice(rng)
  records = [tfrecord.encode_example(slice_features(image, label))] * 2
  tfrecord.write_tfrecords(path, records)
  raw = bytearray(path.read_bytes())
  second = len(raw) // 2
  if where == "data":
    raw[second + 100] ^= 0x01
  elif where == "length":
    raw[second + 2] ^= 0x40
  elif where == "truncate":
    raw = raw[:-10]
  else:
    raw = raw[:second + 5]
  path.write_bytes(bytes(raw))
  message = one_line_error(lambda: list(tfrecord.iter_records(path)))
  assert str(path) in message and "record 1" in message
  assert ("truncated" if where.startswith("truncate") else "CRC-32C mismatch") in message


# ------------------------------------------------------------------------------------------ npz volumes


def test_npz_volume_flip_and_remap(tmp_path):
  rng = np.random.default_rng(5)
  image = rng.normal(size=(5, 4, 3)).astype(np.float32)
  label = rng.integers(0, 6, size=(5, 4, 3)).astype(np.int16)
  path = tmp_path / "image_ct_1003.npz"
  np.savez(path, image, label)
  got_image, got_label = mmwhs.read_npz_volume(path)
  np.testing.assert_array_equal(got_image, np.flip(np.flip(image, 0), 1))
  np.testing.assert_array_equal(got_label, np.where(label == 5, 0, label)[::-1, ::-1])
  unflipped, _ = mmwhs.read_npz_volume(path, flip=False)
  np.testing.assert_array_equal(unflipped, image)
  np.savez(tmp_path / "bad_ct.npz", image=image)
  assert "arr_0 (image) and arr_1" in one_line_error(mmwhs.read_npz_volume, tmp_path / "bad_ct.npz")


# ------------------------------------------------------------------------------------------ release -> sites


def make_release(root, rng, *, n_train=5, n_val=2, with_lists=True):
  """A tiny PnP-AdaNet-style release: {ct,mr}_{train,val}_tfs/, lists/, npz test volumes."""
  truth = {}
  for mod in ("ct", "mr"):
    for split, n in (("train", n_train), ("val", n_val)):
      names = []
      for i in range(n):
        image, label = make_slice(rng)
        rel = f"{mod}_{split}_tfs/{mod}_{split}_slice{i}.tfrecords"
        write_slice(root / rel, image, label)
        truth[rel] = (image, label)
        names.append(rel)
      if with_lists:
        (root / "lists").mkdir(exist_ok=True)
        # the list's order (not the file-name order) defines the stacking order
        order = names[::-1] if split == "train" else names
        (root / "lists" / f"{mod}_{split}_list").write_text("".join(f"./{r}\n" for r in order))
    vol = rng.normal(size=(8, 6, 4)).astype(np.float32)
    lab = rng.integers(0, 6, size=(8, 6, 4)).astype(np.float32)
    (root / "test").mkdir(exist_ok=True)
    np.savez(root / "test" / f"image_{mod}_10{mod == 'mr' and '07' or '03'}.npz", vol, lab)
    truth[f"{mod}_test"] = (vol, lab)
  return truth


def test_convert_release_and_load_it_as_sites(tmp_path):
  rng = np.random.default_rng(6)
  src = tmp_path / "release"
  truth = make_release(src, rng)
  assert convert.detect_raw_format(src) == "mmwhs"
  out = convert.convert("mmwhs", src, tmp_path / "sites", slices_per_volume=3, progress=None)
  info, cases = load_dataset(out)
  assert info.labels == {0: "background", 1: "MYO", 2: "LAC", 3: "LVC", 4: "AA"}
  assert {s: sorted(c.case_id for c in cs) for s, cs in cases.items()} == {
      "CT": ["test_1003", "train_000", "train_001", "val_000"],
      "MR": ["test_1007", "train_000", "train_001", "val_000"]}
  by_key = {c.key: c for cs in cases.values() for c in cs}
  # train list is reversed: pseudo-volume train_000 = slices 4, 3, 2; train_001 = slices 1, 0
  first = by_key["CT/train_000"]
  assert first.image.shape == (8, 6, 3)
  for z, i in enumerate([4, 3, 2]):
    image, label = truth[f"ct_train_tfs/ct_train_slice{i}.tfrecords"]
    np.testing.assert_array_equal(first.image[..., z], image[..., 1])
    np.testing.assert_array_equal(first.label[..., z], np.where(label[..., 1] == 5, 0, label[..., 1]))
  assert by_key["CT/train_001"].image.shape[2] == 2
  vol, lab = truth["mr_test"]
  np.testing.assert_array_equal(by_key["MR/test_1007"].image, vol[::-1, ::-1])
  np.testing.assert_array_equal(by_key["MR/test_1007"].label, np.where(lab == 5, 0, lab)[::-1, ::-1])
  splits = json.loads((out / "splits_released.json").read_text())["sites"]
  assert splits["CT"] == {"train": ["train_000", "train_001"], "val": ["val_000"], "test": ["test_1003"]}
  meta = json.loads((out / "dataset.json").read_text())
  assert meta["sites"] == {"CT": {"modality": "CT"}, "MR": {"modality": "MR"}}
  assert meta["generator"]["cases"]["CT/train_000"]["source"] == \
      "ct_train_tfs/ct_train_slice4.tfrecords .. ct_train_tfs/ct_train_slice2.tfrecords"
  # deterministic, and never overwritten
  again = convert.convert("mmwhs", src, tmp_path / "sites2", slices_per_volume=3, progress=None)
  for f in ("dataset.json", "CT/train_000_image.nii.gz", "MR/test_1007_label.nii.gz"):
    assert (out / f).read_bytes() == (again / f).read_bytes()
  with pytest.raises(DataError, match="already exists"):
    convert.convert("mmwhs", src, out, progress=None)


def test_without_lists_slices_go_in_slice_number_order(tmp_path):
  rng = np.random.default_rng(7)
  src = tmp_path / "release"
  truth = make_release(src, rng, n_train=11, n_val=1, with_lists=False)
  slices, _, problems = mmwhs.discover(src)
  assert not problems
  assert [p.name for p in slices[("CT", "train")]][:3] == ["ct_train_slice0.tfrecords", "ct_train_slice1.tfrecords",
                                                          "ct_train_slice2.tfrecords"]
  assert slices[("CT", "train")][-1].name == "ct_train_slice10.tfrecords"
  assert len(truth) == 2 * 12 + 2
  (src / "lists").mkdir()
  (src / "lists" / "mr_train_list").write_text("/path/to/mr_training/tfrecord/files\n")  # as in the PnP repo
  _, _, problems = mmwhs.discover(src)
  assert len(problems) == 1 and "placeholder" in str(problems[0])


def test_check_cli_on_raw_release(tmp_path, capsys):
  rng = np.random.default_rng(8)
  src = tmp_path / "release"
  make_release(src, rng, n_train=2, n_val=1)
  assert check.main([str(src)]) == 0
  out = capsys.readouterr().out
  assert "raw mmwhs release" in out and "python -m medgen_jax.data.convert --format mmwhs" in out
  bad = src / "mr_train_tfs" / "mr_train_slice1.tfrecords"
  raw = bytearray(bad.read_bytes())
  raw[40] ^= 0xFF
  bad.write_bytes(bytes(raw))
  (src / "ct_val_tfs" / "ct_val_slice0.tfrecords").write_bytes(b"\x01\x02")
  assert check.main([str(src)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and err[-1] == "check failed: 2 problem(s)"
  assert any(str(bad) in line and "CRC-32C mismatch" in line and "medgen_jax.data.convert" in line for line in err)
  assert any("ct_val_slice0.tfrecords" in line and "truncated" in line for line in err)
  with pytest.raises(DataError, match="CRC-32C"):
    convert.convert("mmwhs", src, tmp_path / "never", progress=None)
  assert not (tmp_path / "never").exists() and not (tmp_path / ".never.partial").exists()
