import numpy as np
import pytest

from noduledet import checkpoint
from noduledet.data.cache import SliceCache
from noduledet.errors import UserError
from noduledet.inference import Detector
from tests.conftest import write_random_checkpoint


def test_onnx_engine_gives_the_same_boxes(trained, phantom_cache):
    cache = SliceCache(phantom_cache)
    ckpt = checkpoint.load(trained / "best.pt")
    torch_det = Detector.from_checkpoint(ckpt, "cpu", batch_size=4, engine="torch")
    onnx_det = Detector.from_checkpoint(ckpt, "cpu", batch_size=4, engine="onnx")
    compared = 0
    for uid in cache.uids:
        vol, g = cache.volume(uid), cache.geometry(uid)
        slices = cache.meta(uid)["lung_slices"][::3]
        for a, b in zip(torch_det.detect(vol, g, slices), onnx_det.detect(vol, g, slices)):
            assert len(a.boxes) == len(b.boxes), (uid, a.z)
            np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
            compared += len(a.boxes)
    assert compared > 0


def test_onnx_engine_refuses_masks(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "m.pt", "res", masks=True)
    with pytest.raises(UserError, match="has a mask head"):
        Detector.from_checkpoint(checkpoint.load(ckpt), "cpu", engine="onnx")
