"""The web playground (server/static, served at /) over a live server on the shipped model, its Medusa heads and
its example adapters. The page's files and the stream's `gorgon` field are checked over HTTP; the page itself in
a real browser: Debian's chromium, driven by Playwright (tests marked `browser`, skipped with the reason when
either is missing; `.ci/browser` installs both and runs them). Screenshots go to $GORGON_SCREENSHOTS (default: a
temporary folder)."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from engine import LLM, SamplingParams
from models import DEFAULT_MODEL_DIR
from server.app import ServerConfig, create_app

MODEL = "gorgon-default"
CHROMIUM = os.environ.get("GORGON_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
TIMEOUT_MS = 60_000  # a shared 2-core machine: generous


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright, or run .ci/browser)"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or run .ci/browser; or set GORGON_CHROMIUM)"
    return None


MISSING = browser_missing()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"browser test: {MISSING}")


# ---- the server --------------------------------------------------------------------------------------------

@contextmanager
def serving(llm: LLM):
    """A live server of `llm` in this process (uvicorn in a thread) on a free port of 127.0.0.1."""
    app = create_app(llm, ServerConfig(model_name=MODEL, model_root=str(DEFAULT_MODEL_DIR)))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="playground-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app, llm=llm)
    finally:
        uv.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server():
    """The shipped model with its Medusa heads."""
    with serving(LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"), max_num_seqs=4)) as running:
        yield running


@pytest.fixture(scope="module")
def plain_server():
    """The shipped model without heads (`gorgon serve --medusa none`): every step adds one token."""
    with serving(LLM(max_num_seqs=2)) as running:
        yield running


@pytest.fixture
def api_key(server):
    """Turns on the server's API key (as `gorgon serve --api-key` does) for one test."""
    config = server.app.state.server.config
    config.api_key = "sesame"
    yield config.api_key
    config.api_key = None


@pytest.fixture
def reasoning_parser(server):
    """Turns on `gorgon serve --reasoning-parser deepseek_r1` for one test: an answer is reasoning up to `</think>`
    (the shipped model never writes one: all of it)."""
    config = server.app.state.server.config
    config.reasoning_parser = "deepseek_r1"
    yield
    config.reasoning_parser = None


def metric(server, name: str, **labels: str) -> float:
    """A metric's value from /metrics, summed over the series whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if match and match.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
    return total


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


# ---- over HTTP: the page's files, the stream's extension field ------------------------------------------

def test_the_page_and_its_files_are_served(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/playground.js"' in page.text and 'href="static/playground.css"' in page.text  # relative
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere: it works offline
    for name, media_type in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
        response = httpx.get(f"{server.url}/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert "http://" not in response.text and "https://" not in response.text
    for bad in ["nope.js", "..%2Fapp.py", "%2E%2E%2Fplayground.py", ".hidden.js", "index.py"]:
        response = httpx.get(f"{server.url}/static/{bad}")
        assert response.status_code == 404 and "error" in response.json(), bad


def test_the_page_is_public_and_the_api_asks_for_the_key(server, api_key):
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/static/playground.js").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_carry_the_step_that_made_them(server, route):
    body = {"model": MODEL, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    body |= {"prompt": "def fibonacci(n):\n"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": "def fibonacci(n):"}]}
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=120) as response:
        chunks = sse(response)
    steps = [c["gorgon"] for c in chunks if "gorgon" in c]
    assert steps and all(c["choices"] for c in chunks if "gorgon" in c)
    assert all(len(step["tokens"]) == step["step_tokens"] for step in steps)
    assert sum(step["step_tokens"] for step in steps) == chunks[-1]["usage"]["completion_tokens"] == 48
    assert max(step["step_tokens"] for step in steps) > 1  # the shipped heads get drafts accepted
    text = [c["choices"][0]["text"] if route == "/v1/completions" else c["choices"][0]["delta"]["content"]
            for c in chunks if "gorgon" in c]
    assert "".join(text) == "".join(token for step in steps for token in step["tokens"])
    whole = httpx.post(f"{server.url}{route}", json={**body, "stream": False}, timeout=120).json()
    assert "gorgon" not in whole  # on streamed chunks only


def test_llm_stream_gives_the_same_steps(server):
    """The stream's steps are the engine's: LLM.stream yields one RequestOutput per step, as many tokens each."""
    prompt = 'def read_file(path):\n    """Read a file."""\n'
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        served = [c["gorgon"]["step_tokens"] for c in sse(response)]
    llm = LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"), max_num_seqs=4)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert [len(out.new_token_ids) for out in llm.stream(prompt, params)] == served


def test_head_and_favicon_answer_without_an_error(server):
    head = httpx.head(f"{server.url}/")  # uptime checkers
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content
    assert httpx.get(f"{server.url}/favicon.ico").status_code == 204  # asked for on every page load


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_the_last_chunk_carries_the_engines_timings(server, route):
    body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    body |= {"prompt": "def fibonacci(n):\n"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": "def fibonacci(n):"}]}
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=120) as response:
        steps = [c["gorgon"] for c in sse(response) if "gorgon" in c]
    assert all("timings" not in step for step in steps[:-1])
    timings = steps[-1]["timings"]
    assert timings["predicted_n"] == 40 - steps[0]["step_tokens"]  # the tokens after the first step
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0
    assert timings["predicted_per_second"] == pytest.approx(1000 * timings["predicted_n"] / timings["predicted_ms"])


def test_the_model_cards_say_whether_the_server_speculates(server, plain_server):
    assert [card["speculative"] for card in httpx.get(f"{server.url}/v1/models").json()["data"]] == [True]
    assert [card["speculative"] for card in httpx.get(f"{plain_server.url}/v1/models").json()["data"]] == [False]


# ---- in a browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ["GORGON_SCREENSHOTS"]) if os.environ.get("GORGON_SCREENSHOTS") else \
        tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, screenshots, request):
    """The playground, loaded; a screenshot of it when the test ends, and no script errors allowed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    yield page
    page.screenshot(path=str(screenshots / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, errors


def set_fields(page, **fields) -> None:
    """Sampling fields by id (max_tokens -> #max-tokens); booleans tick checkboxes."""
    for name, value in fields.items():
        selector = "#" + name.replace("_", "-")
        if isinstance(value, bool):
            page.set_checked(selector, value)
        else:
            page.fill(selector, str(value))


def pane(page, i: int):
    return page.locator("#panes .pane").nth(i)


def wait_until_ended(page, count: int = 1) -> None:
    for i in range(count):
        page.wait_for_function("el => ['done', 'stopped', 'error'].includes(el.dataset.state)",
                               arg=pane(page, i).element_handle())


def answer_text(page, i: int) -> str:
    """The answer's text in pane i: its last block, without the prompt."""
    return pane(page, i).locator(".transcript .block").last.evaluate(
        "b => [...b.querySelectorAll('.step')].map(s => s.textContent).join('')")


@pytest.mark.browser
@needs_browser
@pytest.mark.parametrize("width", [1280, 420], ids=["wide", "narrow"])
def test_the_page_loads(page, width):
    page.set_viewport_size({"width": width, "height": 900})
    assert page.title() == "gorgon playground"
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model option").first.get_attribute("value") == MODEL
    assert page.locator("#error").is_hidden()
    page.wait_for_function("document.querySelector('[data-value=kv]').textContent.endsWith('%')")  # metrics strip
    assert page.locator("#prompt").is_visible() and page.locator("#send").is_visible()
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")  # adds a line, sends nothing
    page.keyboard.type("second line")
    assert page.input_value("#prompt") == "first line\nsecond line"
    assert pane(page, 0).get_attribute("data-state") == "idle"
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a {width}px window"


STOP_AFTER_3_STEPS = """() => {
    const observer = new MutationObserver(() => {
        if (document.querySelectorAll("#panes .step").length < 3) return;
        observer.disconnect();
        window.stateAtStop = document.querySelector("#panes .pane").dataset.state;
        document.querySelector("#stop").click();
    });
    observer.observe(document.querySelector("#panes"), {childList: true, subtree: true});
}"""


@pytest.mark.browser
@needs_browser
def test_a_chat_streams_and_stop_aborts_it_on_the_server(page, server):
    aborted = metric(server, "gorgon_requests_total", finish_reason="abort")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.check("input[name=mode][value=chat]")
    set_fields(page, max_tokens=480, ignore_eos=True, use_medusa=False, temperature=0.8, seed=1)
    page.fill("#prompt", "Write a long Python module.")
    page.evaluate(STOP_AFTER_3_STEPS)  # clicks Stop in the page itself, however fast the tokens come
    page.press("#prompt", "Enter")  # Enter sends
    page.wait_for_function("window.stateAtStop !== undefined")
    assert page.evaluate("window.stateAtStop") == "streaming"
    assert pane(page, 0).locator(".block.user").text_content() == "Write a long Python module."
    wait_until_ended(page)
    assert pane(page, 0).get_attribute("data-state") == "stopped"
    tokens = page.evaluate("[...document.querySelectorAll('#panes .step')].reduce((n, s) => n + +s.dataset.tokens, 0)")
    assert 3 <= tokens < 480
    deadline = time.monotonic() + 30  # the server sees the connection close and aborts the request
    while metric(server, "gorgon_requests_total", finish_reason="abort") == aborted:
        assert time.monotonic() < deadline, "the server never aborted the request"
        time.sleep(0.1)
    assert metric(server, "gorgon_requests_running") == 0 and server.llm.stats().num_running == 0
    assert metric(server, "gorgon_kv_cache_usage") < 1.0
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()


@pytest.mark.browser
@needs_browser
def test_the_speculation_view_shows_medusa_steps_side_by_side_with_plain_decoding(page, server):
    page.select_option("#compare", "medusa")  # in completion mode, the page's default
    set_fields(page, max_tokens=64, temperature=0, ignore_eos=True)
    page.fill("#prompt", 'def read_file(path):\n    """Read a file."""\n')
    page.click("#send")
    wait_until_ended(page, 2)
    assert [pane(page, i).get_attribute("data-state") for i in range(2)] == ["done", "done"]
    medusa, plain = pane(page, 0), pane(page, 1)
    assert medusa.locator(".step.multi").count() >= 1  # a step that added several tokens
    assert medusa.locator(".tok.draft").count() >= 1 and medusa.locator(".tok.verify").count() >= 1
    assert plain.locator(".step.multi").count() == 0 and plain.locator(".step").count() == 64
    assert medusa.locator(".step").count() < 64
    assert answer_text(page, 0) == answer_text(page, 1)  # greedy Medusa is lossless
    for p in (medusa, plain):
        assert re.fullmatch(r"[\d.]+", p.locator("[data-stat=tps]").text_content())
        assert p.locator("[data-stat=ttft]").text_content().endswith("ms")
        assert p.locator("[data-stat=steps]").text_content().startswith("64 / ")


@pytest.mark.browser
@needs_browser
def test_adapters_load_switch_the_output_and_unload(page, server):
    message = page.locator("#adapter-message")
    page.fill("#adapter-name", "licenses")
    page.fill("#adapter-path", "no-such-adapter")
    page.click("#load-adapter button")
    page.wait_for_function("document.querySelector('#adapter-message').dataset.state === 'error'")
    assert message.text_content().startswith("404 not_found_error")  # the server's error, as it sent it
    page.fill("#adapter-path", "licenses-lora")
    page.click("#load-adapter button")
    page.wait_for_function("document.querySelector('#adapter-message').dataset.state === 'ok'")
    assert "licenses" in message.text_content()
    page.wait_for_function("[...document.querySelectorAll('#model-b option')].some(o => o.value === 'licenses')")

    page.check("input[name=mode][value=completion]")
    page.select_option("#compare", "model")
    page.select_option("#model-b", "licenses")
    set_fields(page, max_tokens=24, temperature=0, ignore_eos=True)
    page.fill("#prompt", "This License applies to")
    page.press("#prompt", "Enter")
    wait_until_ended(page, 2)
    base, adapted = answer_text(page, 0), answer_text(page, 1)
    assert base and adapted and base != adapted
    assert "licenses" in pane(page, 1).locator(".pane-title").text_content()

    page.click("#adapter-list button")  # unload
    page.wait_for_function("document.querySelector('#adapter-list').textContent.includes('none loaded')")
    assert "removed" in message.text_content()
    assert all(a["name"] != "licenses" for a in server.llm.list_adapters())


@pytest.mark.browser
@needs_browser
def test_api_key_mode_shows_the_auth_error(page, server, api_key):
    page.reload()
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "401" in error.text_content() and "API key" in error.text_content()
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    page.fill("#prompt", "hello")
    page.click("#send")
    wait_until_ended(page)
    assert pane(page, 0).get_attribute("data-state") == "error"
    assert "invalid or missing API key" in pane(page, 0).locator(".block.failure").text_content()
    page.fill("#api-key", api_key)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    error.wait_for(state="hidden")
    assert pane(page, 0).locator(".pane-title").text_content().startswith(MODEL)


def fields_sent(page, route: str = "**/v1/completions") -> dict:
    """The body of the request that the next send makes on `route` (answered with an error: not run)."""
    bodies: list[dict] = []

    def capture(r):
        bodies.append(r.request.post_data_json)
        r.fulfill(status=503, json={"error": {"message": "not run", "type": "service_unavailable"}})

    page.route(route, capture)
    page.click("#send")
    wait_until_ended(page)
    page.unroute(route)
    (body,) = bodies
    return body


@pytest.mark.browser
@needs_browser
def test_the_page_works_under_a_path_prefix(page, server):
    """As behind nginx's `location /gorgon/ { proxy_pass http://127.0.0.1:PORT/; }`: nothing outside the prefix."""

    def proxy(route):
        url = urlsplit(route.request.url)
        if not url.path.startswith("/gorgon/"):
            route.fulfill(status=404, body="outside the prefix")
            return
        upstream = server.url + url.path.removeprefix("/gorgon") + (f"?{url.query}" if url.query else "")
        route.fulfill(response=route.fetch(url=upstream))

    page.route("**/*", proxy)
    page.goto(server.url + "/gorgon/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.wait_for_function("document.querySelector('[data-value=kv]').textContent.endsWith('%')")
    set_fields(page, max_tokens=12, temperature=0, ignore_eos=True)
    page.fill("#prompt", "def add(a, b):")
    page.click("#send")
    wait_until_ended(page)
    assert pane(page, 0).get_attribute("data-state") == "done"
    assert pane(page, 0).locator("[data-stat=steps]").text_content().startswith("12 / ")
    assert page.locator("#error").is_hidden()


@pytest.mark.browser
@needs_browser
def test_server_tokens_per_s_is_unknown_after_the_counter_goes_down(page):
    """A restarted server counts its tokens from 0 again: no negative rate."""
    counter = {"tokens": 1000}

    def fake_metrics(route):
        route.fulfill(body=f"gorgon_generation_tokens_total {counter['tokens']}\ngorgon_kv_cache_usage 0.5\n")

    rate = "document.querySelector('[data-value=tps]').textContent"
    page.route("**/metrics", fake_metrics)
    page.reload()
    page.wait_for_function(f"{rate} === '0'")  # a poll after another
    counter["tokens"] = 10  # the restart
    page.wait_for_function(f"{rate} === '–'")
    counter["tokens"] = 20
    page.wait_for_function(f"/^[0-9]+$/.test({rate}) && {rate} !== '0'")


@pytest.mark.browser
@needs_browser
def test_the_page_says_when_the_server_is_unreachable(page):
    status = page.locator("#server-status")
    assert status.is_hidden()
    page.route("**/metrics", lambda route: route.abort())
    status.wait_for(state="visible")
    assert status.text_content() == "server unreachable"
    assert page.locator("[data-value=tps]").text_content() == "–"
    with page.expect_request("**/v1/models"):  # back: its models may have changed meanwhile
        page.unroute("**/metrics")
    status.wait_for(state="hidden")


@pytest.mark.browser
@needs_browser
def test_reasoning_shows_apart_from_the_answer_and_stays_out_of_the_history(page, reasoning_parser):
    page.check("input[name=mode][value=chat]")
    set_fields(page, max_tokens=12, temperature=0, ignore_eos=True)
    page.fill("#prompt", "hello")
    page.click("#send")
    wait_until_ended(page)
    reasoning = pane(page, 0).locator(".reasoning")
    assert reasoning.evaluate("box => box.tagName") == "DETAILS"  # collapsible
    assert reasoning.locator("summary").text_content() == "reasoning"
    thought = reasoning.evaluate("b => [...b.querySelectorAll('.step')].map(s => s.textContent).join('')")
    assert thought and answer_text(page, 0) == ""  # no </think>: all reasoning, no answer
    assert pane(page, 0).locator("[data-stat=steps]").text_content().startswith("12 / ")  # each step counted once
    page.fill("#prompt", "and then?")
    body = fields_sent(page, "**/v1/chat/completions")
    assert body["messages"][:2] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]


@pytest.mark.browser
@needs_browser
def test_a_model_gone_from_the_server_refreshes_the_list(page, server):
    """An adapter unloaded elsewhere (another tab, another client)."""
    load = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": "licenses-lora"})
    assert load.status_code == 200, load.text
    page.reload()
    page.wait_for_function("[...document.querySelectorAll('#model option')].some(o => o.value === 'gone')")
    page.select_option("#model", "gone")
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "gone"}).status_code == 200
    set_fields(page, max_tokens=4)
    page.fill("#prompt", "hello")
    page.click("#send")
    wait_until_ended(page)
    error = page.locator("#error").text_content()
    assert "model_not_found" in error and "model list is refreshed" in error
    assert "gone" not in page.locator("#model option").all_text_contents()


@pytest.mark.browser
@needs_browser
def test_the_pane_shows_the_servers_tokens_per_s(page):
    """Even where the chunks arrive all at once (a buffering proxy), which leave the page nothing to time."""
    bodies: list[str] = []

    def buffered(route):
        response = route.fetch()
        bodies.append(response.text())
        route.fulfill(response=response, body=bodies[-1])

    page.route("**/v1/completions", buffered)
    set_fields(page, max_tokens=32, temperature=0, ignore_eos=True)
    page.fill("#prompt", 'def read_file(path):\n    """Read a file."""\n')
    page.click("#send")
    wait_until_ended(page)
    chunks = [json.loads(line[6:]) for line in bodies[0].splitlines() if line.startswith("data: {")]
    timings = chunks[-1]["gorgon"]["timings"]
    shown = pane(page, 0).locator("[data-stat=tps]").text_content()
    assert float(shown) == pytest.approx(timings["predicted_per_second"], abs=0.051)


@pytest.mark.browser
@needs_browser
def test_a_server_without_heads_offers_no_medusa(page, server, plain_server):
    page.goto(plain_server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#use-medusa").is_disabled() and not page.locator("#use-medusa").is_checked()
    assert "does not speculate" in page.locator("#medusa-row").text_content()
    assert page.locator("#compare option[value=medusa]").is_disabled()
    assert pane(page, 0).locator(".pane-title").text_content() == f"{MODEL} · Medusa off"
    page.goto(server.url + "/")  # one with heads
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#use-medusa").is_enabled() and page.locator("#use-medusa").is_checked()
    assert page.locator("#compare option[value=medusa]").is_enabled()


@pytest.mark.browser
@needs_browser
def test_empty_fields_are_left_out_and_sampling_is_sent_only_when_set(page):
    for field in ("#temperature", "#top-p", "#top-k"):
        assert page.input_value(field) == "" and page.get_attribute(field, "placeholder") == "model default"
    set_fields(page, max_tokens="")
    page.fill("#prompt", "hello")
    body = fields_sent(page)
    assert not {"temperature", "top_p", "top_k", "max_tokens", "seed"} & body.keys()  # the model's defaults apply
    set_fields(page, temperature=0, top_p=0.5, max_tokens=8)
    page.fill("#prompt", "hello")
    assert fields_sent(page) | {"prompt": None} == {**body, "prompt": None, "temperature": 0, "top_p": 0.5,
                                                    "max_tokens": 8}


@pytest.mark.browser
@needs_browser
def test_a_failed_send_gives_the_prompt_back(page):
    page.check("input[name=mode][value=chat]")
    page.fill("#prompt", "hello there")
    body = fields_sent(page, "**/v1/chat/completions")
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert pane(page, 0).get_attribute("data-state") == "error"
    assert page.input_value("#prompt") == "hello there"
    assert pane(page, 0).locator(".block.user").count() == 0  # the unanswered question is gone from the chat
    body = fields_sent(page, "**/v1/chat/completions")  # sent again
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
