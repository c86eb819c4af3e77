"""The web chat page (``infer/webchat.py``) in headless Chromium against a live server.

Checks what a user sees: over a long conversation with a 256-token model every reply
bubble gets text (never blank, never a server 400), the page drops old turns and says so;
a hostile model name and hostile user text are shown as text and run nothing; ``/?q=``
only fills the box; a server that wants an API key gets one (a 401 shows the server's
message, the key field takes a key and the next send works); a message longer than the
context is an error bubble. Does not check the reply text itself (test_server.py compares
the API's output with HF ``generate``).
"""
import dataclasses
import shutil
import time

import pytest
from conftest import in_ci
from tiny_serve import CTX, get, live, post, tiny_model

EVIL = "</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package (pip install 'lmforge[ref]')")
    missing += [f"the {exe} executable (Debian: apt-get install chromium chromium-driver)"
                for exe in ("chromium", "chromedriver") if shutil.which(exe) is None]
    if missing:
        why = "the web chat tests need " + " and ".join(missing)
        if in_ci():  # CI runs them or fails: .ci/run installs the browser
            pytest.fail(why + "; CI (LMFORGE_CI=1 / LMFORGE_REQUIRE_NATIVE=1) does not skip them")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def model(corpus_files):
    return tiny_model(corpus_files[0])


@pytest.fixture(scope="module")
def server(model):
    with live(*model, model_name=EVIL, num_blocks=128) as (base, app):
        yield base


def _wait(drv, cond, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: cond(d) or False)


def _open(drv, url, name):
    from selenium.webdriver.common.by import By

    drv.get(url)
    _wait(drv, lambda d: d.find_element(By.ID, "model").text == name, 20)


def _say(drv, text, reply_id):
    """Type ``text``, send it, wait for bubble ``reply_id`` to finish; returns (text, is_error)."""
    from selenium.webdriver.common.by import By

    drv.find_element(By.ID, "msg").send_keys(text)
    drv.find_element(By.ID, "send").click()
    sel = f"#{reply_id}[data-done]"
    el = _wait(drv, lambda d: (d.find_elements(By.CSS_SELECTOR, sel) or [None])[0], 90)
    return el.get_attribute("textContent"), el.get_attribute("data-error") == "1"


def _no_alert(drv):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        a = drv.switch_to.alert
    except NoAlertPresentException:
        return True
    a.dismiss()
    return False


def test_long_conversation_keeps_within_the_context(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server + "/", EVIL)
    assert browser.find_element(By.ID, "ctx").text == f"({CTX}-token context)"
    # record what the page asks the server for
    browser.execute_script("""window.__sent = []; const f = window.fetch;
        window.fetch = (u, o) => { if (String(u).endsWith('/v1/chat/completions')) window.__sent.push(JSON.parse(o.body));
                                   return f(u, o); };""")
    system = "You are a player in a company of actors; answer in verse."
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "system").send_keys(system)
    # each message is about a third of the context: by the third turn old turns must go
    line = "Now is the winter of our discontent made glorious summer by this sun of York; "
    turns = [f"Turn {k}: " + line * 3 for k in range(5)]
    replies = []
    for k, t in enumerate(turns):
        text, err = _say(browser, t, f"reply-{2 * k + 1}")
        replies.append(text)
        assert not err, f"turn {k}: the page showed an error: {text}"
        assert text.strip() and text != "\u2026", f"turn {k}: blank reply bubble"
    notices = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".notice")]
    assert notices and all(n.startswith("dropped ") and n.endswith(f"to fit the {CTX}-token context")
                           for n in notices), notices
    assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == len(turns)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".assistant")) == len(turns)
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    sent = browser.execute_script("return window.__sent")
    assert len(sent) == len(turns)
    for k, body in enumerate(sent):  # the system message kept, the newest turn last, a reply that fits
        assert body["model"] == EVIL and body["stream"] is True
        assert body["messages"][0] == {"role": "system", "content": system}
        assert body["messages"][-1] == {"role": "user", "content": turns[k].strip()}  # the page trims
        code, t = post(server, "/tokenize", {"messages": body["messages"], "add_generation_prompt": True})
        assert code == 200
        assert 1 <= body["max_tokens"] <= 256 and body["max_tokens"] == min(256, CTX - t["count"]), (k, t["count"])
        assert CTX - t["count"] >= min(64, CTX // 4), f"turn {k}: only {CTX - t['count']} tokens left for the reply"
    # old turns really went: the last request carries fewer messages than the conversation had
    assert len(sent[-1]["messages"]) < 1 + 2 * len(turns) - 1


def test_hostile_text_is_shown_literally_and_runs_nothing(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server + "/", EVIL)
    assert _no_alert(browser)
    assert browser.find_element(By.ID, "model").get_attribute("textContent") == EVIL
    assert browser.title == "lmforge chat: " + EVIL
    assert not browser.find_elements(By.TAG_NAME, "img")
    hostile = "<b id=bold>hi</b><img src=x onerror=alert(2)>"
    text, err = _say(browser, hostile, "reply-1")
    assert not err and text.strip(), text
    assert browser.find_element(By.CSS_SELECTOR, ".user").get_attribute("textContent") == hostile
    assert not browser.find_elements(By.TAG_NAME, "img") and not browser.find_elements(By.ID, "bold")
    time.sleep(0.3)
    assert _no_alert(browser)
    # the page as served is the module's constant: nothing of the model's name was pasted in
    import urllib.request

    from lmforge.infer.webchat import PAGE

    assert urllib.request.urlopen(server + "/").read().decode() == PAGE


def test_q_parameter_fills_the_box_and_sends_nothing(browser, server):
    from selenium.webdriver.common.by import By

    before = get(server, "/health")
    _open(browser, server + "/?q=hi%20there", EVIL)
    time.sleep(1.0)  # the old page sent at once; give a send every chance to show up
    assert browser.find_element(By.ID, "msg").get_attribute("value") == "hi there"
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .user, #log .assistant")
    after = get(server, "/health")
    assert after.get("stats", {}).get("steps") == before.get("stats", {}).get("steps")


def test_a_message_longer_than_the_context_is_an_error_bubble(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server + "/", EVIL)
    huge = "word " * 400
    browser.execute_script("document.getElementById('msg').value = arguments[0]", huge)  # typing it is slow
    browser.find_element(By.ID, "send").click()
    el = _wait(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, "#reply-1[data-done]") or [None])[0], 30)
    assert el.get_attribute("data-error") == "1"
    assert f"context is {CTX} tokens" in el.text
    assert browser.find_element(By.ID, "msg").get_attribute("value").strip() == huge.strip()  # given back
    # and the page still works afterwards
    browser.find_element(By.ID, "msg").clear()
    text, err = _say(browser, "Hello", "reply-3")
    assert not err and text.strip()


def test_api_key_prompted_on_401_and_kept_for_the_tab(browser, model):
    from selenium.webdriver.common.by import By

    with live(*model, model_name="keyed", api_key="sekrit-123", num_blocks=64) as (base, _):
        browser.get(base + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(base + "/")
        _wait(browser, lambda d: d.find_element(By.ID, "keyrow").is_displayed(), 20)
        err = browser.find_element(By.CSS_SELECTOR, ".assistant.error")
        assert "401" in err.text, err.text
        text, is_err = _say(browser, "Hello", "reply-1")  # no key yet: the server's 401 is shown
        assert is_err and "HTTP 401" in text and len(text) > len("HTTP 401: ")
        browser.find_element(By.ID, "msg").clear()
        browser.find_element(By.ID, "key").send_keys("sekrit-123")
        browser.find_element(By.ID, "usekey").click()
        _wait(browser, lambda d: d.find_element(By.ID, "model").text == "keyed", 20)
        assert not browser.find_element(By.ID, "keyrow").is_displayed()
        text, is_err = _say(browser, "Hello", "reply-3")
        assert not is_err and text.strip(), text
        assert browser.execute_script("return sessionStorage.getItem('lmforge-api-key')") == "sekrit-123"
        browser.refresh()  # the key survives a reload of the tab
        _wait(browser, lambda d: d.find_element(By.ID, "model").text == "keyed", 20)
        browser.execute_script("sessionStorage.clear()")


def test_an_error_inside_the_stream_is_shown(browser, model):
    """A reply cut off by the server's request timeout: the server sends an error event mid-stream
    (HTTP 200 already sent); the bubble keeps the text so far and shows the server's message."""
    from selenium.webdriver.common.by import By

    with live(*model, model_name="slow", request_timeout_s=1.0, num_blocks=64) as (base, app):
        step = app.state.engine.step

        def slow_step():  # ~4 tokens a second: the 1 s timeout cuts the reply after a few tokens, before
            time.sleep(0.25)  # a sampled stop token is likely to end it (at 20/s one sometimes did, in CI)
            return step()

        add = app.state.engine.add_request

        def never_stop(prompt, params=None):  # no sampled stop token can end the reply before the timeout
            if params is not None:
                params = dataclasses.replace(params, ignore_eos=True, stop_token_ids=[])
            return add(prompt, params)

        app.state.engine.step = slow_step
        app.state.engine.add_request = never_stop
        _open(browser, base + "/", "slow")
        text, err = _say(browser, "Hello", "reply-1")
        assert err, text
        assert "error in the stream" in text and "did not finish within 1 s" in text, text
        assert browser.find_element(By.ID, "send").is_enabled()
