/* Usage: tokens per day per key and per model, from the ledger (docs/console.md#usage):
 * charts of the biggest users and models, tables of every row, and the CSV download. */
"use strict";
Console.register({
  id: "usage",
  title: "Usage",
  render(root, ctx) {
    const API = "/admin/api/usage";
    const SERIES = 3;  // the biggest; the rest are summed as "others" (the chart has 4 colours)
    const el = ctx.el;
    let days = 30;

    /* Every day of the answer's range, as epoch ms (UTC midnight). */
    function dayList(answer) {
      const list = [];
      for (let t = Date.parse(answer.from + "T00:00:00Z"); t <= Date.parse(answer.to + "T00:00:00Z"); t += 864e5) {
        list.push(t);
      }
      return list;
    }

    /* Tokens per day of the SERIES biggest names (nameOf(row)) and of the others. */
    function series(answer, nameOf) {
      const totals = new Map();
      answer.data.forEach((r) => totals.set(nameOf(r), (totals.get(nameOf(r)) || 0) + r.total_tokens));
      const top = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, SERIES).map(([name]) => name);
      const others = totals.size > SERIES ? "others" : null;
      const perDay = new Map([...top, others].filter(Boolean).map((name) => [name, new Map()]));
      answer.data.forEach((r) => {
        const name = top.includes(nameOf(r)) ? nameOf(r) : others;
        const t = Date.parse(r.day + "T00:00:00Z");
        perDay.get(name).set(t, (perDay.get(name).get(t) || 0) + r.total_tokens);
      });
      return [...perDay.entries()].map(([name, values]) => ({name,
        points: dayList(answer).map((t) => [t, values.get(t) || 0])}));
    }

    const keyName = (r) => `${r.client} (${r.key_id || "no key"})`;
    const modelName = (r) => r.model ?? "(no model)";
    const keyChart = el("div", {id: "usage-keys-chart"});
    const modelChart = el("div", {id: "usage-models-chart"});
    const keyTable = el("div", {id: "usage-keys"});
    const modelTable = el("div", {id: "usage-models"});
    const range = el("span", {class: "meta", id: "usage-range"});
    const counts = (r) => [r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens];

    async function load() {
      const [byKey, byModel] = await Promise.all([ctx.api("GET", `${API}?days=${days}&by=key`),
                                                  ctx.api("GET", `${API}?days=${days}&by=model`)]);
      range.textContent = `${byKey.from} to ${byKey.to} (UTC days)`;
      ctx.chart(keyChart, series(byKey, keyName), {title: "Tokens per day per key", kind: "line", unit: "tokens",
                                                    axis: "day"});
      ctx.chart(modelChart, series(byModel, modelName), {title: "Tokens per day per model", kind: "line",
                                                          unit: "tokens", axis: "day"});
      const newest = (rows) => rows.slice().reverse();  // the latest day first
      const keys = ctx.table(["day", "client", "key id", "requests", "prompt", "completion", "total"],
        newest(byKey.data).map((r) => [r.day, r.client, r.key_id || "-", ...counts(r)]));
      keys.id = "usage-keys-table";
      keyTable.replaceChildren(el("h2", {}, "Per key"), byKey.data.length ? keys : el("p", {class: "note"}, "No usage."));
      const models = ctx.table(["day", "model", "requests", "prompt", "completion", "total"],
        newest(byModel.data).map((r) => [r.day, modelName(r), ...counts(r)]));
      models.id = "usage-models-table";
      modelTable.replaceChildren(el("h2", {}, "Per model"),
        byModel.data.length ? models : el("p", {class: "note"}, "No usage."));
    }

    const picker = el("select", {id: "usage-days"}, [7, 30, 90, 366].map((n) =>
      el("option", {value: n, selected: n === days}, n === 366 ? "a year" : `${n} days`)));
    picker.addEventListener("change", () => { days = Number(picker.value); load().catch(ctx.error); });
    const csv = el("button", {type: "button", id: "usage-csv"}, "Download CSV");
    csv.addEventListener("click", () => ctx.download(`${API}.csv?days=${days}`, `llamagate-usage-${days}d.csv`)
      .catch(ctx.error));
    root.append(el("h1", {}, "Usage"),
      el("div", {class: "row"}, el("label", {}, "Last ", picker), csv, range),
      el("div", {class: "charts"}, keyChart, modelChart), keyTable, modelTable);
    ctx.every(60000, load);
  },
});
