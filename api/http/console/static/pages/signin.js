// Sign in with an API key. The key is kept in this tab's session storage only.

import { h } from "../lib/ui.js";

function readable(err) {
  if (err && err.status === 401) {
    return "That API key was not accepted. Check that you pasted the whole key (it starts with \"cw_\") "
      + "and that it has not been revoked.";
  }
  if (err && err.status === 0) return err.message;
  return (err && err.message) || "Signing in failed.";
}

export default {
  id: "signin",
  title: "Sign in",
  nav: null,
  render(root, ctx) {
    const input = h("input", { id: "api-key", name: "api-key", type: "password", required: true,
      autocomplete: "off", spellcheck: "false", "aria-describedby": "api-key-hint signin-error",
      dataset: { testid: "api-key" } });
    const error = h("p", { id: "signin-error", class: "field-error", role: "alert", hidden: true,
      dataset: { testid: "signin-error" } });
    const button = h("button", { type: "submit", class: "primary", dataset: { testid: "sign-in" } }, "Sign in");
    const form = h("form", { class: "card signin", novalidate: true },
      h("div", { class: "field" },
        h("label", { for: "api-key" }, "API key"),
        input,
        h("p", { id: "api-key-hint", class: "field-hint" },
          "A user's key from `cineweave users create`, or the admin key. It stays in this tab only "
          + "(session storage) and is sent as an Authorization header, never in a URL.")),
      error, button);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.hidden = true;
      const key = input.value.trim();
      if (!key) {
        error.textContent = "Enter an API key.";
        error.hidden = false;
        input.focus();
        return;
      }
      button.disabled = true;
      button.textContent = "Signing in…";
      try {
        await ctx.signIn(key);
      } catch (err) {
        error.textContent = readable(err);
        error.hidden = false;
        input.setAttribute("aria-invalid", "true");
        input.focus();
      } finally {
        button.disabled = false;
        button.textContent = "Sign in";
      }
    });
    root.append(h("h1", {}, "Sign in to CineWeave"), form);
    input.focus();
  },
};
