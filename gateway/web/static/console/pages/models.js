/* Models: a stub until its page is written. */
"use strict";
Console.register({
  id: "models",
  title: "Models",
  render(root, ctx) {
    root.append(ctx.el("h1", {}, "Models"), ctx.el("p", {class: "note"}, "Not written yet."));
  },
});
