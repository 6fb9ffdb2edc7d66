// Formatting of the figures, and the chart of tokens and state size over time (canvas 2D, drawn by hand).

const POINTS = 400; // beyond this, every other point goes

export function bytes(n) {
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

export function seconds(t) {
  return t === null ? "–" : `${t.toFixed(2)} s`;
}

export class Chart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = []; // [seconds since the page opened, tokens, state bytes]
    this.updates = 0;
    this.start = performance.now();
  }

  reset() {
    this.points = [];
    this.updates = 0;
    this.draw();
  }

  add(tokens, state) {
    this.updates += 1;
    this.points.push([(performance.now() - this.start) / 1000, tokens, state]);
    if (this.points.length > POINTS) this.points = this.points.filter((_, i) => i % 2 === 0);
    this.draw();
  }

  // Tokens on the left scale, state bytes on the right one; each scale starts at zero, so a flat line is flat.
  draw() {
    const g = this.canvas.getContext("2d");
    const { width: w, height: h } = this.canvas;
    const pad = { left: 64, right: 76, top: 22, bottom: 24 };
    g.clearRect(0, 0, w, h);
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = "#1c2733";
    g.strokeStyle = "#c5ccd3";
    g.lineWidth = 1;
    g.strokeRect(pad.left, pad.top, w - pad.left - pad.right, h - pad.top - pad.bottom);
    const pts = this.points;
    if (!pts.length) {
      g.fillText("tokens and state size appear here as frames arrive", pad.left + 10, h / 2);
      return;
    }
    const t0 = pts[0][0];
    const t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
    const maxTokens = Math.max(...pts.map((p) => p[1]), 1);
    const maxState = Math.max(...pts.map((p) => p[2]), 1) * 1.25;
    const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (w - pad.left - pad.right);
    const y = (v, max) => h - pad.bottom - (v / max) * (h - pad.top - pad.bottom);
    const line = (index, max, colour) => {
      g.strokeStyle = colour;
      g.lineWidth = 2;
      g.beginPath();
      pts.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[index], max)) : g.moveTo(x(p[0]), y(p[index], max))));
      if (pts.length === 1) g.lineTo(x(pts[0][0]) + 2, y(pts[0][index], max));
      g.stroke();
    };
    line(1, maxTokens, "#1f5fbf");
    line(2, maxState, "#c2410c");
    g.fillStyle = "#1f5fbf";
    g.textAlign = "right";
    g.fillText(maxTokens.toLocaleString("en"), pad.left - 6, pad.top + 10);
    g.fillText("0", pad.left - 6, h - pad.bottom);
    g.fillText("tokens", pad.left - 6, h / 2);
    g.fillStyle = "#c2410c";
    g.textAlign = "left";
    g.fillText(bytes(maxState / 1.25), w - pad.right + 6, y(maxState / 1.25, maxState) + 4);
    g.fillText("0", w - pad.right + 6, h - pad.bottom);
    g.fillText("state size", w - pad.right + 6, h / 2 + 20);
    g.fillStyle = "#4a5561";
    g.fillText("0 s", pad.left, h - 6);
    g.textAlign = "right";
    g.fillText(`${(t1 - t0).toFixed(0)} s`, w - pad.right, h - 6);
    const last = pts[pts.length - 1];
    this.canvas.setAttribute(
      "aria-label",
      `chart: tokens ${last[1]} after ${(t1 - t0).toFixed(0)} seconds; state size ${bytes(last[2])}`,
    );
  }
}
