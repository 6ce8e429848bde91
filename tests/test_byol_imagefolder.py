"""BYOL on an ImageNet-layout folder of real JPEGs of different sizes, decoded in workers or after transfer."""
import pytest

from byol import BYOL
from zoo.data import ImageDataModule
from zoo.train.trainer import build_trainer


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_byol_trains_from_jpeg_folder(tiny_imagefolder, tmp_path, decode):
    model = BYOL(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=24,
                 projector_hidden=32, projection_dim=16, warmup_steps=1)
    dm = ImageDataModule(f"imagefolder:{tiny_imagefolder}", batch_size=6, num_workers=0, decode=decode)
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=3, logger=False, enable_progress_bar=False,
                            limit_val_batches=1, val_check_interval=3, enable_model_summary=False)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert model.hparams.num_classes == 3
    assert "val/online_top1" in trainer.callback_metrics


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_byol_survives_16bit_png_and_a_file_that_vanishes(tiny_imagefolder, tmp_path, decode):
    """A 16-bit PNG (torchvision decodes it to uint16) trains like any image; a file deleted after the folder was
    listed is skipped, counted and named, like a corrupt one."""
    import warnings

    import numpy as np
    from lightning.pytorch.callbacks import Callback
    from PIL import Image

    folder = tiny_imagefolder / "train" / "n01443537"
    jpeg = sorted(folder.glob("*.JPEG"))[0]
    grey16 = (np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(folder / "deep.png")  # mode I;16
    jpeg.unlink()  # still 18 training images: 3 full batches of 6, every file met in the one epoch
    doomed = sorted((tiny_imagefolder / "train" / "n01484850").glob("*.JPEG"))[2]

    class DeleteAfterListing(Callback):
        def on_train_start(self, trainer, pl_module):
            doomed.unlink()

    model = BYOL(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=24,
                 projector_hidden=32, projection_dim=16, warmup_steps=1)
    dm = ImageDataModule(f"imagefolder:{tiny_imagefolder}", batch_size=6, num_workers=0, decode=decode)
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=3, logger=False, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, callbacks=[DeleteAfterListing()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    assert trainer.global_step == 3 and len(dm.train_set) == 18
    reports = [str(w.message) for w in caught if "undecodable" in str(w.message)]
    assert reports == [f"epoch 0: skipped 1 undecodable images: {doomed}"]
