/* Llamagate operator console: the shell (docs/console.md).
 *
 * Adding a page:
 *   1. Write gateway/web/static/console/pages/<id>.js calling
 *        Console.register({id: "<id>", title: "<Nav title>", render(root, ctx) { ... }});
 *      render builds the page into `root` (an empty <div>) with ctx.el, never innerHTML;
 *      it is called again each time the page is opened (#/<id>).
 *   2. Add <script defer src="/admin/assets/pages/<id>.js"></script> to index.html (nav order
 *      is script order). The server serves every file of the console folder by its name.
 * Adding an API route:
 *   - a core page: a method of ConsoleApiResource (gateway/web/console.py) and one
 *     app.add_route line in gateway/web/app.py (admin keys only, through serve_admin);
 *   - a plugin's page (keys, usage): a plugin route under /admin/api/... that the plugin
 *     answers from its `request` hook (declared under `routes:` with the admin pipeline,
 *     like the ledger's /admin/usage); it must answer 403 to a non-admin principal.
 *
 * ctx, what render gets:
 *   ctx.api(method, path, body?) -> Promise<parsed JSON>: sends the admin key as
 *       `Authorization: Bearer`; on a non-2xx answer throws an Error whose message is the
 *       OpenAI error's message, with .status and .code. A 401/403 signs the tab out.
 *   ctx.el(tag, attrs, ...children) -> Element: attrs are set as attributes (on* functions
 *       as listeners; href only relative), children are Nodes or text (never parsed as HTML).
 *   ctx.chart(container, series, options): a time-series chart (SVG) into container;
 *       series: [{name, points: [[epochMs, value|null], ...]}], options: {title, kind:
 *       "line"|"bar", unit, height, axis: "time" (default: hh:mm) | "day" (UTC YYYY-MM-DD)}.
 *   ctx.table(headers, rows) -> <table>: rows of cells (text or Nodes).
 *   ctx.download(path, filename): GET path with the key, saved as a file (a CSV).
 *   ctx.events(path, body, onEvent, signal?) -> Promise: POSTs body (a streaming request)
 *       and calls onEvent(parsed data) for each server-sent event until [DONE] or the end;
 *       an AbortSignal stops it.
 *   ctx.number(n) -> string: a count or a measure, short ("12.3", "45k", "-" for null).
 *   ctx.every(ms, fn): calls fn now and every ms while this page is open; returns nothing.
 *   ctx.error(err|null): shows (or clears) an error above the page.
 */
"use strict";

const Console = (() => {
  const KEY = "llamagate-admin-key";
  const SVG = "http://www.w3.org/2000/svg";
  const pages = [];
  let timers = [];
  let generation = 0;  // bumped on every page change: late answers of the old page are dropped
  const $ = (id) => document.getElementById(id);

  function key() { return sessionStorage.getItem(KEY); }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach((c) => append(node, c)); return; }
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }

  function build(ns, tag, attrs, children) {
    const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on") && typeof value === "function") {
        node.addEventListener(name.slice(2), value);
      } else if (name === "href" && !/^[#/?]/.test(String(value)) ) {
        throw new Error("el: only relative links");
      } else if (name.startsWith("on") || name === "style" || name === "srcdoc") {
        throw new Error("el: attribute " + name + " is not allowed");
      } else {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    append(node, children);
    return node;
  }

  function el(tag, attrs, ...children) { return build(null, tag, attrs, children); }

  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  async function request(method, path, body, raw, signal) {
    const headers = {Authorization: "Bearer " + key()};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                    credentials: "omit", cache: "no-store", signal});
    if (resp.ok && raw) return resp;
    let data = null;
    try { data = await resp.json(); } catch (err) { data = null; }
    if (!resp.ok) {
      const error = data && data.error ? data.error : {};
      const failure = new ApiError(error.message || ("HTTP " + resp.status), resp.status, error.code || null);
      if (resp.status === 401 || (resp.status === 403 && failure.code === "admin_required")) signOut(failure.message);
      throw failure;
    }
    return data;
  }

  function api(method, path, body) { return request(method, path, body, false); }

  async function download(path, filename) {
    const resp = await request("GET", path, undefined, true);
    const url = URL.createObjectURL(await resp.blob());
    const link = el("a", {href: "#", download: filename});
    link.href = url;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function events(path, body, onEvent, signal) {
    const resp = await request("POST", path, body, true, signal);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") return;
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  function table(headers, rows) {
    return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
  }

  function number(value) {
    if (value === null || value === undefined) return "-";
    const abs = Math.abs(value);
    if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (abs >= 1e4) return (value / 1e3).toFixed(0) + "k";
    return abs >= 100 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(1);
  }

  /* A small SVG chart: lines (or bars for the first series) over time. */
  function chart(container, series, options) {
    const opts = Object.assign({title: "", kind: "line", unit: "", height: 160}, options || {});
    const width = 600, height = opts.height, left = 44, right = 8, top = 8, bottom = 20;
    const points = series.flatMap((s) => s.points);
    const times = points.map((p) => p[0]);
    const values = points.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
    const t0 = times.length ? Math.min(...times) : Date.now() - 3600e3;
    const t1 = times.length ? Math.max(...times) : Date.now();
    const vmax = Math.max(1e-9, ...values) * 1.1;
    const x = (t) => left + (t1 === t0 ? 0 : (t - t0) / (t1 - t0)) * (width - left - right);
    const y = (v) => top + (1 - v / vmax) * (height - top - bottom);
    const moment = (t) => (opts.axis === "day" ? new Date(t).toISOString().slice(0, 10)
      : new Date(t).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}));
    const svg = build(SVG, "svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.title}, [
      build(SVG, "line", {class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0)}, []),
      build(SVG, "line", {class: "axis", x1: left, y1: top, x2: left, y2: y(0)}, []),
      build(SVG, "text", {x: left - 4, y: top + 8, "text-anchor": "end"}, [number(vmax / 1.1)]),
      build(SVG, "text", {x: left - 4, y: y(0), "text-anchor": "end"}, ["0"]),
      build(SVG, "text", {x: left, y: height - 4}, [moment(t0)]),
      build(SVG, "text", {x: width - right, y: height - 4, "text-anchor": "end"}, [moment(t1)]),
    ]);
    const slots = series.length && series[0].points.length ? series[0].points.length : 60;
    const step = (width - left - right) / slots;
    series.forEach((s, i) => {
      const cls = "s" + (i % 4);
      const shown = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
      if (opts.kind === "bar") {  // side by side within a time step
        const w = Math.max(1, (step * 0.8) / series.length);
        shown.forEach(([t, v]) => {
          if (!v) return;
          svg.appendChild(build(SVG, "rect", {class: cls, x: x(t) - step * 0.4 + i * w, y: y(v), width: w, height: y(0) - y(v)},
            [build(SVG, "title", {}, [s.name + ": " + number(v)])]));
        });
      } else {
        const line = shown.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
        if (shown.length > 1) svg.appendChild(build(SVG, "polyline", {class: cls, points: line}, []));
        shown.forEach(([t, v]) => svg.appendChild(build(SVG, "circle", {class: cls, cx: x(t), cy: y(v), r: 2.5},
          [build(SVG, "title", {}, [s.name + ": " + number(v)])])));
      }
    });
    const legend = el("div", {class: "legend"}, series.map((s, i) => el("span", {},
      el("span", {class: "swatch s" + (i % 4)}), s.name + (opts.unit ? " (" + opts.unit + ")" : ""))));
    container.replaceChildren(el("div", {class: "chart"}, el("div", {class: "title"}, opts.title), svg, legend));
    return svg;
  }

  function showError(err) {
    $("error").textContent = err ? (err.message || String(err)) : "";
  }

  function context(mine) {
    const live = () => mine === generation;
    return {
      api: (method, path, body) => api(method, path, body).then((data) => {
        if (!live()) throw new Error("page closed");
        return data;
      }),
      el, chart, table, download, events, number,
      error: (err) => { if (live()) showError(err); },
      every(ms, fn) {
        const run = async () => {
          if (!live()) return;
          try { await fn(); showError(null); } catch (err) { if (live() && err.message !== "page closed") showError(err); }
        };
        run();
        timers.push(setInterval(run, ms));
      },
    };
  }

  function route() {
    timers.forEach(clearInterval);
    timers = [];
    generation += 1;
    if (!key()) { signOut(""); return; }
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    const id = (location.hash.match(/^#\/([\w-]+)/) || [])[1];
    const page = pages.find((p) => p.id === id) || pages[0];
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page.id));
    document.title = page.title + " · Llamagate console";
    showError(null);
    const root = el("div", {id: "page-" + page.id});
    $("page").replaceChildren(root);
    try {
      const done = page.render(root, context(generation));
      if (done && typeof done.catch === "function") done.catch((err) => showError(err));
    } catch (err) {
      showError(err);
    }
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    timers.forEach(clearInterval);
    timers = [];
    generation += 1;
    $("main").hidden = true;
    $("logout").hidden = true;
    $("page").replaceChildren();
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  function start() {
    $("nav").replaceChildren(...pages.map((p) => el("a", {href: "#/" + p.id, "data-page": p.id}, p.title)));
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("key").value.trim());
      $("key").value = "";
      $("login-error").textContent = "";
      route();
    });
    $("logout").addEventListener("click", () => signOut(""));
    window.addEventListener("hashchange", route);
    route();
  }

  document.addEventListener("DOMContentLoaded", start);

  return {
    register(page) {
      if (!page || !/^[\w-]+$/.test(page.id) || typeof page.render !== "function") throw new Error("Console.register: bad page");
      pages.push(page);
    },
  };
})();
