"""What a person reading the page would notice, measured in the real browser: text cut off by its figure or its
box, text printed over other text, and frames with nothing drawn in them.

``problems(page)`` returns one line per defect (empty when the page reads cleanly). It looks at every visible
plotly figure (the bounding boxes of its SVG text nodes against the figure and against each other, and whether
any trace was drawn), every visible gradio label and every visible image frame.
"""
from __future__ import annotations

from typing import List

# Overlap is counted when two boxes share more than this fraction of the smaller one: glyph boxes of
# neighbouring tick labels may touch by a pixel without anyone noticing.
OVERLAP = 0.12

_CHECK = r"""
(overlap) => {
  const out = [];
  const shown = el => {
    for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.display === 'none' || s.visibility === 'hidden' || s.opacity === '0') return false;
    }
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const area = r => Math.max(0, r.width) * Math.max(0, r.height);
  const shared = (a, b) => Math.max(0, Math.min(a.right, b.right) - Math.max(a.left, b.left)) *
                           Math.max(0, Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top));
  const inside = (r, box) => r.left >= box.left - 1 && r.right <= box.right + 1 && r.top >= box.top - 1 &&
                             r.bottom <= box.bottom + 1;
  const where = el => { const e = el.closest('[id]'); return e ? '#' + e.id : el.tagName; };
  const overlaps = (items, name) => {
    for (let i = 0; i < items.length; i++)
      for (let j = i + 1; j < items.length; j++) {
        const [a, ra] = items[i], [b, rb] = items[j];
        if (shared(ra, rb) > overlap * Math.min(area(ra), area(rb)))
          out.push(`${name}: "${a.textContent.trim().slice(0, 40)}" overlaps "${b.textContent.trim().slice(0, 40)}"`);
      }
  };
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    if (!shown(plot)) continue;
    const name = where(plot.parentElement);
    const svg = plot.querySelector('.main-svg');
    const frame = (svg || plot).getBoundingClientRect();
    const block = (plot.closest('.block') || plot).getBoundingClientRect();
    const texts = [...plot.querySelectorAll('text')]
      .filter(t => !t.closest('.hoverlayer') && t.textContent.trim() && shown(t))
      .map(t => [t, t.getBoundingClientRect()]);
    for (const [t, r] of texts) {
      if (!inside(r, frame)) out.push(`${name}: "${t.textContent.trim().slice(0, 40)}" is clipped by its figure`);
      else if (!inside(r, block)) out.push(`${name}: "${t.textContent.trim().slice(0, 40)}" is clipped by its box`);
    }
    overlaps(texts, name);
    const drawn = plot.querySelectorAll('.heatmaplayer image, .imagelayer image, .scatterlayer path.js-line, ' +
                                        '.scatterlayer path.point, .barlayer path, .pielayer path').length;
    if (!drawn) out.push(`${name}: an empty figure frame (no trace drawn)`);
    if (!inside(frame, block)) out.push(`${name}: the figure is wider or taller than its box`);
  }
  const labels = [...document.querySelectorAll(
      '[data-testid="block-label"], [data-testid="block-info"], .output-class, [data-testid="label-output-value"] *')]
    .filter(l => shown(l) && l.textContent.trim() && l.children.length === 0 || (shown(l) && l.matches('[data-testid]')));
  for (const l of labels) {
    if (l.scrollWidth > l.clientWidth + 1 && getComputedStyle(l).overflow !== 'visible')
      out.push(`${where(l)}: label "${l.textContent.trim().slice(0, 40)}" is cut off`);
  }
  overlaps(labels.filter(l => l.children.length === 0).map(l => [l, l.getBoundingClientRect()]), 'labels');
  for (const label of document.querySelectorAll('[data-testid="block-label"]:not(.sr-only)')) {
    if (!shown(label)) continue;
    const r = label.getBoundingClientRect();
    for (const img of (label.closest('.block') || label.parentElement).querySelectorAll('img'))
      if (shown(img) && shared(r, img.getBoundingClientRect()) > 0)
        out.push(`${where(label)}: the label "${label.textContent.trim().slice(0, 40)}" covers the picture`);
  }
  for (const block of document.querySelectorAll('[data-testid="image"], .image-container')) {
    if (!shown(block)) continue;
    const img = block.querySelector('img');
    if (!img || !(img.complete && img.naturalWidth > 0)) out.push(`${where(block)}: an empty image frame`);
  }
  for (const plotBlock of document.querySelectorAll('.block')) {
    if (!shown(plotBlock) || !plotBlock.querySelector('[data-testid="plot"], .empty')) continue;
    if (plotBlock.querySelector('.empty') && shown(plotBlock.querySelector('.empty')))
      out.push(`${where(plotBlock)}: an empty frame`);
  }
  return [...new Set(out)];
}
"""


def problems(page) -> List[str]:
    """Every legibility defect on the page as the browser shows it now."""
    return page.evaluate(_CHECK, OVERLAP)


def page_height(page) -> int:
    return int(page.evaluate('document.documentElement.scrollHeight'))
