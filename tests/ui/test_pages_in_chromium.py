"""The playground and the dashboard in a real headless Chromium, against a real server.

One browser and one `lamina serve` (with an API key, so every page goes through the key
flow) for the module; nginx serves the same server under /lamina/ for the prefix test.
Screenshots of both pages at desktop and phone widths land in artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.tool_schemas import WEATHER
from tests.ui.conftest import API_KEY, Lamina

pytestmark = [pytest.mark.system, pytest.mark.slow]

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MODEL_SHOWN = "() => document.getElementById('model-name').textContent.includes('smollm2')"
ANSWER = "#messages .message.assistant"  # the chat's answers (not the completion's)


@pytest.fixture(scope="module")
def keyed_context(browser):
    """A browser context whose tabs already hold the key (as after the key flow)."""
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(f"sessionStorage.setItem('lamina.apiKey', '{API_KEY}')")
    yield context
    context.close()


@pytest.fixture
def page(keyed_context):
    """A fresh tab that records console errors and uncaught exceptions in `.problems`."""
    tab = keyed_context.new_page()
    problems: list[str] = []
    tab.on("console", lambda message: message.type == "error" and problems.append(message.text))
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.problems = problems
    yield tab
    tab.close()


def until(page, condition: str) -> None:
    """Wait until the JavaScript `condition` holds in the page (a function, not a string
    to evaluate: the pages' Content-Security-Policy forbids eval)."""
    page.wait_for_function("() => " + condition)


def text_of(element_id: str) -> str:
    """The JavaScript expression of an element's text."""
    return f"document.getElementById('{element_id}').textContent"


READY = text_of("phase") + " === 'ready'"


def open_playground(page, base: str) -> None:
    page.goto(base + "/")
    page.wait_for_function(MODEL_SHOWN)


def set_params(page, **values: object) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


# How long an answer may take: up to 200 tokens from a server on 2 shared cores. A bound
# against a hang, not a speed check: 60 s was once too short on a machine with three
# CPU-heavy processes besides the server.
ANSWER_TIMEOUT_MS = 180_000


def chat(page, text: str) -> str:
    """Send `text`, wait for the answer's stats line; the answer's text."""
    page.fill("#user-input", text)
    page.click("#send")
    answer = page.locator(ANSWER).last
    answer.locator(".stats").wait_for(timeout=ANSWER_TIMEOUT_MS)
    return answer.locator(".content").inner_text()


def test_api_key_flow(browser, lamina: Lamina) -> None:
    context = browser.new_context(viewport=DESKTOP)  # holds no key
    try:
        tab = context.new_page()
        tab.goto(lamina.url + "/dashboard")  # dismissing the prompt stops the polling
        tab.locator("#key-dialog").wait_for(state="visible")
        tab.keyboard.press("Escape")
        until(tab, text_of("phase") + " === 'needs an API key'")
        time.sleep(1.5)  # more than a poll's interval
        assert not tab.locator("#key-dialog").is_visible()
        tab.goto(lamina.url + "/")
        dialog = tab.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert "needs an API key" in tab.inner_text("#key-message")
        tab.fill("#key-input", "wrong-key")
        tab.click("#key-submit")
        until(tab, text_of("key-message") + ".includes('refused')")
        assert dialog.is_visible()
        tab.fill("#key-input", API_KEY)
        tab.click("#key-submit")
        tab.wait_for_function(MODEL_SHOWN)
        assert not dialog.is_visible()
        assert tab.evaluate("sessionStorage.getItem('lamina.apiKey')") == API_KEY
        assert tab.evaluate("localStorage.length") == 0  # kept in this tab only
        tab.goto(lamina.url + "/dashboard")  # same tab: the key is still there
        until(tab, READY)
        assert not tab.locator("#key-dialog").is_visible()
    finally:
        context.close()


def test_pages_load_without_console_errors(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    page.goto(lamina.url + "/dashboard")
    until(page, READY)
    until(page, "document.querySelectorAll('#facts tr').length > 10")
    assert page.problems == []


def test_chat_streams_token_by_token_with_logprobs(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=0, max_tokens=24)
    page.check("#logprobs")
    # Every change to the answer's text, with its time: a stream shows many.
    page.evaluate("""() => {
        window.updates = [];
        new MutationObserver(() => {
            const answer = document.querySelector('#messages .message.assistant .content');
            if (answer) window.updates.push([performance.now(), answer.textContent.length]);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    }""")
    text = chat(page, "What is the capital of France?")
    assert "Paris" in text
    updates = page.evaluate("window.updates")
    lengths = [length for _, length in updates]
    assert lengths == sorted(lengths) and len(set(lengths)) >= 5, lengths
    assert updates[-1][0] - updates[0][0] > 0  # spread over time, not one write
    stats = page.locator(f"{ANSWER} .stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats and "cached prompt tokens" in stats, stats
    assert "finish: length" in stats or "finish: stop" in stats, stats
    token = page.locator(f"{ANSWER} .tok.has-logprob").first
    assert "logprob" in token.get_attribute("title")
    token.hover()
    assert page.problems == []


def test_seed_makes_answers_reproducible_and_regenerate_repeats(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=1, max_tokens=12, seed=4321)
    prompt = "Write one sentence about a cat."
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        first = chat(page, prompt)
    body = json.loads(sent.value.post_data)
    assert (body["seed"], body["temperature"], body["max_tokens"]) == (4321, 1, 12)
    assert body["messages"] == [{"role": "user", "content": prompt}]
    page.click("#regenerate")  # the same request again: the same seed, the same answer
    until(page, f"document.querySelectorAll('{ANSWER} .stats').length === 1")
    page.locator(f"{ANSWER} .stats").wait_for()
    assert page.locator(ANSWER).count() == 1
    assert page.locator(f"{ANSWER} .content").inner_text() == first
    page.click("#clear")
    assert page.locator("#messages .message").count() == 0
    set_params(page, seed=4322)
    assert chat(page, prompt) != first  # the seed is what made them equal


def _sent_body(page, prompt: str) -> tuple[dict, str]:
    """Chat `prompt`; the request body the page sent and the answer's text."""
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        text = chat(page, prompt)
    return json.loads(sent.value.post_data), text


def test_json_schema_and_tools_boxes(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=0, max_tokens=40)
    page.fill("#response-format", "{not json")
    page.fill("#user-input", "Which city is the capital of France?")
    page.click("#send")
    assert "response_format is not valid JSON" in page.inner_text("#error")
    assert page.locator("#messages .message").count() == 0  # nothing was sent
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    page.fill("#response-format", json.dumps(schema))
    body, text = _sent_body(page, "Which city is the capital of France?")
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema},
    }  # fmt: skip
    assert list(json.loads(text)) == ["city"]  # the answer follows the schema
    page.click("#clear")
    page.fill("#response-format", "")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    page.fill("#tools", json.dumps(tools))
    page.select_option("#tool-choice", "required")
    set_params(page, max_tokens=200)  # the calls' markup counts too
    body, _ = _sent_body(page, "What is the weather in Paris?")
    assert (body["tools"], body["tool_choice"]) == (tools, "required")
    calls = page.inner_text(f"{ANSWER} .tool-calls").splitlines()  # one line a call
    assert calls
    for call in calls:
        assert call.startswith("get_weather(") and call.endswith(")"), call
        assert set(json.loads(call.removeprefix("get_weather(")[:-1])) == {"city", "unit"}
    assert "finish: tool_calls" in page.inner_text(f"{ANSWER} .stats")
    page.select_option("#tool-choice", "none")
    set_params(page, max_tokens=4)
    body, _ = _sent_body(page, "Thanks!")  # the calls stay in the conversation
    sent_calls = body["messages"][1]["tool_calls"]
    shown = [f"{c['function']['name']}({c['function']['arguments']})" for c in sent_calls]
    assert shown == calls and page.inner_text("#error") == ""
    assert page.problems == []


def test_stop_aborts_the_request_in_the_engine(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=0, max_tokens=2000)
    page.fill("#user-input", "Count from 1 to 1000, separated by commas.")
    page.click("#send")
    until(page, f"(document.querySelector('{ANSWER} .content')?.textContent.length ?? 0) > 10")
    assert lamina.status()["engine"]["running"] == 1  # still generating when stopped
    page.click("#stop")
    stats = page.locator(f"{ANSWER} .stats")
    stats.wait_for()
    assert "finish: stopped" in stats.inner_text()
    deadline = time.monotonic() + 10
    while (engine := lamina.status()["engine"])["running"] or engine["waiting"]:
        assert time.monotonic() < deadline, engine
        time.sleep(0.1)
    assert lamina.status()["errors_by_reason"].get("aborted", 0) >= 1


def _load(lamina: Lamina, num_streams: int, max_tokens: int) -> list[int]:
    """num_streams concurrent chat requests that each generate max_tokens tokens."""
    statuses: list[int] = []

    def one() -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": max_tokens, "ignore_eos": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {API_KEY}"}
        answer = httpx.post(lamina.url + "/v1/chat/completions", json=body, headers=headers,
                            timeout=120)  # fmt: skip
        statuses.append(answer.status_code)

    threads = [threading.Thread(target=one) for _ in range(num_streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_dashboard_counters_move_under_load(page, lamina: Lamina) -> None:
    page.goto(lamina.url + "/dashboard")
    until(page, READY)
    steps_before = int(page.inner_text("#steps"))
    page.evaluate("""() => {
        window.seenRunning = 0;
        new MutationObserver(() => {
            window.seenRunning = Math.max(window.seenRunning,
                Number(document.getElementById('running').textContent) || 0);
        }).observe(document.getElementById('running'), {childList: true, subtree: true,
                                                          characterData: true});
    }""")
    statuses = _load(lamina, num_streams=3, max_tokens=80)  # seconds: several polls
    assert statuses == [200, 200, 200]
    until(page, f"Number({text_of('steps')}) > {steps_before}")
    until(page, text_of("running") + " === '0'")
    assert page.evaluate("window.seenRunning") >= 1  # the dashboard showed the load live
    assert float(page.inner_text("#tps")) >= 0
    assert page.locator("#chart-tps polyline").count() == 1
    assert page.inner_text("#ttft") != "no samples"
    assert page.problems == []


def test_completion_mode_and_tokenizer_view(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=0, max_tokens=6)
    page.click("#tab-completion")
    page.click("#complete")
    page.locator("#completion-output .stats").wait_for()
    assert page.inner_text("#completion-output .content").strip()
    page.click("#tab-tokenizer")
    text = "Hello, world! How are tokens split?"
    page.fill("#tokenize-text", text)
    page.click("#panel-tokenizer button[type=submit]")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    expected = httpx.post(lamina.url + "/tokenize", json={"prompt": text}, headers=headers).json()
    count = expected["count"]
    until(page, f"document.querySelectorAll('#tokens .token').length === {count}")
    assert page.inner_text("#token-count").startswith(f"{count} tokens")
    ids = page.eval_on_selector_all("#tokens .token", "nodes => nodes.map(n => n.title)")
    assert ids == [f"id {t}" for t in expected["tokens"]]
    assert page.problems == []


def _sse_text(stream: str) -> str:
    events = [line[5:].strip() for line in stream.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_the_code_shown_runs_and_gives_the_same_answer(page, lamina: Lamina) -> None:
    open_playground(page, lamina.url)
    set_params(page, temperature=0, max_tokens=8, seed=5, top_k=40)
    page.fill("#user-input", "Say hello.")  # not sent: the code shows the next request
    curl = page.inner_text("#code-curl")
    python = page.inner_text("#code-python")
    assert '"top_k":40' in curl and 'extra_body={\n        "top_k": 40,' in python
    env = {**os.environ, "LAMINA_API_KEY": API_KEY}
    by_curl = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True,
                             timeout=60, check=True)  # fmt: skip
    by_python = subprocess.run([sys.executable, "-c", python], env=env, capture_output=True,
                               text=True, timeout=60, check=True)  # fmt: skip
    assert _sse_text(by_curl.stdout) == by_python.stdout != ""


def test_served_under_a_path_prefix_through_nginx(page, lamina: Lamina) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    base = lamina.prefixed_url
    open_playground(page, base)
    set_params(page, temperature=0, max_tokens=6)
    assert chat(page, "Hi!").strip()
    page.goto(base + "/dashboard")
    until(page, READY)
    outside = [url for url in requested if not url.startswith(base + "/")]
    assert outside == [] and page.problems == []


def test_screenshots_at_desktop_and_phone_widths(browser, lamina: Lamina, artifacts) -> None:
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        context.add_init_script(f"sessionStorage.setItem('lamina.apiKey', '{API_KEY}')")
        try:
            tab = context.new_page()
            open_playground(tab, lamina.url)
            set_params(tab, temperature=0, max_tokens=16, seed=1)
            chat(tab, "What is the capital of France?")
            tab.screenshot(path=artifacts / f"playground-{name}.png", full_page=name == "phone")
            tab.goto(lamina.url + "/dashboard")
            until(tab, "document.querySelectorAll('#facts tr').length > 10")
            time.sleep(1.5)  # a few polls: the charts have lines
            tab.screenshot(path=artifacts / f"dashboard-{name}.png", full_page=True)
        finally:
            context.close()
    for page_name in ("playground", "dashboard"):
        for name in ("desktop", "phone"):
            assert (artifacts / f"{page_name}-{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("path", ["/", "/dashboard"])
def test_no_critical_accessibility_violations(page, lamina: Lamina, axe_source, path) -> None:
    page.goto(lamina.url + path)
    until(page, "document.querySelector('#model-name, #facts tr') !== null")
    page.wait_for_load_state("networkidle")
    page.evaluate(axe_source)  # through the DevTools protocol: the page's CSP allows no inline
    violations = page.evaluate(
        "async () => (await axe.run()).violations"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))"
    )
    critical = [v for v in violations if v["impact"] == "critical"]
    assert critical == [], critical
    serious = [v for v in violations if v["impact"] == "serious"]
    assert serious == [], serious
