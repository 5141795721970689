import { h } from "../lib/ui.js";

export default {
  id: "generate",
  title: "Generate",
  nav: "user",
  render(root) {
    root.append(h("h1", {}, "Generate"), h("p", {}, "Coming in this change."));
  },
};
