/* Models: the fleet's launched models (GET /admin/models) with load and unload buttons
 * (POST /admin/models/{backend}/load|unload, which answer once done), and a playground
 * that streams a chat from a model with the admin key (POST /v1/chat/completions). */
"use strict";
Console.register({
  id: "models",
  title: "Models",
  render(root, ctx) {
    const {el} = ctx;
    const summary = el("p", {class: "meta", id: "models-summary"}, "loading…");
    const list = el("div", {id: "models-table"});
    const busy = new Set();  // backends with a load or unload under way
    const mib = (bytes) => bytes ? (bytes / 1048576).toFixed(0) : "-";

    const model = el("select", {id: "play-model"});
    const prompt = el("textarea", {id: "play-prompt", rows: 3}, "Say hello in five words.");
    const maxTokens = el("input", {id: "play-max", type: "number", min: 1, max: 4096, value: 64});
    const send = el("button", {id: "play-send", type: "submit"}, "Send");
    const stop = el("button", {id: "play-stop", type: "button", disabled: true}, "Stop");
    const output = el("div", {class: "stream", id: "play-output"});
    const outcome = el("p", {class: "meta", id: "play-outcome"});
    let controller = null;
    const form = el("form", {id: "playground"}, el("div", {class: "row"}, el("label", {}, "Model ", model),
      el("label", {}, "max tokens ", maxTokens)), prompt, el("div", {class: "row"}, send, stop), output, outcome);
    root.append(el("h1", {}, "Models"), summary, list, el("h2", {}, "Playground"),
      el("p", {class: "note"}, "Sends a chat with the admin key and shows the answer as it streams."), form);

    async function act(backend, action) {
      busy.add(backend);
      await refresh();
      try {
        await ctx.api("POST", `/admin/models/${encodeURIComponent(backend)}/${action}`);
      } catch (err) {
        ctx.error(err);
      } finally {
        busy.delete(backend);
        await refresh();
      }
    }

    async function refresh() {
      const fleet = await ctx.api("GET", "/admin/models");
      const models = Object.entries(fleet.models || {});
      summary.textContent = models.length === 0 ? "This gateway launches no models (see fleet.md)." :
        `${fleet.resident} resident of ${models.length}; memory budget ` +
        (fleet.memory_budget ? mib(fleet.memory_budget) + " MiB" : "none") + `; ${fleet.swaps} swap(s).`;
      const table = ctx.table(["backend", "models", "state", "memory MiB (rss / est.)", "last load s", "loads",
        "restarts", "in flight", "queued", "last error", ""], models.map(([name, m]) => [
        name, m.models.join(", "), el("span", {class: "state " + m.state}, busy.has(name) ? m.state + " …" : m.state),
        mib(m.resident_bytes) + " / " + mib(m.memory_estimate), m.last_load_seconds ?? "-", m.loads, m.restarts,
        m.in_flight, m.queued,
        m.last_error ? el("details", {}, el("summary", {}, m.last_error.split("\n")[0]), el("pre", {}, m.last_error))
          : (m.reason || ""),
        el("span", {class: "row"},
          el("button", {type: "button", class: "load", disabled: busy.has(name) || m.state === "ready",
                        onclick: () => act(name, "load")}, "Load"),
          el("button", {type: "button", class: "unload", disabled: busy.has(name) || m.state === "stopped",
                        onclick: () => act(name, "unload")}, "Unload")),
      ]));
      table.querySelectorAll("tbody tr").forEach((tr, i) => tr.setAttribute("data-backend", models[i][0]));
      list.replaceChildren(table);
      if (!model.options.length) {
        let ids = models.flatMap(([, m]) => m.models);
        try {
          ids = (await ctx.api("GET", "/v1/models")).data.map((m) => m.id);
        } catch (err) { /* /v1/models is not routed here: the fleet's models */ }
        model.replaceChildren(...ids.map((id) => el("option", {value: id}, id)));
      }
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      controller = new AbortController();
      send.disabled = true;
      stop.disabled = false;
      output.textContent = "";
      outcome.textContent = "waiting for the first token…";
      const started = performance.now();
      let first = null;
      let usage = null;
      try {
        await ctx.events("/v1/chat/completions", {model: model.value, stream: true,
          max_tokens: Number(maxTokens.value) || 64, stream_options: {include_usage: true},
          messages: [{role: "user", content: prompt.value}]}, (data) => {
          if (data.error) throw new Error(data.error.message);
          const delta = data.choices && data.choices[0] && data.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now() - started;
            output.append(delta.content);
          }
          if (data.usage) usage = data.usage;
        }, controller.signal);
        outcome.textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s; first token after ` +
          (first === null ? "-" : first.toFixed(0) + " ms") + (usage ? `; ${usage.completion_tokens} tokens` : "");
      } catch (err) {
        outcome.textContent = err.name === "AbortError" ? "stopped" : "failed: " + err.message;
      } finally {
        send.disabled = false;
        stop.disabled = true;
        controller = null;
      }
    });
    stop.addEventListener("click", () => controller && controller.abort());

    ctx.every(3000, refresh);
  },
});
