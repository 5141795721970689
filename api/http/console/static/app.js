// The console shell: sign-in state, navigation, hash routing and toasts. Pages are modules in
// pages/*.js that default-export {id, title, nav: "user"|"admin"|null, render(root, ctx)};
// render may be async and may answer a cleanup function, called when the page is left.

import { api, ApiError, clearKey, getKey, setKey, streamEvents } from "./lib/api.js";
import { formatCredits, h, replace } from "./lib/ui.js";

// Every page, in nav order. A module that fails to load (missing, syntax error) is left out of
// the nav with a console error instead of taking the whole console down.
const PAGE_MODULES = [
  "./pages/signin.js",
  "./pages/generate.js",
  "./lib/live.js",
  "./pages/library.js",
  "./pages/credits.js",
  "./pages/loras.js",
  "./pages/admin.js",
];

const pages = new Map();
const view = document.getElementById("view");
const nav = document.getElementById("nav");
const account = document.getElementById("account");
const toasts = document.getElementById("toasts");

let whoami = null;
let cleanup = null;
let controller = null;

export function toast(message, kind = "info") {
  const item = h("div", { class: `toast toast-${kind}`, dataset: { testid: `toast-${kind}` },
    role: kind === "error" ? "alert" : null }, String(message));
  const close = h("button", { type: "button", class: "toast-close", "aria-label": "Dismiss",
    onclick: () => item.remove() }, "×");
  item.append(close);
  toasts.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 12000 : 6000);
}

export function navigate(hash) {
  const target = hash.startsWith("#") ? hash : `#${hash}`;
  if (location.hash === target) route();
  else location.hash = target;
}

/**
 * Who holds the key: GET /v1/credits works -> a user (an admin user if /v1/admin/stats works too);
 * 403 there -> the admin key if /v1/admin/stats works. Throws the ApiError otherwise (401: wrong key).
 */
async function identify() {
  try {
    const credits = await api("/v1/credits");
    let role = "user";
    try {
      await api("/v1/admin/stats");
      role = "admin-user";
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 403) throw e;
    }
    return { role, credits };
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 403) throw e;
    await api("/v1/admin/stats");
    return { role: "admin-key" };
  }
}

async function signIn(key) {
  setKey(key.trim());
  try {
    whoami = await identify();
  } catch (e) {
    clearKey();
    whoami = null;
    throw e;
  }
  renderChrome();
  navigate(homeHash());
  return whoami;
}

function signOut() {
  clearKey();
  whoami = null;
  renderChrome();
  navigate("#/signin");
}

/** Re-read the balance (after a job, a refund, a grant) and update the header. */
async function refreshCredits() {
  if (!whoami || whoami.role === "admin-key") return null;
  try {
    whoami.credits = await api("/v1/credits");
    renderChrome();
  } catch (e) {
    console.warn("could not refresh credits", e);
  }
  return whoami.credits;
}

function canSee(page) {
  if (!whoami || !page.nav) return false;
  if (page.nav === "admin") return whoami.role !== "user";
  return whoami.role !== "admin-key";
}

function homeHash() {
  if (!whoami) return "#/signin";
  return whoami.role === "admin-key" ? "#/admin" : "#/generate";
}

function renderChrome() {
  const current = parseHash().id;
  replace(nav, h("ul", {}, [...pages.values()].filter(canSee).map((page) =>
    h("li", {}, h("a", { href: `#/${page.id}`, dataset: { testid: `nav-${page.id}` },
      "aria-current": page.id === current ? "page" : null }, page.title)))));
  if (!whoami) {
    replace(account);
    return;
  }
  const label = { user: "User", "admin-key": "Admin key", "admin-user": "Admin" }[whoami.role];
  replace(account,
    h("span", { class: "role", dataset: { testid: "role" } }, label),
    whoami.credits ? h("a", { href: "#/credits", class: "balance", dataset: { testid: "header-balance" } },
      formatCredits(whoami.credits.balance)) : null,
    h("button", { type: "button", class: "link", onclick: signOut, dataset: { testid: "sign-out" } }, "Sign out"));
}

/** "#/job/abc?x=1" -> {id: "job", params: ["abc"], query: URLSearchParams("x=1")}. */
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, search = ""] = raw.split("?");
  const [id = "", ...params] = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { id, params, query: new URLSearchParams(search) };
}

async function route() {
  const { id, params, query } = parseHash();
  if (!whoami && id !== "signin") {
    navigate("#/signin");
    return;
  }
  const page = pages.get(id);
  if (!page || (id === "signin" && whoami) || (page.nav && !canSee(page))) {
    if (`#/${id}` !== homeHash()) {
      navigate(homeHash());
      return;
    }
    // the home page itself did not load (a module missing): say so instead of looping
    renderChrome();
    replace(view, h("p", { class: "error", role: "alert", dataset: { testid: "page-error" } },
      `The ${id || "home"} page is not available in this console.`));
    return;
  }
  if (cleanup) {
    try {
      cleanup();
    } catch (e) {
      console.error("page cleanup failed", e);
    }
  }
  cleanup = null;
  if (controller) controller.abort();
  controller = new AbortController();
  renderChrome();
  document.title = `${page.title} · CineWeave`;
  // each render gets its own root: a slow page that finishes after the user left writes nowhere
  const root = h("div", { class: `page page-${page.id}`, dataset: { testid: `page-${page.id}` } });
  replace(view, root);
  const ctx = {
    api, streamEvents, navigate, toast, whoami, params, query, signal: controller.signal,
    signIn, signOut, refreshCredits,
  };
  try {
    const result = await page.render(root, ctx);
    if (typeof result === "function") {
      if (root.isConnected) cleanup = result;
      else result();
    }
  } catch (e) {
    if (e && e.name === "AbortError") return;
    console.error(e);
    if (root.isConnected) {
      root.append(h("p", { class: "error", role: "alert", dataset: { testid: "page-error" } },
        e instanceof ApiError ? e.message : "This page could not be shown. Try reloading."));
    }
  }
  const heading = root.querySelector("h1");
  if (heading && root.isConnected) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

async function start() {
  const loaded = await Promise.allSettled(PAGE_MODULES.map((path) => import(path)));
  loaded.forEach((result, i) => {
    if (result.status === "fulfilled" && result.value.default) {
      const page = result.value.default;
      pages.set(page.id, page);
    } else {
      console.error(`page module ${PAGE_MODULES[i]} did not load`, result.reason);
    }
  });
  if (getKey()) {
    try {
      whoami = await identify();
    } catch (e) {
      clearKey();
      whoami = null;
      if (e instanceof ApiError && e.status !== 401) toast(e.message, "error");
    }
  }
  window.addEventListener("hashchange", route);
  await route();
  document.body.dataset.ready = "true";
}

start();
