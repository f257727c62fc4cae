"""The built book, read as a reader reads it.

The book is built from the committed chapters into a temporary folder (seconds: the notebooks
are not executed) with warnings as errors. Every page of the table of contents is then

- read as HTML: every internal link and anchor resolves, no page sends the reader to a file
  that is not in the book, MathJax is loaded once;
- opened in headless Chromium at 1300 px, after MathJax has typeset it: no table, text output
  or equation is cut off, MathJax reports no error and leaves no raw TeX, no glued value or
  role is left empty or unrendered.

What counts as cut off, element by element:

- an HTML table may be wider than the text column only inside a box of its own that scrolls
  sideways (pandas output, ``emq.book.plots.show_table``, Markdown tables);
- a plain-text cell output (``print``) must fit its box: the theme gives every ``<pre>`` a
  scroll bar, but a text table whose last columns sit behind it reads as a table without them;
  print it as an HTML table or shorten its lines;
- a display equation must fit the column: break it (``\\begin{aligned}``) or shorten it;
- nothing at all may stick out of the column, and the page must not scroll sideways.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them when run as root); without them the browser checks skip with one line.
"""
from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1300, 900  # px: a laptop screen


def toc_pages() -> list[str]:
    """The HTML files of the book's pages, in the order of _toc.yml."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    return [f"{Path(f).with_suffix('').as_posix()}.html" for f in files]


PAGES = toc_pages()


# ---- the build ---------------------------------------------------------------------------------
def jupyter_book() -> str | None:
    here = Path(sys.executable).with_name("jupyter-book")
    return str(here) if here.exists() else shutil.which("jupyter-book")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``jupyter-book build book/ -W -n --keep-going`` into a temporary folder: (process, html dir)."""
    exe = jupyter_book()
    if exe is None:
        pytest.skip("jupyter-book is not installed: pip install -r requirements.txt")
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run([exe, "build", str(ROOT / "book"), "--path-output", str(out), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    html = out / "_build" / "html"
    if not (html / PAGES[0]).exists():
        pytest.fail(f"the book did not build:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, html


def test_the_book_builds_offline_with_warnings_as_errors(build):
    proc, _ = build
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0, "jupyter-book build -W -n failed:\n" + "\n".join(warnings[:40])


# ---- the HTML, read as text --------------------------------------------------------------------
class Page(HTMLParser):
    """The ids, links, scripts and visible text of one HTML file."""

    SKIP_TEXT = {"script", "style"}

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (tag, url)
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "a" and a.get("href") is not None:
            self.links.append((tag, a["href"]))
        elif tag in ("img", "script") and a.get("src"):
            self.links.append((tag, a["src"]))
            if tag == "script":
                self.scripts.append(a["src"])
        elif tag == "link" and a.get("href") and "stylesheet" in (a.get("rel") or ""):
            self.links.append((tag, a["href"]))
        if tag in self.SKIP_TEXT:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP_TEXT:
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


@functools.cache
def parse(path: Path) -> Page:
    return Page(path)


# A file name that linkify turned into a web address, such as http://METHOD.md.
FILE_AS_HOST = re.compile(r"\.(md|ipynb|py|ya?ml|txt|json|csv)$", re.I)


def link_problems(html_dir: Path, page: str) -> list[str]:
    problems = []
    here = html_dir / page
    for tag, url in parse(here).links:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            if FILE_AS_HOST.search(parts.netloc):
                problems.append(f"<{tag}> {url!r}: a file name made into a web address")
            continue
        if parts.scheme or url.startswith("//"):
            continue  # mailto:, data:, javascript:
        target = here if not parts.path else (here.parent / unquote(parts.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"<{tag}> {url!r}: no such file in the built book")
            continue
        anchor = unquote(parts.fragment)
        if anchor and target.suffix == ".html" and anchor not in parse(target).ids:
            problems.append(f"<{tag}> {url!r}: {target.name} has no element with id {anchor!r}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_every_internal_link_and_anchor_resolves(build, page):
    problems = link_problems(build[1], page)
    assert not problems, f"{page}: broken links\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_no_page_sends_the_reader_to_a_file_outside_the_book(build, page):
    """The methods and claims are in the book's own chapters (00_methods), not in project notes."""
    text = " ".join(parse(build[1] / page).text)
    outside = sorted(set(re.findall(r"\b(METHOD\.md|MACHINE\.md|STYLE\.md)\b", text)))
    assert not outside, f"{page} names {', '.join(outside)}, which the book does not contain: link to the methods chapter"


@pytest.mark.parametrize("page", PAGES)
def test_mathjax_is_loaded_once_and_from_the_book(build, page):
    """A book/_static folder makes Jupyter Book 1 add every .js under html_static_path as a script
    tag, MathJax's ~60 extension files included; the book's CSS is therefore in book/_css/."""
    mathjax = [s for s in parse(build[1] / page).scripts if "mathjax" in s.lower()]
    assert len(mathjax) <= 1, f"{page} loads {len(mathjax)} MathJax scripts: {mathjax[:5]}"
    assert all(not urlsplit(s).scheme for s in mathjax), f"{page} fetches MathJax from the network: {mathjax}"


# ---- the pages in Chromium ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(build):
    """The built book over HTTP on 127.0.0.1 (fonts load from http://, not from file://)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(build[1]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver")
    if not chromium or not driver_exe:
        pytest.skip("Chromium not found: apt-get install chromium chromium-driver (.ci/run does, as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -r requirements.txt")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_exe), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


# Resolves once MathJax has typeset the page (or at once on a page without math).
WAIT_FOR_MATHJAX = r"""
const done = arguments[arguments.length - 1];
const hasMath = document.querySelector('.math, div.math, span.math') !== null;
const start = Date.now();
(function poll() {
  if (!hasMath) return document.fonts.ready.then(() => done('no math'));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise)
    return MathJax.startup.promise.then(() => document.fonts.ready).then(() => done('typeset'));
  if (Date.now() - start > 15000) return done('MathJax did not load');
  setTimeout(poll, 50);
})();
"""

# Returns one line per problem found on the page.
CHECK_PAGE = r"""
const problems = [];
const col = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
const colBox = col.getBoundingClientRect();
const colWidth = Math.round(colBox.width);
const px = (x) => Math.round(x);
const scrolls = (e) => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
function scrollBox(el) {
  for (let a = el.parentElement; a && a !== col.parentElement; a = a.parentElement) if (scrolls(a)) return a;
  return null;
}
function where(el) {
  const sec = el.closest('section');
  const h = sec && sec.querySelector('h1, h2, h3, h4');
  const title = h ? h.textContent.replace(/[#¶]/g, '').trim().slice(0, 70) : '(top)';
  return `[section "${title}"${sec && sec.id ? ' #' + sec.id : ''}]`;
}
const snippet = (el, n = 70) => JSON.stringify((el.textContent || el.getAttribute('src') || '').replace(/\s+/g, ' ').trim().slice(0, n));
function tex(m) {  // the TeX source of a typeset equation
  try { const items = MathJax.startup.document.getMathItemsWithin(m); if (items.length) return items[0].math.trim(); }
  catch (e) {}
  return '';
}
function sticksOut(r) { return r.right > colBox.right + 1 || r.left < colBox.left - 1; }
const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };

// Tables: wider than the column only inside a scroll box of their own.
for (const t of col.querySelectorAll('table')) {
  if (!visible(t)) continue;
  const r = t.getBoundingClientRect();
  if (sticksOut(r) && !scrollBox(t))
    problems.push(`table ${px(r.width)} px wide in a ${colWidth} px column, cut off (no scroll box) ${where(t)} ${snippet(t)}`);
}
// Plain-text outputs: must fit their box.
for (const pre of col.querySelectorAll('div.cell_output pre, div.output pre')) {
  if (!visible(pre)) continue;
  if (pre.scrollWidth > pre.clientWidth + 1) {
    const longest = pre.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
    problems.push(`text output ${pre.scrollWidth} px wide in a ${pre.clientWidth} px box, its right part hidden ` +
                  `(longest line ${longest.length} chars: ${JSON.stringify(longest.trim().slice(0, 60))}) ${where(pre)}`);
  }
}
// Display equations: must fit the column.
for (const m of col.querySelectorAll('mjx-container[display="true"]')) {
  if (!visible(m)) continue;
  const math = m.querySelector('mjx-math') || m;
  const w = math.getBoundingClientRect().width;
  if (w > m.clientWidth + 1 || w > colBox.width + 1)
    problems.push(`display equation ${px(w)} px wide in a ${px(Math.min(m.clientWidth, colBox.width))} px column, ` +
                  `cut off ${where(m)} ${JSON.stringify(tex(m).slice(0, 80))}`);
}
// Anything else that sticks out of the column without a scroll box (outermost element only).
for (const el of col.querySelectorAll('*')) {
  if (el.closest('mjx-container') || !visible(el)) continue;
  const r = el.getBoundingClientRect();
  if (!sticksOut(r) || scrollBox(el)) continue;
  const p = el.parentElement;
  if (p && p !== col && sticksOut(p.getBoundingClientRect()) && !scrolls(p)) continue;
  if (el.tagName === 'TABLE') continue;  // reported above
  problems.push(`<${el.tagName.toLowerCase()}${el.className ? ' class="' + el.className + '"' : ''}> sticks out of ` +
                `the column (${px(r.left - colBox.left)}..${px(r.right - colBox.left)} px of ${colWidth}) ${where(el)} ${snippet(el)}`);
}
if (document.documentElement.scrollWidth > window.innerWidth + 1)
  problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} px in a ${window.innerWidth} px window`);

// MathJax: no error, no raw TeX.
for (const e of document.querySelectorAll('mjx-merror'))
  problems.push(`MathJax error: ${JSON.stringify(e.getAttribute('data-mjx-error') || e.textContent)} ${where(e)}`);
for (const e of col.querySelectorAll('.math'))
  if (!e.querySelector('mjx-container') && !e.closest('mjx-container'))
    problems.push(`math left as raw TeX: ${snippet(e)} ${where(e)}`);
const RAW = /\$\$|\\begin\{|\\end\{|\\\(|\\\)|\\\[|\\\]|\$\\[A-Za-z]|\{(glue|cite|ref|doc|numref|eq)(:[a-z]+)?\}`?/;
const walker = document.createTreeWalker(col, NodeFilter.SHOW_TEXT, {
  acceptNode: (n) => (n.parentElement.closest('pre, code, script, style, mjx-container, textarea, .highlight, kbd') ?
                      NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT)});
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const m = n.textContent.match(RAW);
  if (m) {
    const i = n.textContent.indexOf(m[0]);
    problems.push(`raw markup ${JSON.stringify(m[0])} left in the text: ` +
                  `${JSON.stringify(n.textContent.slice(Math.max(0, i - 30), i + 40).trim())} ${where(n.parentElement)}`);
  }
}
// Glue: every pasted value has a value.
for (const g of col.querySelectorAll('.pasted-text, .pasted-inline, .pasted-math, div.pasted-output')) {
  const t = g.textContent.trim();
  if (t === '' || /^(nan|none|<na>|null|undefined)$/i.test(t))
    problems.push(`glued value is empty (${JSON.stringify(t)}) ${where(g)}`);
}
return problems;
"""


@pytest.mark.parametrize("page", PAGES)
def test_a_reader_at_1300_px_sees_every_table_output_and_equation_whole(browser, server, page):
    browser.get(f"{server}/{page}")
    state = browser.execute_async_script(WAIT_FOR_MATHJAX)
    problems = [] if state != "MathJax did not load" else ["MathJax did not load: equations stay raw TeX"]
    problems += browser.execute_script(CHECK_PAGE)
    assert not problems, f"{page} at {WIDTH} px: {len(problems)} problem(s)\n" + "\n".join(problems)


# Defects planted in a built page, one of each kind the checks above must report.
PLANT_DEFECTS = r"""
const done = arguments[arguments.length - 1];
const col = document.querySelector('article.bd-article');
const add = (html) => { const d = document.createElement('div'); d.innerHTML = html; col.appendChild(d); return d; };
add('<table style="width: 2000px"><tr><td>a table wider than the column</td></tr></table>');
add('<div class="cell_output"><div class="output"><pre>' + 'wide text output '.repeat(20) + '</pre></div></div>');
add('<p>raw markup: \\begin{aligned} left in the prose</p>');
add('<p>a glued value: <span class="pasted-text"></span></p>');
const bad = add('<div class="math notranslate">\\[ x^ \\]</div>');
const wide = add('<div class="math notranslate">\\[ ' + Array.from({length: 60}, (_, i) => 'x_{' + i + '}').join(' + ') + ' \\]</div>');
MathJax.typesetPromise([bad, wide]).then(() => done('ok'), (e) => done(String(e)));
"""


def test_the_page_checks_report_each_kind_of_defect(browser, server):
    """The checks are not vacuous: on a page with one planted defect of each kind, each is reported."""
    browser.get(f"{server}/00_methods.html")
    browser.execute_async_script(WAIT_FOR_MATHJAX)
    assert browser.execute_script(CHECK_PAGE) == [], "00_methods.html itself must be clean"
    browser.execute_async_script(PLANT_DEFECTS)
    report = "\n".join(browser.execute_script(CHECK_PAGE))
    for expected in ("table 2000 px wide", "text output", "raw markup", "glued value is empty", "MathJax error",
                     "display equation"):
        assert expected in report, f"{expected!r} not reported:\n{report}"


def test_the_link_check_reports_missing_files_anchors_and_linkified_file_names(tmp_path):
    (tmp_path / "b.html").write_text('<html><body><h1 id="top">B</h1></body></html>')
    (tmp_path / "a.html").write_text(
        '<html><body><p id="here">'
        '<a href="b.html#top">fine</a> <a href="#here">fine</a> <a href="https://example.org/x">external</a> '
        '<a href="b.html#gone">anchor</a> <a href="c.html">file</a> <a href="http://METHOD.md">linkified</a> '
        '<img src="_images/none.png"></p></body></html>')
    problems = link_problems(tmp_path, "a.html")
    assert len(problems) == 4, problems
    assert any("b.html has no element with id 'gone'" in p for p in problems)
    assert any("'c.html': no such file" in p for p in problems)
    assert any("http://METHOD.md" in p and "file name" in p for p in problems)
    assert any("_images/none.png" in p for p in problems)
