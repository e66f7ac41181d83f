/* Usage: a stub until its page is written. */
"use strict";
Console.register({
  id: "usage",
  title: "Usage",
  render(root, ctx) {
    root.append(ctx.el("h1", {}, "Usage"), ctx.el("p", {class: "note"}, "Not written yet."));
  },
});
