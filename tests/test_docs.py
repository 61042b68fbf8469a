"""The README stays a short front page, and the links of the README and docs/*.md all lead somewhere."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
CODE_SPAN = re.compile(r'`[^`]*`')


def prose_lines(path: Path):
    """The lines of a markdown file outside fenced code blocks and the YAML front matter."""
    lines = path.read_text().splitlines()
    fence = None
    start = 0
    if lines and lines[0].strip() == '---':  # front matter: up to the next '---'
        start = next((i + 1 for i in range(1, len(lines)) if lines[i].strip() == '---'), 0)
    for line in lines[start:]:
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ('```', '~~~'):
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            yield line


def links(path: Path):
    """Every markdown link target of ``path`` (a link may wrap over lines). Code spans are dropped first (text
    in backticks is no link), except inside a link's text, as in [`docs/method.md`](docs/method.md)."""
    text = '\n'.join(prose_lines(path))

    def code(m: re.Match) -> str:
        in_link_text = text[m.start() - 1:m.start()] == '[' or text[m.end():m.end() + 1] == ']'
        return 'code' if in_link_text else ''
    return LINK.findall(CODE_SPAN.sub(code, text))


def is_external(target: str) -> bool:
    return re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I) is not None  # http:, https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip())  # a link in a heading keeps its text
    text = re.sub(r'[^\w\- ]', '', text.lower())
    return text.replace(' ', '-')


def anchors(path: Path) -> set:
    seen = {}
    found = set()
    for line in prose_lines(path):
        m = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f'{base}-{n}')
    return found


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f'README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in links(page):
        if is_external(target) or target.startswith('#'):
            continue
        file = target.split('#')[0]
        if not (page.parent / file).exists():
            broken.append(target)
    assert not broken, f'{page.name}: links to missing files: {broken}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_names_a_heading_of_its_page(page):
    broken = []
    for target in links(page):
        if is_external(target) or '#' not in target:
            continue
        file, anchor = target.split('#', 1)
        dest = (page.parent / file) if file else page
        if dest.suffix == '.md' and dest.exists() and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f'{page.name}: anchors that name no heading: {broken}'


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.split('#')[0]).resolve() for t in links(README) if not is_external(t)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f'README.md does not link these docs pages: {missing}'


def test_the_readme_keeps_the_space_front_matter():
    """The Hugging Face Space reads its config from the README's front matter; bench/rehearse_space.py too."""
    text = README.read_text()
    assert text.startswith('---\n'), 'the front matter must open the README'
    spec = importlib.util.spec_from_file_location('rehearse_space', ROOT / 'bench' / 'rehearse_space.py')
    rehearse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearse)
    meta = rehearse.front_matter(README)
    assert meta['sdk'] == 'gradio' and meta['app_file'] == 'app.py', meta
    assert meta['title'] == 'GQA Lens' and re.fullmatch(r'3\.\d+', meta['python_version']), meta
    assert {'sdk_version', 'short_description', 'license'} <= set(meta), meta


def test_the_readme_library_example_runs(tmp_path):
    """The README's ten lines run as written (random weights instead of the Hub's, a temporary folder): a renamed
    function in them fails here, not in a reader's hands."""
    text = (ROOT / 'README.md').read_text()
    section = text.split('## The library in ten lines', 1)[1]
    code = section.split('```python', 1)[1].split('```', 1)[0]
    code = code.replace('pretrained=True', 'pretrained=False').replace("'out/vit-s-kdgqa'", repr(str(tmp_path / 'm')))
    exec(compile(code, 'README.md', 'exec'), {})
