"""The Gradio demo app in headless Chromium: upload an image, send a message, see a reply."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from polymodal.demo_app import build_messages
from polymodal.processors.qwen_vl import QwenVLProcessor
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

QUESTION = "What color is this square?"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def test_build_messages_attaches_media_to_the_first_user_turn():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages = build_messages(history, "c", "img.png", None)
    assert messages[0]["content"][0] == {"type": "image", "image": "img.png"}
    assert messages[1]["content"] == "b" and messages[2]["content"] == "c"
    assert build_messages([], "hi", None, None) == [{"role": "user", "content": "hi"}]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's chromium + chromium-driver (apt-get install ...)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    user_dir = ARTIFACTS / f".chromium-profile-{os.getpid()}"
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={user_dir}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options), user_dir


def test_demo_app_in_headless_chromium(tmp_path_factory, tmp_path):
    pytest.importorskip("gradio")
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    ARTIFACTS.mkdir(exist_ok=True)
    image = tmp_path / "red_square.png"
    Image.new("RGB", (64, 48), (220, 20, 40)).save(image)
    port = free_port()
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "polymodal.cli", "demo", str(ckpt), "--port", str(port)]
    log = tmp_path / "demo.log"
    with open(log, "w") as log_file:
        app = subprocess.Popen(cmd + ["--num-kv-blocks", "256"], env=env, stdout=log_file,
                               stderr=subprocess.STDOUT)  # fmt: skip
    driver = user_dir = None
    try:
        import httpx

        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert app.poll() is None, f"demo exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail(f"demo did not start:\n{log.read_text()[-3000:]}")
        driver, user_dir = _browser()
        text_only = QwenVLProcessor.from_pretrained(ckpt).process(
            messages=[{"role": "user", "content": QUESTION}]
        )
        _drive(driver, url, image, len(text_only.token_ids))
    finally:
        if driver is not None:
            driver.quit()
        if user_dir is not None:
            shutil.rmtree(user_dir, ignore_errors=True)
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()


def _drive(driver, url: str, image: Path, text_only_tokens: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(url)
    upload = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#pm-image input[type=file]"))
    )
    upload.send_keys(str(image))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pm-image img")))
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#pm-input textarea")))
    box.send_keys(QUESTION)
    driver.find_element(By.CSS_SELECTOR, "#pm-send").click()
    wait.until(lambda d: "(done)" in d.find_element(By.ID, "pm-status").text)
    status = driver.find_element(By.ID, "pm-status").text
    driver.save_screenshot(str(ARTIFACTS / "demo_app.png"))
    chat = driver.find_element(By.ID, "pm-chat").text
    assert QUESTION in chat
    prompt_tokens = int(re.search(r"(\d+) prompt tokens", status).group(1))
    assert prompt_tokens > text_only_tokens  # the image's slot tokens are in the prompt
    generated = int(re.search(r"(\d+) generated", status).group(1))
    assert generated >= 1
