"""BYOL on an ImageNet-layout folder of real JPEGs of different sizes, decoded in workers or after transfer."""
import pytest

from byol import BYOL
from zoo.data import ImageDataModule
from zoo.trainer import build_trainer


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
