"""Image sources: folder scanning (odd modes, corrupt files), built-in sets, splits, determinism."""

from __future__ import annotations

import math
import os
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from vqgpt.ground.config import ConfigError, from_dict
from vqgpt.ground.data import (PHOTO_NAMES, TEXTURE_EVAL_FRACTIONS, TEXTURE_EVAL_WIDTH, DataConfig, ImageTooSmallError,
                        Unreadable, UnreadableImageWarning, build_dataset, eval_images, iterate_images)

R = 16


def _save(path, img: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


@pytest.fixture
def mixed_folder(tmp_path):
    """Uniform-colour images in many modes; expected RGB value (0..255) per relative path."""
    root = tmp_path / "imgs"
    expected = {}
    _save(root / "cats" / "gray.png", Image.new("L", (40, 24), 0)); expected["cats/gray.png"] = (0, 0, 0)
    rgba = Image.new("RGBA", (20, 30), (255, 0, 0, 0))  # fully transparent -> white background
    _save(root / "cats" / "rgba.png", rgba); expected["cats/rgba.png"] = (255, 255, 255)
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    _save(root / "cats" / "palette.PNG", pal); expected["cats/palette.PNG"] = (0, 0, 255)
    deep = Image.fromarray(np.full((18, 22), 65535, dtype=np.uint16))  # 16-bit grayscale
    assert deep.mode.startswith("I")
    _save(root / "dogs" / "nested" / "deep16.png", deep); expected["dogs/nested/deep16.png"] = (255, 255, 255)
    frames = [Image.new("RGB", (30, 20), (0, 255, 0)), Image.new("RGB", (30, 20), (255, 0, 0))]
    _save(root / "dogs" / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    expected["dogs/anim.gif"] = (0, 255, 0)  # first frame
    _save(root / "dogs" / "photo.jpeg", Image.new("RGB", (50, 40), (255, 255, 0)), quality=100)
    expected["dogs/photo.jpeg"] = (255, 255, 0)
    _save(root / "top.bmp", Image.new("RGB", (16, 16), (0, 255, 255))); expected["top.bmp"] = (0, 255, 255)
    _save(root / "x.tif", Image.new("RGB", (17, 33), (255, 0, 255))); expected["x.tif"] = (255, 0, 255)
    _save(root / "dogs" / "w.webp", Image.new("RGB", (20, 20), (255, 255, 255)), lossless=True)
    expected["dogs/w.webp"] = (255, 255, 255)
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "ignored.png", Image.new("RGB", (20, 20)))
    return root, expected


def test_folder_mixed_modes(mixed_folder):
    root, expected = mixed_folder
    ds = build_dataset(DataConfig(source=str(root), resolution=R), "eval")
    assert ds.classes == ["cats", "default", "dogs"] and ds.num_classes == 3
    assert [ds.name(i) for i in range(len(ds))] == sorted(expected)
    assert ds.skipped == []
    for i in range(len(ds)):
        image, label = ds[i]
        name = ds.name(i)
        assert image.shape == (3, R, R) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        want = torch.tensor(expected[name], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(image.mean(dim=(1, 2)), want, atol=0.03), name
        top = name.split("/")[0] if "/" in name else "default"
        assert ds.classes[label] == top


def test_corrupt_files_are_skipped_and_named_when_read(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _save(root / f"ok{i}.png", Image.new("RGB", (20, 20), (10 * i, 0, 0)))
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    good = root / "ok0.png"
    data = good.read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the start opens no image, so it cannot warn about one
        ds = build_dataset(DataConfig(source=str(root), resolution=R))
    assert len(ds) == 5 and ds.skipped == []
    with pytest.warns(UnreadableImageWarning) as record:
        items = {ds.name(i): ds[i] for i in range(len(ds))}
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and any("noise.jpg" in m for m in messages) and any("trunc.png" in m for m in messages)
    assert sorted(name for name, item in items.items() if isinstance(item, Unreadable)) == ["noise.jpg", "trunc.png"]
    for name in ("ok0.png", "ok1.png", "ok2.png"):
        assert items[name][0].shape == (3, R, R)


def test_truncated_jpeg_is_skipped_at_first_read(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "a" / "0.png", Image.new("RGB", (20, 20), (255, 0, 0)))
    _save(root / "b" / "1.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    _save(root / "c" / "2.png", Image.new("RGB", (20, 20), (0, 0, 255)))
    data = (root / "b" / "1.jpg").read_bytes()
    (root / "b" / "1.jpg").write_bytes(data[: len(data) // 2])  # header fine, body truncated: PIL's verify() passes it
    ds = build_dataset(DataConfig(source=str(root), resolution=R), "eval")
    assert [ds.name(i) for i in range(len(ds))] == ["a/0.png", "b/1.jpg", "c/2.png"]
    with pytest.warns(UnreadableImageWarning, match="1.jpg"):
        assert isinstance(ds[1], Unreadable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once per process, not at every read
        assert isinstance(ds[1], Unreadable)
    assert [name for batch in iterate_images(str(root), R) for name in batch.names] == ["a/0.png", "c/2.png"]


def test_bad_sources_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        build_dataset(DataConfig(source=str(empty)))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(DataConfig(source=str(missing)))
    with pytest.raises(ValueError, match="builtin:mnist, builtin:photos, builtin:textures"):
        build_dataset(DataConfig(source="builtin:cifar"))
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(), "test")


def test_config_is_strict():
    cfg = from_dict(DataConfig, {"source": "builtin:photos", "resolution": 64})
    assert cfg.resolution == 64 and cfg.hflip is True
    with pytest.raises(ConfigError, match="colour"):
        from_dict(DataConfig, {"colour": 1})
    with pytest.raises(ConfigError, match="resolution"):
        from_dict(DataConfig, {"resolution": 0})


def test_small_file_without_resize_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "big.png", Image.new("RGB", (40, 40)))
    _save(root / "small.png", Image.new("RGB", (20, 12)))
    crop_only = build_dataset(DataConfig(source=str(root), resolution=R, resize=False))  # no image opened yet
    assert crop_only[0][0].shape == (3, R, R)
    with pytest.raises(ImageTooSmallError, match=r"small\.png is 20x12.*data\.resize"):
        crop_only[1]  # found when first read
    assert len(build_dataset(DataConfig(source=str(root), resolution=R, resize=True))) == 2


def test_folder_crops_are_seeded_and_eval_is_center(tmp_path):
    root = tmp_path / "imgs"
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))  # brightness grows left -> right
    _save(root / "ramp.png", Image.fromarray(ramp))
    cfg = DataConfig(source=str(root), resolution=R, resize=False)
    train = build_dataset(cfg, "train")

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([train[0][0] for _ in range(8)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    flipped = draw(0)[:, 0, 0, :]  # rows of the first channel: decreasing ones were flipped
    assert ((flipped[:, 1:] - flipped[:, :-1]) < 0).any() and ((flipped[:, 1:] - flipped[:, :-1]) > 0).any()
    center = build_dataset(cfg, "eval")[0][0]
    want = torch.from_numpy(ramp[16:32, 24:40]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(center, want)
    no_aug = build_dataset(DataConfig(source=str(root), resolution=R, resize=False, random_crop=False, hflip=False))
    assert torch.equal(no_aug[0][0], want)


def test_mnist_splits_and_shapes():
    train = build_dataset(DataConfig(source="builtin:mnist"), "train")
    test = build_dataset(DataConfig(source="builtin:mnist"), "eval")
    assert (len(train), len(test)) == (4500, 500)
    assert train.classes == [str(d) for d in range(10)] and test.num_classes == 10
    assert np.bincount(train.labels).tolist() == [450] * 10
    assert np.bincount(test.labels).tolist() == [50] * 10
    assert not set(train.rows.tolist()) & set(test.rows.tolist())
    image, label = test[123]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert (image[:, :2] == -1).all() and (image[:, :, -2:] == -1).all()  # padding 28 -> 32 is black
    assert image.max() > 0.5  # there is a digit
    torch.manual_seed(0)
    a = train[7][0]
    torch.manual_seed(1)
    assert torch.equal(a, train[7][0])  # digits are never flipped, even with hflip=True
    big = build_dataset(DataConfig(source="builtin:mnist", resolution=48), "eval")[0][0]
    assert big.shape == (3, 48, 48)
    crop = build_dataset(DataConfig(source="builtin:mnist", resolution=28, resize=False), "eval")
    assert torch.equal(crop[0][0], test[0][0][:, 2:30, 2:30])
    with pytest.raises(ValueError, match="resize"):
        build_dataset(DataConfig(source="builtin:mnist", resolution=40, resize=False))


def test_photos_split_is_disjoint_and_eval_deterministic():
    cfg = DataConfig(source="builtin:photos", resolution=R, crops_per_epoch=40)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert train.classes == test.classes == list(PHOTO_NAMES)
    train_names = {c.name for c in train.canvases}
    test_names = {c.name for c in test.canvases}
    assert test_names and not train_names & test_names and train_names | test_names == set(PHOTO_NAMES)
    assert len(train) == 40
    train_labels = {train[i][1] for i in range(len(train))}
    assert train_labels == {PHOTO_NAMES.index(n) for n in train_names}
    assert len(test) >= 10
    again = build_dataset(cfg, "eval")
    torch.manual_seed(3)
    first = [test[i] for i in range(len(test))]
    torch.manual_seed(4)
    second = [again[i] for i in range(len(again))]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second))
    assert [test.name(i) for i in range(len(test))] == [again.name(i) for i in range(len(again))]
    assert len({test.name(i) for i in range(len(test))}) == len(test)
    for image, label in first:
        assert image.shape == (3, R, R) and image.min() >= -1 and image.max() <= 1
        assert PHOTO_NAMES[label] in test_names
    # train crops vary with the seed; with random_crop=False they are seeded by index instead
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(1)
    assert not torch.equal(a, train[0][0])
    fixed = build_dataset(DataConfig(source="builtin:photos", resolution=R, random_crop=False, hflip=False), "train")
    torch.manual_seed(0)
    b = fixed[5][0]
    torch.manual_seed(1)
    assert torch.equal(b, fixed[5][0]) and not torch.equal(b, fixed[16][0])



def test_seeded_crops_come_from_the_split_and_repeat():
    test = build_dataset(DataConfig(source="builtin:photos", resolution=R), "eval")
    torch.manual_seed(0)
    a = [test.seeded_crop(i) for i in range(6)]
    torch.manual_seed(1)
    b = [test.seeded_crop(i) for i in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({x.sum().item() for x in a}) == 6  # different places
    assert all(x.shape == (3, R, R) for x in a)
    # only held-out photos: a crop equals a patch of an eval canvas (resize off: exact copy)
    exact = build_dataset(DataConfig(source="builtin:photos", resolution=R, resize=False), "eval")
    crop = exact.seeded_crop(3)
    k, top, left, side = exact._crop_box(3, torch.Generator().manual_seed(3))
    assert side == R and exact.canvases[k].name in {c.name for c in test.canvases}
    assert torch.equal(crop, exact.canvases[k].image[:, top:top + R, left:left + R].float() / 127.5 - 1)

def test_photo_crops_reproducible_in_seeded_dataloader_workers():
    ds = build_dataset(DataConfig(source="builtin:photos", resolution=R, crops_per_epoch=16), "train")

    def epoch(seed):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat([images for images, _ in loader])

    first = epoch(0)
    assert torch.equal(first, epoch(0))
    assert not torch.equal(first, epoch(1))


def test_textures_hold_out_the_right_strip():
    cfg = DataConfig(source="builtin:textures", resolution=R, crops_per_epoch=30)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert train.classes == test.classes == ["brick", "grass", "gravel"]
    import skimage.data

    for a, b in zip(train.canvases, test.canvases):
        assert a.name == b.name
        # the two parts tile the texture as skimage ships it, side by side: every pixel in exactly one
        original = torch.from_numpy(getattr(skimage.data, a.name)()).expand(3, -1, -1)  # grey (H, W) -> (3, H, W)
        assert torch.equal(torch.cat([a.image, b.image], dim=-1), original), a.name
        # the right-most quarter (at least) is held out, and it fits the largest eval crop
        width, height = original.shape[-1], original.shape[-2]
        assert b.image.shape[-1] >= math.ceil(TEXTURE_EVAL_WIDTH * width)
        assert b.image.shape[-1] >= round(max(TEXTURE_EVAL_FRACTIONS) * min(width, height))
        assert a.image.shape[-1] >= b.image.shape[-1]  # most of the texture is left to train on
    assert sorted({train[i][1] for i in range(len(train))}) == [0, 1, 2]
    assert sorted({test[i][1] for i in range(len(test))}) == [0, 1, 2]
    again = build_dataset(cfg, "eval")
    assert all(torch.equal(test[i][0], again[i][0]) for i in range(len(test)))
    # with resize off an eval crop is an exact copy of the held-out strip
    exact = build_dataset(DataConfig(source="builtin:textures", resolution=R, resize=False), "eval")
    name = exact.name(0)
    k, top, left, side = exact.eval_crops[0]
    strip = exact.canvases[k].image[:, top:top + side, left:left + side].float() / 127.5 - 1
    assert side == R and torch.equal(exact[0][0], strip) and name.startswith("brick")
    with pytest.raises(ValueError, match="at most 256"):
        build_dataset(DataConfig(source="builtin:textures", resolution=300))


def test_iterate_images_folder_and_builtin(mixed_folder):
    root, expected = mixed_folder
    batches = list(iterate_images(str(root), R, batch_size=4))
    assert [b.images.shape[0] for b in batches] == [4, 4, 1]
    assert sum((b.names for b in batches), []) == sorted(expected)
    assert batches[0].images.shape[1:] == (3, R, R) and batches[0].labels.dtype == torch.int64
    ds = eval_images("builtin:mnist", 32)
    first = next(iterate_images("builtin:mnist", 32, batch_size=5, limit=5))
    assert torch.equal(first.images, torch.stack([ds[i][0] for i in range(5)]))
    assert first.names == [ds.name(i) for i in range(5)]



def test_a_very_long_image_in_a_folder_is_cut_before_it_is_resized(tmp_path, monkeypatch):
    """A 1 x 100,000 px strip grew to 16 x 1,600,000 px before its crop (a 1 x 2,000,000 one: the machine's
    memory); pictures up to 8:1 are fitted exactly as before."""
    from vqgpt.ground.dataset_base import image_transform

    real_resize, asked = Image.Image.resize, []

    def resize(self, size, *args, **kwargs):
        asked.append(size[0] * size[1])
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (100_000, 1), (10, 200, 30)).save(folder / "strip.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 150, 3), dtype=np.uint8)).save(folder / "wide.png")  # 7.5:1
    for split in ("train", "eval"):
        data = build_dataset(DataConfig(source=str(folder), resolution=16), split)
        strip = data[[p.name for p in data.files].index("strip.png")][0]
        assert strip.shape == (3, 16, 16) and max(asked) <= 8 * 16 * 16
        assert torch.allclose(strip, torch.tensor([10, 200, 30]).view(3, 1, 1) / 127.5 - 1, atol=1e-6)
    wide = Image.open(folder / "wide.png")
    cfg = DataConfig(source=str(folder), resolution=16)
    from torchvision.transforms import v2

    exact = v2.CenterCrop(16)(v2.Resize(16, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(wide))
    assert np.array_equal(np.asarray(image_transform(cfg, "eval")(wide)), np.asarray(exact))


def test_a_picture_fitted_to_a_non_square_size_covers_it(tmp_path):
    """open_fitted (the app's and `vqgpt complete`'s fit) resized the shorter side to the target's shorter
    side, so a square picture fitted to 16 x 32 came back 16 x 16 with grey bars beside it."""
    from vqgpt.ground.images import open_fitted

    Image.new("RGB", (100, 100), (250, 20, 20)).save(tmp_path / "square.png")
    red = torch.tensor([250, 20, 20]).view(3, 1, 1) / 127.5 - 1
    for height, width in ((16, 32), (32, 16), (8, 64)):
        fitted = open_fitted(tmp_path / "square.png", height, width)
        assert fitted.shape == (3, height, width)
        assert torch.allclose(fitted, red.expand_as(fitted), atol=1e-5), (height, width)


def test_a_picture_fitted_to_a_square_is_the_one_the_datasets_read(tmp_path):
    """open_fitted (`vqgpt complete`, the app) resized with torchvision's bilinear on floats, the datasets
    (`reconstruct`, `encode`, training) with Pillow's bicubic: one file gave two pictures, and `complete`
    encoded 8-14 of 64 codes otherwise than the codes its prior was trained on."""
    from vqgpt.ground.data import eval_images
    from vqgpt.ground.images import open_fitted

    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 70), (56, 40), (16, 16), (300, 33), (17, 100)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    dataset = eval_images(str(tmp_path), 16)
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert torch.equal(open_fitted(dataset.files[i], 16, 16), image), dataset.files[i]


def test_high_bit_depth_grey_converts_in_bounded_memory_to_the_same_values(monkeypatch):
    """16-bit, 32-bit and float grey pictures went through whole-picture float64 temporaries: a 13000 x 13000
    16-bit PNG (360 KB) took 5 GB. Now a block of rows at a time, to the same 8-bit values."""
    import tracemalloc

    import vqgpt.ground.images as images

    def whole(arr, peak):  # the conversion as it was, the whole array at once
        arr = np.where(np.isfinite(arr), arr, 0.0)
        if peak is None:
            lo, hi = float(arr.min()), float(arr.max())
            arr, peak = arr - lo, max(hi - lo, 1e-12)
        return np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)

    monkeypatch.setattr(images, "GREY_BLOCK", 1 << 16)
    rng = np.random.default_rng(0)
    noisy = rng.normal(3, 5, (300, 200))
    for arr, peak in [(rng.integers(0, 65536, (300, 200)).astype(np.uint16), 65535.0),
                      (rng.integers(-5000, 900000, (300, 200)).astype(np.int32), None),
                      (np.where(rng.random((300, 200)) < 0.1, np.nan, noisy).astype(np.float32), None),
                      (np.full((5, 7), np.inf, np.float32), None)]:
        assert np.array_equal(np.asarray(images._grey_to_l(arr, peak)), whole(arr.astype(np.float64), peak))
    picture = Image.fromarray(rng.integers(0, 65536, (2000, 2000)).astype(np.uint16))
    assert picture.mode == "I;16"
    tracemalloc.start()
    try:
        grey = images.to_rgb(picture)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grey.size == (2000, 2000) and grey.mode == "RGB"
    assert peak < 40e6, f"{peak / 1e6:.0f} MB for a 4 MP picture"  # whole-picture float64: 32 MB per temporary


def test_a_large_picture_fitted_to_a_square_is_shrunk_by_the_exact_whole_factor(tmp_path):
    """The pre-shrink of a picture over FIT_SHRINK_PIXELS took its factor from a float (185 for 5952 px
    fitted to 16, where min(size) // 32 is 186), so square targets no longer fitted as before."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from vqgpt.ground.images import FIT_SHRINK_PIXELS, open_fitted, pil_to_tensor

    side = 5952
    assert side * side > FIT_SHRINK_PIXELS and side // 32 == 186
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    across, down = np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side))
    picture = Image.fromarray(np.stack([across, down, np.full((side, side), 90, np.uint8)], -1))
    picture.save(tmp_path / "big.png", compress_level=1)
    shrunk = picture.reduce(186)
    resized = v2.Resize(16, interpolation=v2.InterpolationMode.BICUBIC)(shrunk)
    expected = TF.center_crop(pil_to_tensor(resized), [16, 16])
    assert torch.equal(open_fitted(tmp_path / "big.png", 16, 16), expected)


def test_pillows_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch):
    """A picture over Image.MAX_IMAGE_PIXELS (up to twice it) warned without naming the file: in a folder of
    many, it could not be found."""
    from vqgpt.ground.images import open_fitted, open_rgb
    path = tmp_path / "huge.png"
    Image.new("RGB", (16, 16)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 pixels: over the limit, under twice it
    for read in (open_rgb, lambda p: open_fitted(p, 8, 8)):
        said = rf"{re.escape(str(path))}: Image size \(256 pixels\) exceeds"
        with pytest.warns(Image.DecompressionBombWarning, match=said):
            read(path)
    # other warnings raised while opening pass through as they were
    real_open = Image.open

    def noisy(*args, **kwargs):
        warnings.warn("something else", UserWarning)
        return real_open(*args, **kwargs)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image, "open", noisy)
    with pytest.warns(UserWarning, match="^something else$"):
        open_rgb(path)


def _private_dirty_kb() -> int:
    """This process's memory that no other process shares (what a forked worker has copied), in KB."""
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty line")


class _WorkerMemory(torch.utils.data.Dataset):
    """Each item: the private memory of the worker that reads it, after a garbage collection there."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        import gc

        gc.collect()
        return _private_dirty_kb()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads Linux's /proc/self/smaps_rollup")
def test_loader_workers_share_the_process_memory_instead_of_copying_it():
    """A forked worker's garbage collection wrote the header of every object of the process (modules, models,
    datasets), and each page written was copied into the worker: 80-100 MB per worker of a training process,
    for each worker, process and epoch. Frozen before the fork, the objects are left alone."""
    import gc
    import multiprocessing

    from vqgpt.ground.data import freeze_before_workers

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("workers are forked only under the fork start method")
    ballast = [{"k": [i]} for i in range(300_000)]  # a process full of objects (a big dataset's, say)

    def worker_kb() -> int:
        return int(next(iter(torch.utils.data.DataLoader(_WorkerMemory(), batch_size=None, num_workers=1))))

    try:
        copied = worker_kb()  # the baseline: workers forked from a process that was not frozen
        freeze_before_workers(1)
        shared = worker_kb()
    finally:
        gc.unfreeze()
    assert len(ballast) == 300_000
    print(f"worker private memory: {copied} KB unfrozen, {shared} KB frozen")
    assert shared < copied / 2 and copied - shared > 30_000, (shared, copied)  # KB
