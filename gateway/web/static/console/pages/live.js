/* Live: a stub until its page is written. */
"use strict";
Console.register({
  id: "live",
  title: "Live",
  render(root, ctx) {
    root.append(ctx.el("h1", {}, "Live"), ctx.el("p", {class: "note"}, "Not written yet."));
  },
});
