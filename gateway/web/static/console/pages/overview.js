/* Overview: the last hour's traffic per minute as charts, and per backend its slots busy
 * and queued (GET /admin/api/overview). */
"use strict";
Console.register({
  id: "overview",
  title: "Overview",
  render(root, ctx) {
    const {el} = ctx;
    const scope = el("p", {class: "meta", id: "overview-scope"}, "loading…");
    const cards = el("div", {class: "cards", id: "overview-cards"});
    const charts = {};
    const grid = el("div", {class: "charts"});
    for (const id of ["requests", "tokens", "first-byte", "queue"]) {
      charts[id] = el("div", {id: "chart-" + id});
      grid.append(charts[id]);
    }
    const backends = el("div", {id: "overview-backends"});
    root.append(el("h1", {}, "Overview"), scope, cards, grid, el("h2", {}, "Backends"), backends);

    const card = (label, value, id) => el("div", {class: "card"}, el("div", {class: "label"}, label),
      el("div", {class: "value", id: "card-" + id}, value));
    const series = (minutes, name, field) => ({name, points: minutes.map((m) => [m.at * 1000, m[field]])});

    ctx.every(5000, async () => {
      const data = await ctx.api("GET", "/admin/api/overview");
      scope.textContent = data.scope === "gateway"
        ? `Every worker: ${data.workers} worker(s) on ${data.hosts} host(s), through the shared Redis.`
        : "This worker only (" + (data.shared === "unreachable" ? "the shared Redis is unreachable" : "no shared Redis") +
          "): each worker counts its own.";
      const m = data.minutes;
      const hour = data.hour;
      cards.replaceChildren(card("requests (1 h)", ctx.number(hour.requests), "requests"),
        card("errors (1 h)", ctx.number(hour.errors), "errors"),
        card("tokens (1 h)", ctx.number(hour.prompt_tokens + hour.completion_tokens), "tokens"),
        card("in flight", ctx.number(data.in_flight), "in-flight"));
      ctx.chart(charts.requests, [series(m, "requests", "requests"), series(m, "errors", "errors")],
        {title: "Requests and errors per minute", kind: "bar"});
      ctx.chart(charts.tokens, [series(m, "completion", "completion_tokens"), series(m, "prompt", "prompt_tokens")],
        {title: "Tokens per minute", kind: "bar"});
      ctx.chart(charts["first-byte"], [series(m, "first byte (first token of a stream)", "first_byte_ms")],
        {title: "Time to first token, mean per minute", unit: "ms"});
      ctx.chart(charts.queue, [series(m, "queue wait", "queue_ms")], {title: "Admission queue wait, mean per minute", unit: "ms"});
      backends.replaceChildren(ctx.table(["backend", "ready", "slots", "limit", "busy", "queued"],
        Object.entries(data.backends).map(([name, b]) => [name, el("span", {class: b.ready ? "ok" : "bad"}, b.ready ? "yes" : "no"),
          b.slots || "?", b.admission === "redis" ? b.limit : b.limit + " per worker", b.busy, b.queued])));
    });
  },
});
