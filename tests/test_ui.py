"""The Prefect UI, driven the way an operator uses it, in headless Chromium.

Debian's chromium (`apt-get install chromium`, done by `make test`) driven by Playwright
through `executable_path`; Playwright's own browser download is never used. The server
is the session's (conftest), the deployments come from prefect.yaml, and a worker
subprocess executes what the browser starts. Screenshots land in test-output/ui/.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, Response, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from prefect.client.schemas.objects import StateType
from support import (
    OUTPUT_DIR,
    PROCESS_INVOICES,
    Worker,
    create_run,
    deploy_with_cli,
    direct_s3,
    fail_llm_for,
    find_run_by_name,
    manifest_entries,
    pause_schedules,
    running_worker,
    save_llm_block,
    unique,
    upload_invoices,
    wait_for_final_state,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.storage import S3Store, invoice_id, result_key

pytestmark = pytest.mark.ui

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOTS = OUTPUT_DIR / "ui"
LOGS = OUTPUT_DIR / "ui"
API_KEY = "sk-test-ui-" + uuid.uuid4().hex
UI_TIMEOUT_MS = 60_000  # the UI's first load on a busy 2-core machine
# Prefect's server answers 503 when SQLite reports a lock it could not wait out
# (`is_client_retryable_exception` in prefect/server/api/server.py); nothing was written.
# Its Python client retries those; the UI shows "Oops. Something went wrong." and leaves
# the form as it was, so an operator clicks again. So does this test, a few times. A write
# may first wait out SQLite's busy timeout (60 s, prefect/server/database/configurations.py).
RETRYABLE = 503
CLICK_ATTEMPTS = 3
ANSWER_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, or `apt-get install -y chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    return direct_s3(local_stack.s3_endpoint, local_stack.bucket)


@pytest.fixture(scope="module")
def deployed(local_stack: stack.StackInfo) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    deploy_with_cli(LOGS / "deploy.log")
    with get_client(sync_client=True) as c:
        deployment = c.read_deployment_by_name(PROCESS_INVOICES)
    pause_schedules(deployment.id)
    return {"process-invoices": deployment}


@pytest.fixture(scope="module")
def worker(deployed: dict[str, Any]) -> Iterator[Worker]:
    with running_worker(LOGS / "worker.log") as w:
        yield w


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


def form_field(page: Page, title: str) -> Locator:
    """The input of one property of the run form, found by the title in params.py."""
    label = f"{title} (Optional)"
    return page.locator(
        f"xpath=//span[normalize-space()='{label}']"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
        " ' schema-form-property ')][1]//*[self::textarea or self::input]"
    ).first


def click_until_accepted(page: Page, button: Locator, *endpoints: str) -> Response:
    """Click `button` until the POSTs it sends to `endpoints`, in order, are not a 503.

    Returns the answer of the last endpoint; any other failure fails the test at once,
    naming every API call that failed meanwhile.
    """
    failures: list[str] = []
    page.on("response", lambda r: r.ok or failures.append(f"{r.request.method} {r.url} {r.status}"))
    page.on("requestfailed", lambda r: failures.append(f"{r.method} {r.url} {r.failure}"))

    def settles(response: Response) -> bool:
        if response.request.method != "POST" or not response.url.endswith(endpoints):
            return False
        return response.status == RETRYABLE or response.url.endswith(endpoints[-1])

    for _ in range(CLICK_ATTEMPTS):
        try:
            with page.expect_response(settles, timeout=ANSWER_TIMEOUT_MS) as answer:
                button.click()
        except PlaywrightTimeoutError:
            pytest.fail(f"no answer from {endpoints[-1]}; failed API calls: {failures}")
        response = answer.value
        if response.status != RETRYABLE:
            assert response.ok, f"{response.url}: {response.status} {response.text()}"
            return response
    pytest.fail(f"{CLICK_ATTEMPTS} clicks answered {RETRYABLE}; failed API calls: {failures}")


def test_custom_run_from_the_deployment_page(
    local_stack: stack.StackInfo,
    deployed: dict[str, Any],
    worker: Worker,
    s3: S3Store,
    page: Page,
) -> None:
    deployment = deployed["process-invoices"]
    prefix = unique("ui-run") + "/"
    keys = upload_invoices(s3, prefix, 3, seed=21)
    run_name = unique("ui-custom-run")

    page.goto(f"{local_stack.ui_url}/deployments/deployment/{deployment.id}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.locator(".flow-run-name-input input").fill(run_name)
    # The form explains itself: titles and descriptions from flows/params.py.
    expect(page.get_by_text("S3 prefix (folder) holding the invoice PDFs")).to_be_visible()
    source_prefix = form_field(page, "Source prefix")
    expect(source_prefix).to_have_value("incoming/")  # the deployment's default
    source_prefix.fill(prefix)
    page.screenshot(path=SCREENSHOTS / "custom-run-form.png")
    submit = page.get_by_role("button", name="Submit")
    click_until_accepted(page, submit, "/ui/schemas/validate", "/create_flow_run")
    expect(page.get_by_text(f"{run_name} scheduled to start").first).to_be_visible()

    flow_run = find_run_by_name(deployment.id, run_name)
    assert flow_run.parameters["params"]["source_prefix"] == prefix
    finished = wait_for_final_state(flow_run.id, worker)

    assert finished.state.type == StateType.COMPLETED, finished.state.message
    # The form changed the prefix only: manifest and results are the defaults.
    entries = {k: e for k, e in manifest_entries(s3, "manifest.json").items() if k in keys}
    assert {k: e["status"] for k, e in entries.items()} == dict.fromkeys(keys, "done")
    for key in keys:
        expected = result_key("results/", invoice_id(key))
        assert entries[key]["result_key"] == expected
        assert json.loads(s3.get(expected).body)["source_key"] == key
    page.goto(f"{local_stack.ui_url}/runs/flow-run/{flow_run.id}")
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.locator("li.p-tab", has_text="Artifacts").click()
    expect(page.get_by_text("invoiceflow-progress").first).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "flow-run-completed.png", full_page=True)


def test_retry_button_finishes_a_failed_run_without_rebilling(
    local_stack: stack.StackInfo,
    deployed: dict[str, Any],
    worker: Worker,
    s3: S3Store,
    llm: LLMServerHandle,
    page: Page,
) -> None:
    prefix = unique("ui-retry") + "/"
    keys = upload_invoices(s3, prefix, 5, seed=22)
    faulty = keys[:2]
    block = save_llm_block(llm.base_url, API_KEY, timeout_s=30, max_retries=0)
    params = {
        "source_prefix": prefix,
        "extractor_block": block,
        "manifest_key": f"manifests/{prefix.rstrip('/')}.json",
        "results_prefix": f"results/{prefix}",
        "commit_interval_s": 0.2,
    }
    llm.reset()
    llm.set_faults(fail_llm_for(faulty))
    flow_run = create_run(PROCESS_INVOICES, params)
    failed = wait_for_final_state(flow_run.id, worker)
    assert failed.state.type == StateType.FAILED, failed.state.message
    assert "2 of 5 invoices failed" in failed.state.message
    before = llm.stats()["by_key"]
    llm.set_faults([])  # the LLM endpoint recovered

    page.goto(f"{local_stack.ui_url}/runs/flow-run/{flow_run.id}")
    expect(page.get_by_text("Failed").first).to_be_visible()
    page.get_by_role("button", name="Retry", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Retry {failed.name}?")
    click_until_accepted(page, dialog.get_by_role("button", name="Retry", exact=True), "/set_state")
    retried = wait_for_final_state(flow_run.id, worker)

    assert retried.state.type == StateType.COMPLETED, retried.state.message
    assert retried.run_count == 2
    after = llm.stats()["by_key"]
    done_before = [k for k in keys if k not in faulty]
    assert {k: after[k] for k in done_before} == {k: before[k] for k in done_before}
    assert {k: after[k] - before[k] for k in faulty} == dict.fromkeys(faulty, 1)
    entries = manifest_entries(s3, params["manifest_key"])
    assert {k: e["status"] for k, e in entries.items()} == dict.fromkeys(keys, "done")
    page.reload()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "flow-run-retried.png", full_page=True)
