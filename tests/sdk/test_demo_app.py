"""The Gradio demo app in headless Chromium: upload an image (or, to a Whisper model, an audio
clip), send a message, see a reply; the send handler in process on a tiny Whisper equals the
LLM's transcript."""

from __future__ import annotations

import asyncio
import contextlib
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

from polymodal.demo_app import build_messages, build_prompt, make_respond
from polymodal.processors.qwen_vl import QwenVLProcessor
from polymodal.processors.whisper import WhisperProcessor
from tests.helpers import tiny_checkpoint
from tests.processors.audio_signals import chirp, encode

pytestmark = pytest.mark.timeout(300)

QUESTION = "What color is this square?"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def test_build_messages_attaches_media_to_the_first_user_turn():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages = build_messages(history, "c", "img.png", None)
    assert messages[0]["content"][0] == {"type": "image", "image": "img.png"}
    assert messages[1]["content"] == "b" and messages[2]["content"] == "c"
    assert build_messages([], "hi", None, None) == [{"role": "user", "content": "hi"}]
    with_audio = build_messages(history, "c", None, None, "a.wav")
    assert with_audio[0]["content"][0] == {"type": "audio", "audio": "a.wav"}


def test_a_speech_model_gets_the_clip_alone_with_its_options():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    media = {"image": None, "video": None, "audio": "a.wav"}
    prompt = build_prompt(history, "", media, {"language": "en", "task": "translate"})
    assert prompt == {
        "messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
        "language": "en",
        "task": "translate",
    }
    chat = build_prompt(history, "c", media)  # a chat model keeps the history
    assert len(chat["messages"]) == 3 and chat["messages"][0]["content"][0]["type"] == "audio"


def write_clip(folder) -> Path:
    clip = folder / "chirp.wav"
    clip.write_bytes(encode(chirp(2.0, 16_000), 16_000, "wav"))
    return clip


def test_respond_transcribes_audio_as_the_llm_does(tmp_path_factory, tmp_path):
    from polymodal import LLM, SamplingParams
    from polymodal.async_engine import AsyncEngine

    ckpt = tiny_checkpoint(tmp_path_factory, "whisper")
    llm = LLM(str(ckpt), num_kv_blocks=64)
    engine = AsyncEngine(llm)
    clip = write_clip(tmp_path)
    assert "task" in engine.model_info["media_options"]
    respond = make_respond(engine, speech_model=True)

    async def send(audio, language):
        updates = respond("", [], None, None, audio, language, "transcribe", 0.0, 1.0, 6)
        return [update async for update in updates][-1]

    try:
        history, chat, _, status = asyncio.run(send(str(clip), "en"))
        assert "(done)" in status
        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=6)
        content = [{"type": "audio", "audio": str(clip)}]
        prompt = {"messages": [{"role": "user", "content": content}], "language": "en"}
        expected = llm.generate(prompt, params.with_defaults(llm.default_sampling))[0]
        assert chat[-1] == {"role": "assistant", "content": expected.outputs[0].text}
        assert chat[-2]["content"] == "(transcribe the audio)"
        *_, status = asyncio.run(send(None, "en"))
        assert status == "Record or upload audio first."
        *_, status = asyncio.run(send(str(clip), "klingon"))  # the processor's error, shown
        assert status.startswith("Error:") and "klingon" in status
    finally:
        engine.close()


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


@contextlib.contextmanager
def running_demo(ckpt, tmp_path):
    """`polymodal demo CKPT` as a process; yields its URL once it answers."""
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
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()


@contextlib.contextmanager
def browser():
    driver, user_dir = _browser()
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(user_dir, ignore_errors=True)


def test_demo_app_in_headless_chromium(tmp_path_factory, tmp_path):
    pytest.importorskip("gradio")
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    ARTIFACTS.mkdir(exist_ok=True)
    image = tmp_path / "red_square.png"
    Image.new("RGB", (64, 48), (220, 20, 40)).save(image)
    with running_demo(ckpt, tmp_path) as url, browser() as driver:
        text_only = QwenVLProcessor.from_pretrained(ckpt).process(
            messages=[{"role": "user", "content": QUESTION}]
        )
        _drive(driver, url, image, len(text_only.token_ids))


def test_demo_app_transcribes_an_uploaded_clip_in_headless_chromium(tmp_path_factory, tmp_path):
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = tiny_checkpoint(tmp_path_factory, "whisper")
    ARTIFACTS.mkdir(exist_ok=True)
    clip = write_clip(tmp_path)
    with running_demo(ckpt, tmp_path) as url, browser() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        upload = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#pm-audio input[type=file]"))
        )
        assert not driver.find_elements(By.CSS_SELECTOR, "#pm-image input[type=file]")
        upload.send_keys(str(clip))
        language = wait.until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, "#pm-language textarea"))
        )
        language.send_keys("en")
        time.sleep(1.0)  # the upload finishes before the click reads the component
        driver.find_element(By.CSS_SELECTOR, "#pm-send").click()
        wait.until(lambda d: "(done)" in d.find_element(By.ID, "pm-status").text)
        status = driver.find_element(By.ID, "pm-status").text
        driver.save_screenshot(str(ARTIFACTS / "demo_app_audio.png"))
        assert "(transcribe the audio)" in driver.find_element(By.ID, "pm-chat").text
        assert int(re.search(r"(\d+) generated", status).group(1)) >= 1
        # the typed language reached the processor: <|startoftranscript|> <|en|> ...
        forced = WhisperProcessor.from_pretrained(ckpt).prompt_ids("en")
        assert int(re.search(r"(\d+) prompt tokens", status).group(1)) == len(forced)


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
