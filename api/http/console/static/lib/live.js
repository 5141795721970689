import { h } from "./ui.js";

export default {
  id: "job",
  title: "Job",
  nav: null,
  render(root, ctx) {
    root.append(h("h1", {}, `Job ${ctx.params[0] || ""}`));
  },
};
