"""Screenshot of `vqgpt app` in a real browser: headless Chromium loads the page, runs one sampling, saves a PNG.

    python benchmarks/app_screenshot.py --out app.png [--pipeline DIR]

Without --pipeline a small MNIST pipeline is trained first (the quick demo's configs, fewer steps;
a few minutes on a CPU). Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: NUL-separated JSON on file descriptors 3 and 4), so nothing beyond the
standard library and the browser is needed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]


class DevTools:
    """A Chromium started with --remote-debugging-pipe; ``call`` sends one command and waits for its reply."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: move our ends above them first.
        self._in_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        self._out_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:
            os.dup2(self._in_r, 3)
            os.dup2(self._out_w, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self._in_r)
        os.close(self._out_w)
        self._write = os.fdopen(to_chrome_w, "wb", buffering=0)
        self._read = os.fdopen(from_chrome_r, "rb", buffering=0)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = self._read.read(65536)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._write.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def evaluate(tools: DevTools, session: str, expression: str) -> object:
    """Run JavaScript in the page; its value."""
    result = tools.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in result:
        raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
    return result["result"].get("value")


def wait_for(tools: DevTools, session: str, expression: str, what: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = evaluate(tools, session, expression)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


SAMPLES_SHOWN = """(() => {
  const images = [...document.querySelectorAll('#samples img')];
  return images.length >= %d && images.every(img => img.complete && img.naturalWidth > 0) ? images.length : 0;
})()"""

# the number box beside a slider, found by the slider's label
SET_NUMBER = """(() => {
  const label = [...document.querySelectorAll('label, span')].find(e => e.textContent.trim() === %s);
  const block = label && label.closest('.block');
  const input = block && block.querySelector('input[type=number]');
  if (!input) return false;
  input.value = %s;
  for (const kind of ['input', 'change', 'blur']) input.dispatchEvent(new Event(kind, {bubbles: true}));
  return true;
})()"""

SAMPLING_SETTINGS = ("[...document.querySelectorAll('button, .label-wrap')]"
                     ".find(e => e.textContent.trim().startsWith('sampling settings'))")


def click(tools: DevTools, session: str, element: str) -> None:
    """A real mouse click (press + release) at the centre of the element that JavaScript ``element`` finds."""
    center = evaluate(tools, session, f"(() => {{ const e = {element}; if (!e) return null; e.scrollIntoView(); "
                                      "const r = e.getBoundingClientRect(); "
                                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    if not center:
        raise RuntimeError(f"nothing on the page matches {element}")
    for kind in ("mousePressed", "mouseReleased"):
        tools.call("Input.dispatchMouseEvent", session, type=kind, x=center[0], y=center[1], button="left",
                   clickCount=1)


def screenshot(url: str, out: Path, binary: str, num: int, cfg_scale: float, width: int = 1280,
               height: int = 900, timeout: float = 120) -> dict:
    """Open ``url``, set the number of images and the CFG scale, click Sample, wait for the images; save the page."""
    with tempfile.TemporaryDirectory(prefix="vqgpt-chromium-") as profile:
        tools = DevTools(binary, Path(profile))
        try:
            target = tools.call("Target.createTarget", url="about:blank")["targetId"]
            session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            tools.call("Page.enable", session)
            tools.call("Runtime.enable", session)
            tools.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                       deviceScaleFactor=1, mobile=False)
            tools.call("Page.navigate", session, url=url)
            wait_for(tools, session, "document.readyState === 'complete' && !!document.querySelector('#sample-button')",
                     "the page", timeout)
            evaluate(tools, session, SET_NUMBER % (json.dumps("number of images"), num))
            if cfg_scale != 1.0:
                click(tools, session, SAMPLING_SETTINGS)
                wait_for(tools, session, SET_NUMBER % (json.dumps("CFG scale (1 = off)"), cfg_scale),
                         "the CFG scale box", timeout)
            time.sleep(0.5)
            start = time.monotonic()
            click(tools, session, "document.querySelector('#sample-button')")
            shown = wait_for(tools, session, SAMPLES_SHOWN % num, f"{num} sampled images", timeout)
            seconds = time.monotonic() - start
            time.sleep(0.5)  # let the last image paint
            summary = evaluate(tools, session, "[...document.querySelectorAll('.prose p')].map(p => p.textContent)"
                                               ".find(t => t.includes(' px (')) || ''")
            evaluate(tools, session, "window.scrollTo(0, 0)")
            page_height = evaluate(tools, session, "document.documentElement.scrollHeight")
            tools.call("Emulation.setDeviceMetricsOverride", session, width=width, height=int(page_height),
                       deviceScaleFactor=1, mobile=False)  # the whole page in one picture
            time.sleep(0.5)
            shot = tools.call("Page.captureScreenshot", session, format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            return {"images_shown": shown, "seconds_to_images": round(seconds, 1), "summary": summary,
                    "cfg_scale": cfg_scale}
        finally:
            tools.close()


def train_small_pipeline(out: Path, tokenizer_steps: int, prior_steps: int) -> Path:
    """A small MNIST pipeline: the quick demo's configs with ``*_steps`` steps (fp32 where bf16 is slow)."""
    import torch

    from vqgpt.cli.demo import demo_prior_config, demo_tokenizer_config
    from stage1_vq.train import train_tokenizer
    from vqgpt.training import cpu_has_fast_bf16
    from vqgpt.workflow.chain import train_prior_with_tokenizer
    from vqgpt.workflow.encode import encode_dataset

    tok_cfg, prior_cfg = demo_tokenizer_config(quick=True), demo_prior_config(quick=True)
    precision = "bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "no"
    tok_cfg = replace(tok_cfg, train=replace(tok_cfg.train, steps=tokenizer_steps, mixed_precision=precision))
    prior_cfg = replace(prior_cfg, train=replace(prior_cfg.train, steps=prior_steps, mixed_precision=precision))
    # resume="auto": a second call with the same --work continues (or reuses) what the first one trained
    tokenizer_dir = train_tokenizer(tok_cfg, out / "tokenizer_run", resume="auto")
    tokens = encode_dataset(tokenizer_dir, tok_cfg.data, out / "tokens")
    return train_prior_with_tokenizer(replace(prior_cfg, tokens=str(tokens)), out / "prior_run", tokenizer_dir,
                                      resume="auto", pipeline_dir=out / "pipeline")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="app-screenshot.png", help="PNG to write")
    parser.add_argument("--pipeline", default=None, help="pipeline folder or Hub id (default: train a small one)")
    parser.add_argument("--work", default=None, help="folder for the trained pipeline (default: a temporary one)")
    parser.add_argument("--tokenizer-steps", type=int, default=200)
    parser.add_argument("--prior-steps", type=int, default=300)
    parser.add_argument("--num", type=int, default=8, help="images to sample in the page")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="set in the page's sampling settings")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium PATH",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="vqgpt-app-shot-") as tmp:
        pipeline = args.pipeline
        if pipeline is None:
            work = Path(args.work or tmp)
            t = time.perf_counter()
            pipeline = str(train_small_pipeline(work, args.tokenizer_steps, args.prior_steps))
            print(f"trained {pipeline} in {time.perf_counter() - t:.0f} s", flush=True)
        from vqgpt.cli.app import launch

        port = _free_port()
        demo = launch(pipeline, port=port, block=False)
        try:
            report = screenshot(f"http://127.0.0.1:{port}/", Path(args.out), args.chromium, args.num, args.cfg_scale)
        finally:
            demo.close()
    print(json.dumps({"screenshot": args.out, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
