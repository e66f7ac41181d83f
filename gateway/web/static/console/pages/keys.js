/* Keys: a stub until its page is written. */
"use strict";
Console.register({
  id: "keys",
  title: "Keys",
  render(root, ctx) {
    root.append(ctx.el("h1", {}, "Keys"), ctx.el("p", {class: "note"}, "Not written yet."));
  },
});
