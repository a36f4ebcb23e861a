"""The web pages in a real browser (Playwright driving Debian's chromium) against a live
coordinator: browse and sort the leaderboard, open an ELM's lineage, a maintainer approves a
pending contribution and sees the new version. Screenshots go to test-artifacts/screenshots."""

import re
import shutil

import pytest
from helpers import ROOT
from live import Coordinator, populate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, seed_dir, tok, cache_dir):
    c = Coordinator(tmp_path_factory.mktemp("web"), {})
    data = populate(c, seed_dir, tok, cache_dir, tmp_path_factory.mktemp("web-work"))
    c.user("maint", "maintainer", password="maintainer-pass")
    yield c, data
    c.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("width", [1280, 390])
def test_browse_sort_and_filter_the_leaderboard(site, browser, width):
    coord, _ = site
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(coord.url + "/")
    assert page.title() == "web forest · elmforest"  # one forest: the home page is that forest
    page.get_by_role("link", name="Leaderboard").first.click()
    page.wait_for_url(re.compile(r"/forests/web/leaderboard"))
    rows = page.locator("table.board tbody tr")
    assert rows.count() >= 6  # 2 ELMs, ensemble and top-1, three averages
    shoot(page, f"leaderboard-{width}")
    # sort by a domain: the first row is then the best on that domain
    page.locator("table.board thead a", has_text="kjv_bible").click()
    page.wait_for_url(re.compile(r"sort=kjv_bible"))
    page.wait_for_function("document.querySelector('table.board thead th[aria-sort=ascending]') !== null")
    col = [th.inner_text().split("\n")[0] for th in page.locator("table.board thead th").all()].index("kjv_bible ▲")
    values = [float(r.locator("td, th").nth(col).inner_text()) for r in rows.all()]
    assert values == sorted(values)
    # filter to eval domains: only the go column remains, and the state is in the URL
    page.get_by_label("Domains").select_option("eval")
    page.wait_for_url(re.compile(r"role=eval"))
    page.wait_for_function("document.querySelectorAll('table.board thead th').length === 3")
    assert "go" in page.locator("table.board thead").inner_text()
    assert "python" not in page.locator("table.board thead").inner_text()
    shoot(page, f"leaderboard-eval-{width}")
    page.close()


def test_elm_lineage_and_posterior(site, browser):
    coord, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(coord.url + "/forests/web")
    page.get_by_role("link", name="kjv_bible", exact=True).first.click()
    page.wait_for_url(re.compile(r"/forests/web/elms/kjv_bible"))
    svg = page.locator("svg.lineage")
    assert svg.is_visible()
    labels = svg.locator("text.nl").all_text_contents()
    assert "seed" in labels and "kjv_bible" in labels
    assert page.locator("svg.bars").is_visible()
    shoot(page, "elm-lineage-1280")
    page.goto(coord.url + "/forests/web/posterior")
    assert page.locator("svg.heatmap rect").count() == 4 * 2  # 4 evaluated domains x 2 ELMs
    shoot(page, "posterior-1280")
    page.close()


def test_maintainer_approves_and_publishes_with_the_keyboard(site, browser):
    coord, data = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(coord.url + "/review")
    page.wait_for_url(re.compile(r"/login\?next=%2Freview"))
    page.get_by_label("Username").fill("maint")
    page.keyboard.press("Tab")
    page.keyboard.type("maintainer-pass")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/review$"))
    card = page.locator(f"#c{data['pending']['id']}")
    assert "postgres_docs" in card.inner_text() and "branch init" in card.inner_text()
    shoot(page, "review-1280")
    card.get_by_role("button", name="Approve postgres_docs").click()
    page.wait_for_url(re.compile(r"/review$"))
    assert "approved" in page.locator(".flash").inner_text()
    page.get_by_label("Release note").fill("adds postgres_docs")
    page.get_by_role("button", name=re.compile(r"Publish web v3")).click()
    page.wait_for_url(re.compile(r"/jobs/\d+"))
    page.get_by_role("link", name="web v3").wait_for(timeout=60_000)
    page.get_by_role("link", name="web v3").click()
    assert "v3" in page.locator("h1").inner_text()
    assert "postgres_docs" in page.locator("table").first.inner_text()
    shoot(page, "published-1280")
    page.close()


def test_pages_read_without_javascript_and_have_titles(site, browser):
    coord, users = site
    # the version published by the test before is evaluated by a job: its board has rows (and
    # the python column) once that ends; a page fetched before would be cached for max-age
    admin = users["admin"]
    admin.wait(lambda: admin.get("/forests/web/leaderboard"),
               lambda b: any("python" in r["ppl"] for r in b["rows"]), timeout=300)
    ctx = browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 900})
    page = ctx.new_page()
    for path in ["/forests/web", "/forests/web/leaderboard", "/forests/web/posterior", "/forests/web/elms/python",
                 "/forests/web/download", "/login"]:
        page.goto(coord.url + path)
        assert page.title().endswith("· elmforest") and len(page.title()) > 12, path
    page.goto(coord.url + "/forests/web/leaderboard")
    page.locator("table.board thead a", has_text="python").click()  # plain links sort without JS
    assert "sort=python" in page.url and page.locator("th[aria-sort=ascending]").count() == 1
    shoot(page, "leaderboard-nojs-390")
    ctx.close()


def test_forms_refuse_a_missing_csrf_token(site):
    import httpx

    coord, data = site
    r = httpx.post(coord.url + f"/review/{data['pending']['id']}/decline", data={"reason": "x"}, follow_redirects=False)
    assert r.status_code == 303 and "/login" in r.headers["location"]  # not logged in
    s = httpx.Client(base_url=coord.url)
    page = s.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert s.post("/login", data={"username": "maint", "password": "maintainer-pass", "csrf": token}).status_code == 303
    r = s.post(f"/review/{data['pending']['id']}/decline", data={"reason": "forged", "csrf": "wrong"})
    assert r.status_code == 403 and "form expired" in r.text
