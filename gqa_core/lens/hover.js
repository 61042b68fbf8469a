// GQA Lens page script (gr.HTML js_on_load): draws the hovered patch's maps from data the server sent once,
// and routes the other ways of picking -- a click on the hover picture, a click on a geometry point, the arrow
// keys -- into the query box, whose Enter re-renders the picked view. Installed once per page.
(() => {
  if (window.gqaLens) return;
  const lens = window.gqaLens = {};

  lens.setQuery = (text, add) => {
    const box = document.querySelector('#query textarea, #query input');
    if (!box) return;
    const old = box.value.trim();
    box.value = add && old ? `${old}; ${text}` : text;
    box.dispatchEvent(new Event('input', { bubbles: true }));
    for (const type of ['keydown', 'keypress']) {
      box.dispatchEvent(new KeyboardEvent(type, { key: 'Enter', code: 'Enter', keyCode: 13, bubbles: true }));
    }
  };
  const adding = () => !!document.querySelector('#pick-add input:checked');

  const decode = (root) => {
    const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return { src: root.dataset.maps, maps: bytes(root.dataset.maps), lut: bytes(root.dataset.lut),
             layout: JSON.parse(root.dataset.layout) };
  };

  lens.draw = (root, row, col, what = 'hovered') => {
    const [rows, cols] = root.dataset.grid.split(',').map(Number);
    if (!root._gqa || root._gqa.src !== root.dataset.maps) root._gqa = decode(root);
    const { maps, lut, layout } = root._gqa;
    const P = rows * cols, p = row * cols + col;
    const canvas = root.querySelector('.gqa-hover-tiles');
    const frame = root.querySelector('.gqa-hover-frame');
    const avail = Math.max(120, (root.clientWidth || Number(root.dataset.width)) - frame.offsetWidth - 14);
    const widest = Math.max(...layout.map((g) => g.length));
    const gap = 6, label = 13;
    const perLine = Math.min(layout.length, Math.max(1, Math.floor(Math.floor(avail / 28) / widest)));
    const tile = Math.min(64, Math.floor((avail - gap * (perLine - 1)) / (perLine * widest)));  // 28-64 px
    const tileH = Math.max(1, Math.round(tile * rows / cols));
    const lines = Math.ceil(layout.length / perLine);
    canvas.width = perLine * widest * tile + gap * (perLine - 1);
    canvas.height = lines * (tileH + label + gap);
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = false;
    const off = document.createElement('canvas');
    off.width = cols; off.height = rows;
    const offCtx = off.getContext('2d');
    const image = offCtx.createImageData(cols, rows);
    ctx.font = '11px sans-serif';
    ctx.fillStyle = getComputedStyle(root).color || '#333';
    layout.forEach((heads, g) => {
      const x0 = (g % perLine) * (widest * tile + gap), y0 = Math.floor(g / perLine) * (tileH + label + gap);
      heads.forEach((h, i) => {
        const start = (h * P + p) * P;
        for (let j = 0; j < P; j++) {
          const v = maps[start + j] * 3;
          image.data.set([lut[v], lut[v + 1], lut[v + 2], 255], j * 4);
        }
        offCtx.putImageData(image, 0, 0);
        ctx.drawImage(off, x0 + i * tile, y0 + label, tile - 2, tileH);
        ctx.fillText(`q${h}`, x0 + i * tile, y0 + 10);
      });
    });
    const cell = root.querySelector('.gqa-hover-cell');
    const picture = root.querySelector('.gqa-hover-picture');
    const w = picture.clientWidth / cols, hgt = picture.clientHeight / rows;
    Object.assign(cell.style, { left: `${col * w}px`, top: `${row * hgt}px`, width: `${w}px`, height: `${hgt}px` });
    root.querySelector('.gqa-hover-readout').textContent =
      `${what}: patch (row ${row}, column ${col}), layer ${root.dataset.layer}`;
    root.dataset.shown = `${row},${col}`;
  };

  const at = (root, event) => { // the pointer as fractions of the picture, and the cell it is in
    const [rows, cols] = root.dataset.grid.split(',').map(Number);
    const box = root.querySelector('.gqa-hover-picture').getBoundingClientRect();
    const fx = Math.min(Math.max((event.clientX - box.left) / box.width, 0), 1);
    const fy = Math.min(Math.max((event.clientY - box.top) / box.height, 0), 1);
    return { fx, fy, row: Math.min(Math.floor(fy * rows), rows - 1), col: Math.min(Math.floor(fx * cols), cols - 1) };
  }; // y picks the row, x the column

  document.addEventListener('mousemove', (event) => {
    const picture = event.target.closest && event.target.closest('.gqa-hover-picture');
    if (!picture) return;
    const root = picture.closest('.gqa-hover');
    const { row, col } = at(root, event);
    if (root.dataset.shown !== `${row},${col}`) lens.draw(root, row, col);
  });
  document.addEventListener('click', (event) => { // the place itself, as a click on the picture seen gives it
    const picture = event.target.closest && event.target.closest('.gqa-hover-picture');
    if (!picture) return;
    const { fx, fy } = at(picture.closest('.gqa-hover'), event);
    lens.setQuery(`${fx.toFixed(4)}, ${fy.toFixed(4)}`, adding());
  });

  const KEYS = { ArrowLeft: 'left', ArrowRight: 'right', ArrowUp: 'up', ArrowDown: 'down' };
  document.addEventListener('keydown', (event) => {
    const where = KEYS[event.key];
    const active = document.activeElement;
    if (!where || event.altKey || event.ctrlKey || event.metaKey) return;
    if (active && (/^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName) || active.isContentEditable)) return;
    const button = document.querySelector(`#pick-${where}`);
    if (!button || !button.offsetParent) return; // the picked views are not shown
    event.preventDefault();
    button.click();
  });

  const bind = (plot) => {
    if (plot._gqaBound || typeof plot.on !== 'function') return;
    plot._gqaBound = true;
    plot.on('plotly_click', (data) => {
      const point = data && data.points && data.points[0];
      if (point && typeof point.customdata === 'string') lens.setQuery(point.customdata, adding());
    });
  };
  new MutationObserver(() => document.querySelectorAll('[id^="figure-"] .js-plotly-plot').forEach(bind))
    .observe(document.body, { childList: true, subtree: true });

  lens.first = (root) => {
    const [row, col] = root.dataset.start.split(',').map(Number);
    lens.draw(root, row, col, root.dataset.picked === '1' ? 'picked' : 'centre patch');
  };
})();
