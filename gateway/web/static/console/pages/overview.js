/* Overview: the last hour's traffic as charts, and per backend its slots busy and queued. */
"use strict";
Console.register({
  id: "overview",
  title: "Overview",
  render(root, ctx) {
    const {el} = ctx;
    const scope = el("p", {class: "meta", id: "overview-scope"}, "loading…");
    const backends = el("div", {id: "overview-backends"});
    root.append(el("h1", {}, "Overview"), scope, el("h2", {}, "Backends"), backends);
    ctx.every(5000, async () => {
      const data = await ctx.api("GET", "/admin/api/overview");
      scope.textContent = data.workers + " worker(s) on " + data.hosts + " host(s); shared redis: " + data.shared;
      backends.replaceChildren(ctx.table(["backend", "slots", "limit", "busy", "queued"],
        Object.entries(data.backends).map(([name, b]) => [name, b.slots, b.limit, b.busy, b.queued])));
    });
  },
});
