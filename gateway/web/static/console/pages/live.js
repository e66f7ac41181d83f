/* Live: every request in flight on every worker and host (GET /admin/api/live) with a
 * cancel button (POST /admin/api/requests/{id}/cancel), and the latest errors with their
 * request ids (GET /admin/api/errors). No prompt or answer is ever shown. */
"use strict";
Console.register({
  id: "live",
  title: "Live",
  render(root, ctx) {
    const {el} = ctx;
    const scope = el("p", {class: "meta", id: "live-scope"}, "loading…");
    const requests = el("div", {id: "live-requests"});
    const errors = el("div", {id: "live-errors"});
    const errorsScope = el("p", {class: "meta"});
    root.append(el("h1", {}, "Live requests"), scope, requests, el("h2", {}, "Latest errors"), errorsScope, errors);

    const where = (data) => data.scope === "gateway" ? "every worker of every host" :
      "this worker only (" + (data.shared === "unreachable" ? "the shared Redis is unreachable" : "no shared Redis") + ")";

    async function cancel(id, button) {
      button.disabled = true;
      try {
        await ctx.api("POST", `/admin/api/requests/${encodeURIComponent(id)}/cancel`);
        button.textContent = "cancelled";
      } catch (err) {
        ctx.error(err);
        button.disabled = false;
      }
    }

    ctx.every(2000, async () => {
      const [live, latest] = await Promise.all([ctx.api("GET", "/admin/api/live"), ctx.api("GET", "/admin/api/errors")]);
      scope.textContent = `${live.in_flight} in flight on ${where(live)} (${live.workers} worker(s)).`;
      const table = ctx.table(["", "request id", "client", "model", "route", "state", "stream", "age s", "bytes sent",
        "worker"], live.data.map((r) => [
          el("button", {type: "button", class: "cancel", onclick: (event) => cancel(r.request_id, event.target)}, "Cancel"),
          r.request_id, r.client ?? "-", r.model ?? "-", r.route,
          el("span", {class: r.waiting ? "loading" : "ok"}, r.waiting ? "waiting" : "running"), r.stream ? "yes" : "no",
          r.age_s.toFixed(1), ctx.number(r.bytes_out), r.worker]));
      table.querySelectorAll("tbody tr").forEach((tr, i) => tr.setAttribute("data-request-id", live.data[i].request_id));
      requests.replaceChildren(live.data.length ? table : el("p", {class: "note"}, "No request in flight."));
      errorsScope.textContent = `From ${where(latest)}, newest first.`;
      errors.replaceChildren(latest.data.length ? ctx.table(
        ["seconds ago", "status", "error", "route", "model", "client", "request id", "worker"],
        latest.data.map((e) => [e.age_s.toFixed(0), e.status, e.error, e.route, e.model ?? "-", e.client ?? "-",
          e.request_id, e.worker])) : el("p", {class: "note"}, "No error lately."));
    });
  },
});
