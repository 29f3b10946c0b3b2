"""The dashboard in a real browser: Debian's chromium driven by Playwright, uvicorn serving.

No browser is downloaded (``playwright install`` is never run): Playwright starts
``/usr/bin/chromium`` (``apt-get install chromium``, in scripts/system-deps.sh).
Screenshots are saved under ``test-artifacts/dashboard/`` (ignored by git; the
directory can be moved with ``ALCHEMIUM_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from alchemium.events import OutboxRelay
from alchemium.events.outbox import Outbox
from tests.dashboard.conftest import TOKEN, seed, statuses
from tests.events.relay_support import REPO, Sink, insert_events
from tests.rig import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("ALCHEMIUM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"

Factory = async_sessionmaker[AsyncSession]
MakeApp = Callable[..., Starlette]


def _browser_missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "needs Playwright's Python package (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def screenshot_path(request: pytest.FixtureRequest, step: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    return ARTIFACTS / f"{name}-{step}.png"


async def cell(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text()).strip()


async def test_overview_counts_change_after_events_are_committed(
    browser: Any,
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    request: pytest.FixtureRequest,
) -> None:
    await seed(session_factory, outbox, delivered=5, dead=1, pending=2)
    async with serving(make_app(refresh=1)) as base:
        page = await browser.new_page()
        await page.goto(f"{base}/")
        row = '#destinations tr[data-destination="sink"]'
        assert await cell(page, f"{row} td.pending") == "2"
        assert await cell(page, f"{row} td.delivered") == "5"
        assert await cell(page, f"{row} td.dead") == "1"
        assert await page.locator("#throughput svg rect.bar").count() == 60
        await page.screenshot(path=str(screenshot_path(request, "before")), full_page=True)

        await insert_events(session_factory, outbox, 3)  # committed while the page is open
        # The page reloads itself every second (data-refresh); no reload from the test.
        await page.wait_for_function(
            "document.querySelector('#destinations tr[data-destination=sink] td.pending')"
            ".innerText.trim() === '5'",
            timeout=20_000,
        )
        assert await cell(page, "#totals td.pending") == "5"
        await page.screenshot(path=str(screenshot_path(request, "after")), full_page=True)


async def test_requeue_a_dead_letter_and_watch_a_running_relay_deliver_it(
    browser: Any,
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    request: pytest.FixtureRequest,
) -> None:
    seeded = await seed(session_factory, outbox, delivered=2, dead=1)
    (dead_id,) = seeded.dead_ids
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, poll_interval=0.2, outbox=outbox)
    running = asyncio.create_task(relay.run())
    try:
        async with serving(make_app(actions=True, token=TOKEN, refresh=1)) as base:
            context = await browser.new_context()  # one browser session: its cookies
            page = await context.new_page()
            await page.goto(f"{base}/dead")
            assert page.url.startswith(f"{base}/login")  # a token protects the dashboard
            await page.fill("input[name=name]", "dora")
            await page.fill("input[name=token]", TOKEN)
            await page.click("form.login button[type=submit]")
            await page.wait_for_url(f"{base}/dead")
            assert await cell(page, "#dead-total") == "1 dead delivery matches."
            await page.screenshot(path=str(screenshot_path(request, "dead")), full_page=True)

            await page.click(f'tr[data-delivery="{dead_id}"] a.event-link')
            await page.wait_for_url(re.compile(r".*/events/.*"))
            status = f'#deliveries tr[data-delivery="{dead_id}"] td.status'
            assert await cell(page, status) == "dead"
            # The page reloads itself every second; it holds still while the pointer is on
            # an action form, so hover first, as a person's pointer would, and wait for a
            # tick of its timer to have held (<body data-live="held">): from then on no
            # reload can start under the click.
            requeue = page.locator(f'#deliveries tr[data-delivery="{dead_id}"] button.requeue')
            await requeue.hover()
            await page.wait_for_function("document.body.dataset.live === 'held'", timeout=20_000)
            await requeue.click()
            await page.wait_for_selector("p.notice")
            assert await cell(page, "p.notice") == "Requeued 1 dead delivery."
            # The relay claims the row within a poll interval; the page reloads itself.
            await page.wait_for_function(
                f"document.querySelector('{status}').innerText.trim() === 'delivered'",
                timeout=30_000,
            )
            await page.screenshot(path=str(screenshot_path(request, "delivered")), full_page=True)
            # A page of its own: the event page keeps reloading itself, which would abort
            # a navigation started from it.
            actions = await context.new_page()
            await actions.goto(f"{base}/actions")
            assert "dora" in await cell(actions, "#actions tbody tr")
    finally:
        relay.stop()
        await asyncio.wait_for(running, 30)
    assert [e.id for e in sink.received] == [seeded.events[2].id]
    assert await statuses(session_factory, outbox, [dead_id]) == ["delivered"]


async def test_read_only_mode_has_no_action_buttons_and_its_posts_refuse(
    browser: Any,
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    request: pytest.FixtureRequest,
) -> None:
    seeded = await seed(session_factory, outbox, dead=2)
    async with serving(make_app()) as base:
        page = await browser.new_page()
        await page.goto(f"{base}/dead")
        assert await page.locator("#dead-letters tbody tr").count() == 2
        assert await page.locator("span.badge.readonly").count() == 1
        for button in ("requeue", "discard", "requeue-selected", "requeue-all", "discard-all"):
            assert await page.locator(f"button.{button}").count() == 0
        assert await page.locator("input[name=ids]").count() == 0
        await page.click("a.event-link >> nth=0")
        await page.wait_for_url(re.compile(r".*/events/.*"))
        assert await page.locator("button.requeue").count() == 0
        await page.screenshot(path=str(screenshot_path(request, "read-only")), full_page=True)

        form = await page.request.post(
            f"{base}/dead/requeue", form={"row": str(seeded.dead_ids[0])}
        )
        api = await page.request.post(f"{base}/api/dead/discard", data={"ids": seeded.dead_ids})
        assert form.status == 403
        assert "read-only" in await form.text()
        assert api.status == 403
        assert (await api.json())["error"]["code"] == "forbidden"
    assert await statuses(session_factory, outbox, seeded.dead_ids) == ["dead", "dead"]
