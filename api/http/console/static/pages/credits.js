import { h } from "../lib/ui.js";

export default {
  id: "credits",
  title: "Credits",
  nav: "user",
  render(root) {
    root.append(h("h1", {}, "Credits"), h("p", {}, "Coming in this change."));
  },
};
