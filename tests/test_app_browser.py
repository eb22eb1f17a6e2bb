"""The app in a real browser: headless Chromium (Debian's, driven by Playwright) uploads the example video, sees the
frame strip and token count, asks a question and watches the answer stream in, then opens the Attention tab and
sees the heatmap. Screenshots of each step go to a temporary folder (and to $VIDLMM_SCREENSHOTS when set); any
console error or uncaught page error fails the test.

Skipped, with the reason, when the `playwright` package or a Chromium binary is missing
(`pip install playwright` and `apt-get install chromium`; Playwright's own browser download is not needed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "moving_shapes.mp4"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("VIDLMM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def app_url(tiny_checkpoints, tmp_path_factory):
    from app import build_app, launch
    from app.config import AppConfig

    from vidlmm.tiny import write_tiny_checkpoint

    models = tmp_path_factory.mktemp("browser-models")
    for name in ("group", "naive"):
        (models / name).symlink_to(tiny_checkpoints[name], target_is_directory=True)
    write_tiny_checkpoint(models / "pool", "pool", seed=6, connector_options={"token_budget": 16})
    port = free_port()
    config = AppConfig(model=str(tiny_checkpoints["group"]), models_dir=str(models), host="127.0.0.1", port=port,
                       preload=False)
    demo, _ = build_app(config)
    launch(demo, config, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def shots(tmp_path):
    """save(name): a full-page screenshot in tmp_path, copied to $VIDLMM_SCREENSHOTS when set."""
    extra = Path(os.environ["VIDLMM_SCREENSHOTS"]) if os.environ.get("VIDLMM_SCREENSHOTS") else None
    if extra:
        extra.mkdir(parents=True, exist_ok=True)

    def save(page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            shutil.copy2(path, extra / path.name)
        return path

    return save


# Records every text the last assistant message shows, so the test can see the answer arrive in pieces.
_WATCH_ANSWER = """() => {
  window.__answers = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.message.bot, [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const seen = window.__answers;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


@contextlib.contextmanager
def _app_page(url: str):
    """A headless Chromium page on the app, loaded; fails the test on any console error or page error."""
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error"
                    else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(url)
            page.wait_for_selector("#video-upload input[type=file]", state="attached", timeout=30_000)
            yield page
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def test_upload_ask_stream_and_attention_in_chromium(app_url, shots):
    with _app_page(app_url) as page:
        shots(page, "0-loaded")

        page.set_input_files("#video-upload input[type=file]", str(EXAMPLE))
        page.wait_for_selector("#frame-strip img", timeout=60_000)
        page.wait_for_function("document.querySelector('#token-count').innerText.includes('visual tokens')",
                               timeout=60_000)
        strip = page.locator("#frame-strip img").count()
        count_text = page.inner_text("#token-count")
        assert strip >= 8, strip
        assert "16 frames" in count_text and "64 visual tokens" in count_text, count_text
        shots(page, "1-uploaded")

        page.evaluate(_WATCH_ANSWER)
        page.fill("#question textarea", "What happens in the video?")
        page.click("#send")
        page.wait_for_function("document.querySelector('#timings').innerText.includes('tokens/s')",
                               timeout=60_000)
        answers = page.evaluate("window.__answers")
        chat = page.inner_text("#chatbot")
        assert "What happens in the video?" in chat
        assert answers and answers[-1] in chat, (answers, chat)
        assert len(answers) >= 2, f"the answer arrived in one piece, not streamed: {answers}"
        print(f"answer seen growing in {len(answers)} steps: {[len(a) for a in answers]} characters")
        assert "visual tokens" in page.inner_text("#timings")
        shots(page, "2-answered")

        page.get_by_role("tab", name="Attention").click()
        page.click("#attend")
        page.wait_for_function("(() => { const i = document.querySelector('#heatmap img');"
                               " return i && i.complete && i.naturalWidth > 100; })()", timeout=60_000)
        shots(page, "3-attention")

        page.get_by_role("tab", name="Where the LLM looks").click()
        page.click("#trace")
        page.wait_for_function("(() => { const i = document.querySelector('#llm-frames img');"
                               " return i && i.complete && i.naturalWidth > 100; })()", timeout=60_000)
        page.click("#llm-word input")
        page.get_by_role("option").nth(1).click()  # the answer's first word
        page.wait_for_function("document.querySelector('#llm-word input').value.startsWith('0:')", timeout=30_000)
        shots(page, "3b-llm-attention")


def test_resampler_switch_to_a_compressor_shows_its_picture(app_url, shots):
    """Choosing a compressor in the resampler switch loads its checkpoint and turns the Attention tab into the
    compressor's picture; choosing one with no checkpoint says so and keeps the model."""
    with _app_page(app_url) as page:
        page.wait_for_function("document.querySelector('#model-status').innerText.includes('groupresampler')",
                               timeout=60_000)
        page.set_input_files("#video-upload input[type=file]", str(EXAMPLE))
        page.wait_for_selector("#frame-strip img", timeout=60_000)

        page.get_by_label("Dynamic-VLM pooling").check()
        page.wait_for_function("document.querySelector('#model-status').innerText.includes('connector pool')",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#token-count').innerText.includes('(pool)')",
                               timeout=60_000)
        page.get_by_role("tab", name="Attention").click()
        assert page.locator("#show-picture").is_visible() and not page.locator("#attend").is_visible()
        page.click("#show-picture")
        page.wait_for_function("(() => { const i = document.querySelector('#picture img');"
                               " return i && i.complete && i.naturalWidth > 100; })()", timeout=60_000)
        shots(page, "4-pool-picture")

        # click, not check(): the app turns the radio back to pool at once, and check() fails when it sees that
        page.get_by_label("ToMe merging (reimplementation)").click()
        page.wait_for_selector("text=No installed checkpoint uses ToMe merging", timeout=30_000)
        page.wait_for_function("(() => { const r = document.querySelector("
                               "'input[type=radio][value=pool]'); return r && r.checked; })()", timeout=30_000)
        assert "connector pool" in page.inner_text("#model-status")
        shots(page, "5-no-tome")
