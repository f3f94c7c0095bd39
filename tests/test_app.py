"""`vqgpt app`: the page's handlers as plain functions, and the running page queried with gradio_client."""

import socket
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import tiny_prior, tiny_tokenizer

from vqgpt.cli import main
from vqgpt.cli.app import AppHandlers, code_colors, code_grid_picture, is_loopback
from vqgpt.ground.images import pil_to_tensor
from vqgpt.ground.metrics import psnr
from vqgpt.workflow.pipeline import VQGPTPipeline

try:  # gradio imports IPython lazily, also from its server threads; CPython 3.11's import lock once
    import IPython.core.getipython  # noqa: F401  # failed such a concurrent first import (KeyError in
except ImportError:  # _ModuleLock): imported here once, the later imports are lookups
    pass


@pytest.fixture()
def pipe_dir(tmp_path):
    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


@pytest.fixture()
def handlers(pipe_dir):
    return AppHandlers(VQGPTPipeline.from_pretrained(pipe_dir))


@pytest.fixture()
def files(tmp_path):
    """A 16x16 image (the prior's trained size), an 18x18 one (not a multiple of 4) and a text file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.new("RGB", (18, 18), (30, 160, 90)).save(tmp_path / "odd.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _tensors(gallery):
    return torch.stack([pil_to_tensor(image) for image, _caption in gallery])


def test_sample_is_the_pipelines_sampling(handlers):
    calls = []
    gallery, summary = handlers.sample("b", 3, cfg_scale=2.0, cfg_schedule="linear", temperature=0.9, top_k=50,
                                       top_p=0.95, seed=7, progress=lambda *a, **k: calls.append(k))
    assert [caption for _, caption in gallery] == ["sample 1", "sample 2", "sample 3"]
    from stage2_prior.draw import SamplingConfig

    expected = handlers.pipe.generate(3, class_labels="b", seed=7, sampling=SamplingConfig(
        temperature=0.9, top_k=50, top_p=0.95, cfg_scale=2.0, cfg_schedule="linear"))
    assert torch.allclose(_tensors(gallery), expected, atol=1 / 127)  # PNG rounding only
    assert "3 images of class b" in summary and "seed 7" in summary
    assert calls and calls[0]["desc"] == "sampling"  # the page's progress bar was started
    # larger than trained: sliding windows, said in the summary
    wide, summary = handlers.sample("a", 1, seed=0, height=16, width=32)
    assert wide[0][0].size == (32, 16) and "sliding windows" in summary


@pytest.mark.parametrize("args, message", [
    (dict(class_name="zebra"), r"unknown class 'zebra'; known classes: \[a, b, c\]"),
    (dict(class_name=""), "choose a class: a, b, c"),
    (dict(height=18), "height=18 is not a multiple of the tokenizer's downsampling factor 4: use 16 or 20"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(num=0), "number of images must be a whole number >= 1"),
    (dict(num=float("inf")), "number of images must be a whole number >= 1, got inf"),
    (dict(num=float("nan")), "number of images must be a whole number >= 1, got nan"),
    (dict(seed=1.7), "seed must be a whole number, got 1.7$"),
    (dict(seed=float("inf")), "seed must be a whole number"),
    (dict(height=float("inf")), "height .*must be a whole number"),
    (dict(top_p=2.0), r"top_p must be in \(0, 1\]"),  # was taken as "off"
    (dict(top_p=float("inf")), r"top_p must be in \(0, 1\]"),
    (dict(temperature=None), "temperature must be a number, got None"),  # a TypeError before
    (dict(cfg_scale="2"), "CFG scale must be a number, got '2'"),
    (dict(seed=2**64), "seed must be between -2\\*\\*63 and 2\\*\\*64 - 1"),  # the range, not "whole number"
])
def test_sample_bad_input_is_one_clear_message(handlers, args, message):
    with pytest.raises(ValueError, match=message):
        handlers.sample(**{"class_name": "a", "num": 1, **args})


def test_class_names_are_taken_as_chosen(pipe_dir, monkeypatch):
    """Folders 'cat' and 'cat ' are two classes: the page stripped the chosen name and sampled the other."""
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    pipe.classes = ["cat", "cat ", "  dog"]
    handlers, seen = AppHandlers(pipe), []
    generate = VQGPTPipeline.generate
    monkeypatch.setattr(VQGPTPipeline, "generate",
                        lambda self, num, class_labels=None, **kw: seen.append(class_labels)
                        or generate(self, num, class_labels=class_labels, **kw))
    for name in handlers.class_choices:
        _gallery, summary = handlers.sample(name, 1, seed=0)
        assert f"of class {name}" in summary
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match="choose a class"):
        handlers.sample("  ", 1)


def test_seeds_beyond_a_floats_integers_are_the_pipelines_seeds(handlers):
    # float(2**53 + 1) != 2**53 + 1: such seeds were refused as "not a whole number"
    for seed in (2**53 + 1, 2**63 - 1, -(2**63)):
        gallery, summary = handlers.sample("a", 1, seed=seed)
        expected = handlers.pipe.generate(1, class_labels="a", seed=seed)
        assert torch.allclose(_tensors(gallery), expected, atol=1 / 127) and f"seed {seed}" in summary


def test_uploads_used_as_they_are_have_a_pixel_limit(handlers, tmp_path):
    # the tokenizer is trained at 32 px: 16 x 32 x 32 pixels at most, e.g. 128 x 128 (a 1024 x 1024 upload
    # once held the one-at-a-time page for minutes)
    assert handlers.max_upload_pixels == 16 * 32 * 32
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "limit.png")
    Image.fromarray(rng.integers(0, 256, (132, 128, 3), dtype=np.uint8)).save(tmp_path / "over.png")
    assert handlers.reconstruct(str(tmp_path / "limit.png"), fit=False)[1].size == (128, 128)
    for call in (lambda p: handlers.reconstruct(p, fit=False),
                 lambda p: handlers.complete(p, keep_rows=1, num=1, class_name="a", fit=False)):
        with pytest.raises(ValueError, match=r"over.png is 132x128 px, more than the 16,384 pixels .*tick 'fit"):
            call(str(tmp_path / "over.png"))
    assert handlers.reconstruct(str(tmp_path / "over.png"), fit=True)[0].size == (32, 32)  # fitted: fine
    # the page's keep-rows slider reaches the rows of the tallest upload it takes as it is (16 px wide: 256)
    assert handlers.max_code_rows == 16 * 32 * 32 // 16 // 4


def test_complete_shows_the_original_beside_the_completions(handlers, files):
    gallery, summary = handlers.complete(str(files / "image.png"), keep_rows=2, extend_right=1, num=2,
                                         class_name="c", seed=3)
    assert [caption for _, caption in gallery] == ["original", "completion 1", "completion 2"]
    assert all(image.size == (20, 16) for image, _ in gallery)  # one code column (4 px) added
    image = pil_to_tensor(Image.open(files / "image.png"))
    expected = handlers.pipe.complete(image, 2, keep_rows=2, extend_right=1, class_labels="c", seed=3)
    assert torch.allclose(_tensors(gallery[1:]), expected, atol=1 / 127)
    original = _tensors(gallery[:1])[0]
    assert torch.allclose(original[:, :, :16], image, atol=1 / 127) and torch.all(original[:, :, 16:] == 1)
    assert "first 2 of 4 code rows kept, 1 code column added" in summary
    with pytest.raises(ValueError, match="nothing to sample"):
        handlers.complete(str(files / "image.png"), keep_rows=4, num=1, class_name="a")
    with pytest.raises(ValueError, match=r"^code rows to keep: the image has 4 code rows, so at most 4; got 100$"):
        handlers.complete(str(files / "image.png"), keep_rows=100, num=1, class_name="a")
    # an image smaller than the trained size says so, whatever the rows kept
    Image.open(files / "image.png").resize((8, 8)).save(files / "small.png")
    for keep in (1, 2, None):
        with pytest.raises(ValueError, match=r"smaller than the prior's 4x4: use an image of at least 16x16"):
            handlers.complete(str(files / "small.png"), keep_rows=keep, num=1, class_name="a", fit=False)


def test_uploads_that_are_no_image_or_of_a_bad_size_are_refused(handlers, files):
    for call in (lambda p: handlers.complete(p, keep_rows=1, class_name="a"), handlers.reconstruct):
        with pytest.raises(ValueError, match=r"notes.txt cannot be read as an image .*upload a PNG"):
            call(str(files / "notes.txt"))
    with pytest.raises(ValueError, match="upload an image first"):
        handlers.reconstruct(None)
    with pytest.raises(ValueError, match=r"odd.png: image size 18x18 is not divisible .* 4.*'fit to the trained"):
        handlers.reconstruct(str(files / "odd.png"), fit=False)
    # fitted to the tokenizer's training size, the same file is fine
    original, *_ = handlers.reconstruct(str(files / "odd.png"), fit=True)
    assert original.size == (32, 32)


def test_reconstruct_reports_psnr_codes_and_usage(handlers, files):
    original, recon, codes_picture, usage, summary = handlers.reconstruct(str(files / "image.png"), fit=False)
    tok = handlers.pipe.tokenizer
    image = pil_to_tensor(Image.open(files / "image.png"))
    codes = tok.encode(image[None])[0]
    expected = tok.decode(codes[None]).clamp(-1, 1)
    assert torch.allclose(pil_to_tensor(recon)[None], expected, atol=1 / 127)
    assert f"PSNR {float(psnr(image[None], expected)[0]):.2f} dB" in summary
    assert f"{len(codes.unique())} distinct codes of {tok.codebook_size}" in summary
    assert codes_picture.size == code_grid_picture(codes).size == (256, 256)
    # the code picture: one colour per cell, the colour of that cell's code index
    cell = 256 // codes.shape[0]
    pixels = np.asarray(codes_picture)
    colors = code_colors(codes.numpy())
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            assert (pixels[i * cell + cell - 1, j * cell + cell - 1] == colors[i, j]).all()
    # the usage picture has one bar per code used (a tiny codebook: one column per code index)
    used_columns = (np.asarray(usage)[-1] != 255).any(axis=1)
    bar = usage.width // tok.codebook_size
    assert set(np.flatnonzero(used_columns) // bar) == set(codes.unique().tolist())


def test_code_colors_tell_codes_apart():
    colors = code_colors(np.arange(64))
    assert (np.abs(np.diff(colors.astype(int), axis=0)).sum(axis=1) > 60).all()  # neighbours differ clearly
    assert (code_colors(np.array([5, 5])) == colors[5]).all()


def test_one_model_call_at_a_time(handlers):
    active, peak = [0], [0]
    generate = handlers.pipe.generate

    def slow_generate(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        try:
            return generate(*args, **kwargs)
        finally:
            active[0] -= 1

    handlers.pipe.generate = slow_generate
    threads = [threading.Thread(target=handlers.sample, args=("a", 1)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


def test_model_calls_run_in_the_order_asked_and_the_summary_times_the_sampling(handlers):
    """The summary counted the wait for the model as sampling time."""
    order, generate = [], handlers.pipe.generate

    def slow_generate(*args, **kwargs):
        order.append(kwargs["seed"])
        time.sleep(0.3)
        return generate(*args, **kwargs)

    handlers.pipe.generate = slow_generate
    summaries = {}

    def ask(seed):
        summaries[seed] = handlers.sample("a", 1, seed=seed)[1]

    threads, began = [], time.perf_counter()
    for seed in range(6):
        threads.append(threading.Thread(target=ask, args=(seed,)))
        threads[-1].start()
        while handlers.lock._next <= seed:  # each has drawn its turn before the next one asks
            time.sleep(0.005)
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    assert order == list(range(6))
    # each sampled for about a sixth of the whole; the last waited for five others
    assert max(float(summaries[seed].rsplit(", ", 1)[1].split()[0]) for seed in range(6)) < took / 2, summaries


def test_the_model_lock_goes_to_the_longest_waiting_request(handlers):
    """A plain lock goes to whoever grabs it first: a handler that just finished and takes the next request
    (or one that came later) got it before one already waiting."""
    lock, order = handlers.lock, []
    lock.__enter__()
    def wait_for_it():
        with lock:
            order.append("waiting")

    waiting = threading.Thread(target=wait_for_it)
    waiting.start()
    while getattr(lock, "_next", 2) < 2:  # it waits (a plain lock, which has no turns: a moment)
        time.sleep(0.005)
    time.sleep(0.1)
    lock.__exit__(None, None, None)
    lock.__enter__()  # at once again: behind the one waiting
    order.append("again")
    lock.__exit__(None, None, None)
    waiting.join(timeout=5)
    assert order == ["waiting", "again"]


def test_the_turn_lock_skips_a_waiter_that_gave_up():
    from vqgpt.cli.app import TurnLock

    lock, ran = TurnLock(), []
    lock.__enter__()  # held

    class GaveUp(Exception):
        pass

    real_wait = lock._turns.wait_for
    lock._turns.wait_for = lambda predicate: (_ for _ in ()).throw(GaveUp())  # the next waiter's wait fails
    with pytest.raises(GaveUp):
        lock.__enter__()
    lock._turns.wait_for = real_wait
    waiter = threading.Thread(target=lambda: (lock.__enter__(), ran.append(1), lock.__exit__()))
    waiter.start()
    time.sleep(0.1)
    assert not ran and lock.locked()
    lock.__exit__()  # the one that gave up is skipped: the third runs
    waiter.join(timeout=5)
    assert ran == [1] and not lock.locked()


def test_fitting_an_upload_costs_memory_of_the_target_not_the_file(handlers, tmp_path, monkeypatch):
    """A 1 x 200,000 px strip (a 1 KB file) grew to 16 x 3,200,000 px float32 before its crop (a 1 x 2,000,000
    one took the machine's memory); a 20 MP JPEG was decoded and converted to float32 in full."""
    from torchvision.transforms.v2 import functional as TF

    import vqgpt.ground.images as images

    real_to_tensor, seen = images.pil_to_tensor, []

    def to_tensor(picture):  # the float32 copy: of the fitted picture, never of the file's
        seen.append(3 * picture.size[0] * picture.size[1])
        if seen[-1] > 3_000_000:
            raise AssertionError(f"a {picture.size} picture made float32")
        return real_to_tensor(picture)

    monkeypatch.setattr(images, "pil_to_tensor", to_tensor)
    Image.new("RGB", (200_000, 1), (200, 40, 40)).save(tmp_path / "strip.png")
    original, *_ = handlers.reconstruct(str(tmp_path / "strip.png"), fit=True)
    assert original.size == (32, 32) and original.getpixel((5, 5)) == (200, 40, 40)
    gallery, _ = handlers.complete(str(tmp_path / "strip.png"), keep_rows=1, num=1, class_name="a", fit=True)
    assert gallery[0][0].size == (16, 16)
    yy, xx = np.mgrid[0:4000, 0:5000]  # a smooth 20 MP photo
    photo = np.stack([xx * 255 // 5000, yy * 255 // 4000, (xx + yy) * 255 // 9000], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    original, *_ = handlers.reconstruct(str(tmp_path / "photo.jpg"), fit=True)
    exact = TF.center_crop(pil_to_tensor(TF.resize(Image.fromarray(photo), 32, TF.InterpolationMode.BICUBIC)), [32, 32])
    assert (pil_to_tensor(original) - exact).abs().max() < 0.05  # the same picture
    assert max(seen) < 3_000_000


def test_page_queues_every_model_call_behind_one(handlers):
    demo = handlers_app(handlers)
    events = [fn for fn in demo.fns.values() if fn.api_name in ("sample", "complete", "reconstruct")]
    assert len(events) == 3
    assert {fn.concurrency_limit for fn in events} == {1} and len({fn.concurrency_id for fn in events}) == 1


def test_page_sweeps_its_pictures_from_the_cache(handlers):
    """Each answer's pictures are files in gradio's cache; a long-lived page kept every one."""
    assert handlers_app(handlers).delete_cache == (3600, 6 * 3600)


def handlers_app(handlers):
    from vqgpt.cli.app import build_app

    return build_app(handlers)


def test_page_errors_are_messages_not_tracebacks():
    gr = pytest.importorskip("gradio")
    from vqgpt.cli.app import page_errors

    with pytest.raises(gr.Error) as caught:
        with page_errors(gr):
            raise ValueError("unknown class 'x'")
    assert caught.value.message == "unknown class 'x'"
    with pytest.raises(gr.Error) as caught:
        with page_errors(gr):
            raise RuntimeError("boom")
    assert caught.value.message.startswith("internal error (RuntimeError: boom)")


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")


def test_cli_app_without_gradio_names_the_extra(pipe_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app", "--pipeline", str(pipe_dir)]) == 2
    assert 'pip install "vqgpt[app]"' in capsys.readouterr().err


def test_cli_app_warns_when_not_on_loopback(pipe_dir, monkeypatch):
    gr = pytest.importorskip("gradio")
    served = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: served.update(kwargs))
    with pytest.warns(UserWarning, match="--host 0.0.0.0 is not a loopback address"):
        assert main(["app", "--pipeline", str(pipe_dir), "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert served["server_name"] == "0.0.0.0" and served["server_port"] == 7999
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on loopback
        assert main(["app", "--pipeline", str(pipe_dir)]) == 0
    assert served["server_name"] == "127.0.0.1"


def test_cli_app_on_a_taken_port_is_one_error(pipe_dir, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--pipeline", str(pipe_dir), "--port", str(port)]) == 2
    assert f"error: cannot serve on 127.0.0.1:{port}: Cannot find empty port" in capsys.readouterr().err


def test_cli_app_port_out_of_range_and_unknown_host_are_one_error(pipe_dir, monkeypatch, capsys):
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit):
        main(["app", "--pipeline", str(pipe_dir), "--port", "70000"])
    assert "--port: must be <= 65535, got 70000" in capsys.readouterr().err

    def unknown(host, *args, **kwargs):  # what a name no resolver knows gives, without waiting for one
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    assert main(["app", "--pipeline", str(pipe_dir), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid: no such address or name here (Name or service not known)" in \
        capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_page_answers_and_survives_bad_input(pipe_dir, files, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from vqgpt.cli.app import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    port = _free_port()
    demo = launch(str(pipe_dir), port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary, gallery = client.predict("b", 2, 1.0, "constant", 1.0, 0, 1.0, 5, 16, 16, api_name="/sample")
        assert summary.startswith("2 images of class b") and len(gallery) == 2
        assert Image.open(gallery[0]["image"]).size == (16, 16)
        with pytest.raises(AppError, match="notes.txt cannot be read as an image"):
            client.predict(handle_file(str(files / "notes.txt")), True, api_name="/reconstruct")
        with pytest.raises(AppError, match="unknown class 'zebra'"):
            client.predict("zebra", 1, 1.0, "constant", 1.0, 0, 1.0, 0, 16, 16, api_name="/sample")
        # a value of the wrong type through the HTTP API: gradio's own message, not "has not enabled verbose
        # error reporting"
        with pytest.raises(AppError, match=r"Expected a `float`, but the value passed .* was: 'two'"):
            client.predict("b", "two", 1.0, "constant", 1.0, 0, 1.0, 5, 16, 16, api_name="/sample")
        # the server still serves
        summary, original, recon, codes, usage = client.predict(handle_file(str(files / "image.png")), True,
                                                                api_name="/reconstruct")
        assert summary.startswith("PSNR") and Image.open(recon).size == (32, 32)
        summary, gallery = client.predict(handle_file(str(files / "image.png")), 2, 0, 0, 2, True, "a", 1.0,
                                          "constant", 1.0, 0, 1.0, 0, api_name="/complete")
        assert [item["caption"] for item in gallery] == ["original", "completion 1", "completion 2"]
        # an upload used as it is keeps more rows than the prior's 4 (the slider once stopped at 4)
        Image.open(files / "image.png").resize((32, 32)).save(tmp_path / "big.png")
        summary, gallery = client.predict(handle_file(str(tmp_path / "big.png")), 6, 0, 0, 1, False, "a", 1.0,
                                          "constant", 1.0, 0, 1.0, 0, api_name="/complete")
        assert summary.startswith("1 completion of class a: first 6 of 8 code rows kept")
    finally:
        demo.close()


def test_the_summary_names_the_class_drawn_not_what_was_typed(handlers):
    """'1' and 'index:1' draw class b (index 1); the summary said 'of class 1' / 'of class index:1'."""
    for typed in ("b", "1", "index:1"):
        _gallery, summary = handlers.sample(typed, 1, seed=0)
        assert summary.startswith("1 image of class b,"), (typed, summary)
    handlers.pipe.classes = []  # classes without names: the index
    _gallery, summary = handlers.sample("index:2", 1, seed=0)
    assert summary.startswith("1 image of class index:2,"), summary


def test_an_image_over_pillows_pixel_limit_is_too_large_not_unreadable(handlers, files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # image.png (16x16) is over twice that: Pillow refuses it
    for fit in (True, False):
        with pytest.raises(ValueError, match=r"image.png is too large to read: Image size \(256 pixels\) exceeds"):
            handlers.complete(str(files / "image.png"), keep_rows=1, num=1, class_name="a", fit=fit)


def test_a_value_of_the_wrong_type_is_shown_as_given(handlers, files):
    with pytest.raises(ValueError, match=r"must be a whole number >= 0, got '2'"):
        handlers.complete(str(files / "image.png"), "2", num=1, class_name="a")
    with pytest.raises(ValueError, match=r"seed must be a whole number, got '7'"):
        handlers.sample("a", 1, seed="7")
