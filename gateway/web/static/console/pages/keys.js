/* Keys: the auth plugin's keys API (docs/console.md#keys). The keys database's keys can be
 * added (the secret shown once), revoked, rotated (a new secret shown once) and given
 * limits, a priority and models; the keys file's and env variables' are listed read-only. */
"use strict";
Console.register({
  id: "keys",
  title: "Keys",
  render(root, ctx) {
    const API = "/admin/api/keys";
    const LIMITS = [["requests_per_minute", "rpm", "requests/min"], ["tokens_per_minute", "tpm", "tokens/min"],
                    ["tokens_per_day", "tpd", "tokens/day"], ["tokens_per_month", "tpmo", "tokens/month"],
                    ["requests_per_day", "rpd", "requests/day"]];
    const el = ctx.el;
    let showRevoked = false;

    const number = (id, label, min, max) => el("label", {}, label + " ",
      el("input", {id, type: "number", min, max, step: 1, size: 8}));
    const value = (id) => document.getElementById(id).value.trim();
    const whole = (id) => (value(id) === "" ? null : Number(value(id)));
    const limitsOf = (prefix) => Object.fromEntries(LIMITS.map(([name, id]) => [name, whole(prefix + id)])
      .filter(([, v]) => v !== null));
    const modelsOf = (id) => value(id).split(",").map((m) => m.trim()).filter(Boolean);

    const secretBox = el("div", {id: "secret-box", class: "card", hidden: true});
    function showSecret(title, secret) {
      secretBox.replaceChildren(el("div", {class: "label"}, title),
        el("p", {}, "Copy it now: it is shown only this once (only its hash is stored)."),
        el("code", {id: "new-secret"}, secret), " ",
        el("button", {type: "button", onclick: () => { secretBox.hidden = true; secretBox.replaceChildren(); }},
          "Done"));
      secretBox.hidden = false;
    }

    const addForm = el("form", {id: "key-form", class: "card"},
      el("div", {class: "label"}, "New key (keys database)"),
      el("div", {class: "row"},
        el("label", {}, "Client ", el("input", {id: "new-client", required: true, maxlength: 64, size: 20})),
        el("label", {}, "Role ", el("select", {id: "new-role"}, el("option", {value: "user"}, "user"),
          el("option", {value: "admin"}, "admin"))),
        el("label", {}, "Models ", el("input", {id: "new-models", size: 24, placeholder: "all; or a,b"})),
        number("new-priority", "Priority", 0, 100), number("new-expires", "Expires in days", 1, 3650)),
      el("div", {class: "row"}, LIMITS.map(([, id, label]) => number("new-" + id, label, 1))),
      el("button", {type: "submit"}, "Add key"));
    addForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const made = await ctx.api("POST", API, {client: value("new-client"), role: value("new-role"),
          models: modelsOf("new-models"), limits: limitsOf("new-"), priority: whole("new-priority"),
          expires_days: whole("new-expires")});
        addForm.reset();
        showSecret(`New key ${made.key.key_id} for ${made.key.client}`, made.secret);
        ctx.error(null);
        await load();
      } catch (err) { ctx.error(err); }
    });

    const editBox = el("div", {id: "limits-box"});
    function edit(key) {
      const form = el("form", {id: "limits-form", class: "card"},
        el("div", {class: "label"}, `Limits of ${key.key_id} (${key.client}); empty: none`),
        el("div", {class: "row"}, LIMITS.map(([, id, label]) => number("edit-" + id, label, 1)),
          number("edit-priority", "Priority", 0, 100),
          el("label", {}, "Models ", el("input", {id: "edit-models", size: 24, placeholder: "all; or a,b"}))),
        el("button", {type: "submit"}, "Save"), " ",
        el("button", {type: "button", onclick: () => editBox.replaceChildren()}, "Cancel"));
      editBox.replaceChildren(form);
      LIMITS.forEach(([name, id]) => { document.getElementById("edit-" + id).value = key.limits[name] ?? ""; });
      document.getElementById("edit-priority").value = key.priority ?? "";
      document.getElementById("edit-models").value = key.models.join(", ");
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        try {
          await ctx.api("POST", API + "/limits", {key_id: key.key_id, limits: limitsOf("edit-"),
            priority: whole("edit-priority"), models: modelsOf("edit-models")});
          editBox.replaceChildren();
          ctx.error(null);
          await load();
        } catch (err) { ctx.error(err); }
      });
    }

    /* A button that asks for a second click (within 5 s) before it acts. */
    function confirmed(label, cls, act) {
      const button = el("button", {type: "button", class: cls}, label);
      let armed = null;
      button.addEventListener("click", async () => {
        if (!armed) {
          button.textContent = "Really " + label.toLowerCase() + "?";
          armed = setTimeout(() => { armed = null; button.textContent = label; }, 5000);
          return;
        }
        clearTimeout(armed);
        armed = null;
        button.disabled = true;
        try { await act(); ctx.error(null); await load(); } catch (err) { ctx.error(err); button.disabled = false; }
      });
      return button;
    }

    function actions(key) {
      if (key.read_only) return el("span", {class: "note"}, key.source === "env" ? "read-only (env)" : "read-only (file)");
      if (key.state !== "live") return "";
      return el("span", {class: "actions"},
        confirmed("Revoke", "revoke", () => ctx.api("POST", API + "/revoke", {key_id: key.key_id})),
        confirmed("Rotate", "rotate", async () => {
          const made = await ctx.api("POST", API + "/rotate", {key_id: key.key_id});
          showSecret(`New key ${made.key.key_id} for ${made.key.client} (replaces ${made.replaces})`, made.secret);
        }),
        el("button", {type: "button", class: "limits", onclick: () => edit(key)}, "Limits"));
    }

    const limitsText = (limits) => LIMITS.filter(([name]) => limits[name] !== undefined)
      .map(([name, , label]) => `${ctx.number(limits[name])} ${label}`).join(", ") || "-";
    const day = (iso) => (iso ? iso.slice(0, 16).replace("T", " ") : "");
    const state = (key) => (key.state === "live" && key.expires ? "expires " + day(key.expires)
      : key.state === "revoked" ? "revoked " + day(key.revoked) : key.state);

    const listBox = el("div", {id: "keys-list"});
    async function load() {
      const listed = await ctx.api("GET", API + (showRevoked ? "?all=true" : ""));
      const headers = ["key id", "client", "role", "source", "models", "limits", "priority", "created", "state", ""];
      const tableEl = ctx.table(headers, listed.data.map((k) => [k.key_id, k.client, k.role, k.source,
        k.models.length ? k.models.join(", ") : "all", limitsText(k.limits), k.priority ?? "-", day(k.created),
        state(k), actions(k)]));
      tableEl.id = "keys-table";
      tableEl.querySelectorAll("tbody tr").forEach((tr, i) => { tr.dataset.key = listed.data[i].key_id; });
      listBox.replaceChildren(tableEl);
      addForm.hidden = !listed.keys_db;
      note.textContent = listed.keys_db ? ""
        : "No keys database (the auth plugin's keys_db): keys are changed in the keys file (llamagate keys).";
    }

    const note = el("p", {class: "note"});
    const revokedBox = el("input", {type: "checkbox", id: "show-revoked"});
    revokedBox.addEventListener("change", () => { showRevoked = revokedBox.checked; load().catch(ctx.error); });
    root.append(el("h1", {}, "Keys"), note, secretBox, addForm, editBox,
      el("div", {class: "row"}, el("label", {}, revokedBox, " show revoked and expired keys")), listBox);
    ctx.every(30000, load);
  },
});
