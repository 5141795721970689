import { h } from "../lib/ui.js";

export default {
  id: "library",
  title: "Library",
  nav: "user",
  render(root) {
    root.append(h("h1", {}, "Library"), h("p", {}, "Coming in this change."));
  },
};
