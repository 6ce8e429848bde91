"""Write the golden TF resize fixtures of tests/test_augment_tf_resize.py (tests/fixtures/tf_resize_*.npz).

Runs the BYOL authors' exact image path in TensorFlow (byol/utils/dataset.py: crop the uint8 image, then
``tf.image.resize(image, [h, w], BICUBIC)`` on uint8, then ``clip(image / 255, 0, 1)``) on small random images.
TensorFlow is NOT a dependency of the package or of its tests; run this once in a separate environment:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfvenv/bin/python tools/make_tf_resize_fixtures.py

Each file holds: ``image`` uint8 [C, H, W]; ``box`` (top, left, height, width) of the crop taken before the
resize; ``size`` (out_h, out_w); ``out`` float32 [C, out_h, out_w] = clip(resize / 255, 0, 1); ``raw`` the
unclipped resize in 0-255 (TF overshoots); ``tf_version``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def official_center_box(h: int, w: int, size: int = 224, padding: int = 32) -> tuple[int, int, int, int]:
    """``_decode_and_center_crop``'s window, computed with TF ops as the authors did."""
    import tensorflow as tf

    side = tf.cast((size / (size + padding)) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    return int((h - side + 1) // 2), int((w - side + 1) // 2), int(side), int(side)


def cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]]]:
    """name -> (uint8 HWC image, crop box, output size)."""
    def img(h, w, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    out = {
        "upsample": (img(7, 9), (0, 0, 7, 9), (16, 13)),          # x2.3 / x1.4, odd sizes
        "downsample": (img(37, 41), (0, 0, 37, 41), (11, 8)),    # /3.4 / /5.1 (no antialias, as TF2 default)
        "odd_mixed": (img(13, 5), (0, 0, 13, 5), (9, 17)),       # one axis down, one up
        "tiny": (img(2, 3), (0, 0, 2, 3), (5, 7)),               # every output row has taps outside the image
        "crop_window": (img(40, 50), (5, 7, 23, 29), (19, 19)),  # decode_and_crop_jpeg window, then resize
        "same_size": (img(6, 6, 1), (0, 0, 6, 6), (6, 6)),       # identity (phase 0) on one channel
    }
    # the 224/256 central window of a 45 x 60 image resized to 28 px (28 / (28 + 4) = 224 / 256: the same window,
    # so augment.LinearEvalTest(28, resize=32) must reproduce it end to end)
    out["eval_center"] = (img(45, 60), official_center_box(45, 60), (28, 28))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = ap.parse_args(argv)
    import tensorflow as tf

    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    for name, (image, (t, l, h, w), size) in cases(np.random.default_rng(2020)).items():
        crop = tf.constant(image)[t:t + h, l:l + w]
        raw = tf.image.resize(crop, list(size), tf.image.ResizeMethod.BICUBIC).numpy()  # uint8 -> float32
        out = np.clip(raw / 255.0, 0.0, 1.0).astype(np.float32)
        np.savez_compressed(dest / f"tf_resize_{name}.npz", image=image.transpose(2, 0, 1), box=np.array([t, l, h, w]),
                            size=np.array(size), out=out.transpose(2, 0, 1), raw=raw.transpose(2, 0, 1),
                            tf_version=np.array(tf.__version__))
        print(f"{name}: {image.shape[:2]} box {(t, l, h, w)} -> {size}, raw range [{raw.min():.1f}, {raw.max():.1f}]")


if __name__ == "__main__":
    main()
