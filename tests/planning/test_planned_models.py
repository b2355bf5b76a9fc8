"""The U-Net builder's planned options (anisotropic strides/kernels, features, He init) and the ResEnc variant."""
import importlib.util

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from segpipe.models.resenc_unet import build_resenc_unet  # noqa: E402
from segpipe.models.unet3d import build_unet3d  # noqa: E402

STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
KERNELS = [[3, 3, 1], [3, 3, 3], [3, 3, 3]]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))


def test_default_network_is_the_original_one():
    model = build_unet3d(1, 3, depth=3, base_filters=4)
    conv = model.get_layer("enc1_conv0")
    assert conv.kernel_size == (3, 3, 3) and conv.strides == (2, 2, 2)
    assert type(conv.kernel_initializer).__name__ == "GlorotUniform"
    assert model.get_layer("up0").kernel_size == (2, 2, 2)
    assert len([l for l in model.layers if isinstance(l, keras.layers.Add)]) == 0


def test_anisotropic_strides_and_kernels():
    model = build_unet3d(1, 3, depth=3, base_filters=4, strides=STRIDES, kernel_sizes=KERNELS)
    assert model.get_layer("enc0_conv0").kernel.shape == (3, 3, 1, 1, 4)
    assert model.get_layer("enc1_conv0").strides == (2, 2, 1)
    assert model.get_layer("dec0_conv0").kernel_size == (3, 3, 1)
    assert model.get_layer("up0").strides == (2, 2, 1) and model.get_layer("up1").strides == (2, 2, 2)
    # divisible by 4 along x, y and by 2 along z (not by 4)
    x = np.random.default_rng(0).normal(size=(1, 16, 12, 6, 1)).astype("float32")
    out = model.predict_on_batch(x)
    assert out.shape == (1, 16, 12, 6, 3)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_features_and_convs_per_stage():
    model = build_unet3d(2, 2, depth=3, features=[3, 5, 7], convs_per_stage=3, decoder_convs=1)
    assert model.get_layer("enc2_conv2").filters == 7
    assert model.get_layer("dec1_conv0").filters == 5
    with pytest.raises(ValueError):
        model.get_layer("dec1_conv1")


def test_he_initialisation():
    keras.utils.set_random_seed(0)
    model = build_unet3d(1, 2, depth=2, features=[32, 64], init="he_normal")
    kernel = np.asarray(model.get_layer("enc1_conv1").kernel)  # fan_in = 27 × 64
    assert kernel.std() == pytest.approx(np.sqrt(2 / (27 * 64)), rel=0.1)
    glorot = np.asarray(build_unet3d(1, 2, depth=2, features=[32, 64]).get_layer("enc1_conv1").kernel)
    # Glorot uniform: std sqrt(2 / (fan_in + fan_out)) = sqrt(2 / (27 × 128)), clearly smaller
    assert glorot.std() == pytest.approx(np.sqrt(2 / (27 * 128)), rel=0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strides=[[1, 1, 1], [2, 2]]),
     r"^Expected 2 triples \(one per stage\) of values in \[1, 2\]\. Received: strides=\[\[1, 1, 1\], \[2, 2\]\]\.$"),
    (dict(strides=[[2, 2, 2], [2, 2, 2]]),
     r"^Expected \[1, 1, 1\] as stage 0 \(full resolution\)\. Received: strides="),
    (dict(kernel_sizes=[[3, 3, 2], [3, 3, 3]]), r"values in \[1, 3, 5\]\. Received: kernel_sizes=\[\[3, 3, 2\]"),
    (dict(features=[4]), r"^Expected 2 positive filter counts \(one per stage\)\. Received: features=\[4\]\.$"),
    (dict(init="uniform"), r"^Expected one of \['glorot_uniform', 'he_normal'\]\. Received: init='uniform'\.$"),
    (dict(blocks_per_stage=[1]),
     r"^Expected 2 block counts >= 1 \(one per stage\)\. Received: blocks_per_stage=\[1\]\.$"),
    (dict(decoder_convs=0), r"^Expected an integer >= 1\. Received: decoder_convs=0\.$"),
])
def test_invalid_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet3d(1, 2, depth=2, **kwargs)


def test_resenc_unet_structure():
    model = build_resenc_unet(1, 3, depth=3, base_filters=4, strides=STRIDES, kernel_sizes=KERNELS)
    adds = [l.name for l in model.layers if isinstance(l, keras.layers.Add)]
    assert len(adds) == 1 + 3 + 4  # blocks per stage 1, 3, 4
    assert model.get_layer("enc1_block0_skip").strides == (2, 2, 1)  # projection where the shape changes
    assert "enc1_block1_skip" not in [l.name for l in model.layers]  # identity skips otherwise
    # one conv per decoder stage
    assert model.get_layer("dec0_conv0") and "dec0_conv1" not in [l.name for l in model.layers]
    assert type(model.get_layer("enc0_stem").kernel_initializer).__name__ == "HeNormal"
    out = model.predict_on_batch(np.zeros((2, 8, 8, 4, 1), "float32"))
    assert out.shape == (2, 8, 8, 4, 3)
    ds = build_resenc_unet(1, 3, depth=3, base_filters=4, deep_supervision=True)
    assert len(ds.outputs) == 2


def test_resenc_trains_one_step():
    from segpipe.losses import get_loss

    keras.utils.set_random_seed(0)
    model = build_resenc_unet(1, 2, depth=2, base_filters=4)
    model.compile(optimizer="adam", loss=get_loss({"name": "dice"}, num_classes=2))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 8, 1)).astype("float32")
    y = np.eye(2, dtype="float32")[(x[..., 0] > 0).astype(int)]
    first = float(model.train_on_batch(x, y))
    for _ in range(5):
        last = float(model.train_on_batch(x, y))
    assert np.isfinite(first) and last < first


def test_resenc_bundle_exports_and_formats_agree(tmp_path, phantom_root):
    from inference_helpers import make_run_dir

    from segpipe.export.run_export import export_run
    from segpipe.inference.runtimes import load_predictor

    keras.utils.set_random_seed(0)
    model = build_resenc_unet(1, 3, depth=3, base_filters=4, strides=STRIDES, kernel_sizes=KERNELS)
    run_dir = make_run_dir(tmp_path, model, phantom_root, depth=3, overrides=(
        "model.name=resenc_unet", f"model.strides={STRIDES}", f"model.kernel_sizes={KERNELS}",
        "model.deep_supervision=false"))
    bundle = export_run(run_dir, onnx=HAVE_ONNX)
    x = np.random.default_rng(1).normal(size=(1, 16, 24, 8, 1)).astype(np.float32)
    reference = load_predictor(bundle, "keras")(x)
    np.testing.assert_allclose(reference, model.predict_on_batch(x), atol=1e-6)
    for fmt in ["savedmodel"] + (["onnx"] if HAVE_ONNX else []):
        assert np.abs(load_predictor(bundle, fmt, trust_bundle=True)(x) - reference).max() <= 1e-4, fmt
