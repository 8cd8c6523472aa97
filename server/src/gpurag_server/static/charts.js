// Plain-SVG charts for the dashboard: a time-series line chart and a bar histogram.

const SVG = "http://www.w3.org/2000/svg";
const W = 560;
const H = 180;
const PAD = { left: 58, right: 12, top: 12, bottom: 26 };

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** An axis for values up to `max`: a "nice" step (1, 2, 2.5, 5 x 10^n) giving at most 5 intervals, and its top. */
export function niceScale(max) {
  const m = max > 0 ? max : 1;
  const power = 10 ** Math.floor(Math.log10(m / 5));
  for (const factor of [1, 2, 2.5, 5, 10, 20, 25, 50]) {
    const step = factor * power;
    if (m / step <= 5) return { step, top: Math.ceil(m / step - 1e-9) * step };
  }
  return { step: 100 * power, top: Math.ceil(m / (100 * power)) * 100 * power };
}

function gridLines(grid, { step, top }, y, format) {
  for (let i = 0; i * step <= top + step * 1e-6; i++) {
    const v = i * step;
    grid.append(svgEl("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    grid.append(svgEl("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, format(v)));
  }
}

function frame(svg, label) {
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  svg.replaceChildren();
}

/**
 * Draw `series` ([{name, cls, points: [[t, value|null], ...]}]) over t in [tMin, tMax] (seconds).
 * A null value breaks the line (no data then: disconnected or nothing to measure).
 * `format(v)` labels the y axis.
 */
export function lineChart(svg, series, { tMin, tMax, format = (v) => String(v), label = "chart", minTop = 0 }) {
  frame(svg, label);
  const values = series.flatMap((s) => s.points.map(([, v]) => v)).filter((v) => v !== null && Number.isFinite(v));
  const scale = niceScale(Math.max(minTop, ...values, 0));
  const top = scale.top;
  const x = (t) => PAD.left + ((t - tMin) / Math.max(tMax - tMin, 1e-9)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const grid = svgEl("g", { class: "grid" });
  gridLines(grid, scale, y, format);
  const span = tMax - tMin;
  const step = span > 240 ? 60 : span > 100 ? 30 : span > 50 ? 10 : 5;
  for (let ago = 0; ago <= span - step * 0.4; ago += step) {
    const t = tMax - ago;
    grid.append(svgEl("text", { x: x(t), y: H - 8, "text-anchor": "middle" }, ago === 0 ? "now" : `-${ago >= 60 && ago % 60 === 0 ? `${ago / 60} min` : `${ago} s`}`));
  }
  svg.append(grid);
  for (const s of series) {
    let path = "";
    let pen = false;
    let dots = 0;
    for (const [t, v] of s.points) {
      if (v === null || !Number.isFinite(v) || t < tMin) {
        pen = false;
        continue;
      }
      path += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
      dots += 1;
    }
    if (dots) svg.append(svgEl("path", { d: path, class: `line ${s.cls || ""}`, "data-series": s.name }));
  }
}

/** Draw bars for `bins` ([{label, value}]), labelled with their counts. */
export function barChart(svg, bins, { label = "histogram", xLabel = "" } = {}) {
  frame(svg, label);
  const scale = niceScale(Math.max(4, ...bins.map((b) => b.value)));
  const top = scale.top;
  const width = (W - PAD.left - PAD.right) / Math.max(bins.length, 1);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const grid = svgEl("g", { class: "grid" });
  gridLines(grid, scale, y, (v) => String(Math.round(v)));
  if (xLabel) grid.append(svgEl("text", { x: PAD.left - 6, y: H - 8, "text-anchor": "end" }, xLabel));
  svg.append(grid);
  bins.forEach((bin, i) => {
    const x0 = PAD.left + i * width;
    const bar = svgEl("rect", {
      x: x0 + width * 0.12,
      y: y(bin.value),
      width: width * 0.76,
      height: Math.max(H - PAD.bottom - y(bin.value), 0),
      class: "bar",
      "data-bin": bin.label,
      "data-count": bin.value,
    });
    bar.append(svgEl("title", {}, `${bin.label}: ${bin.value}`));
    svg.append(bar);
    svg.append(svgEl("text", { x: x0 + width / 2, y: H - 8, "text-anchor": "middle", class: "bin-label" }, bin.label));
    if (bin.value > 0) svg.append(svgEl("text", { x: x0 + width / 2, y: y(bin.value) - 3, "text-anchor": "middle", class: "bin-count" }, String(bin.value)));
  });
}
