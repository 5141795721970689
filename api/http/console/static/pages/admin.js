// Admin (the admin key, or a user flagged admin): stats, users (list, create, plan, disable),
// credit grants, and models with their availability and a checkpoint swap. Only the public API:
//   GET /v1/admin/stats, GET|POST /v1/admin/users, PATCH /v1/admin/users/{id},
//   POST /v1/admin/users/{id}/credits, GET /v1/plans, GET /v1/models, POST /v1/admin/models/{id}/swap

import { ApiError } from "../lib/api.js";
import { debounce, errorText, field, formatCredits, formatDate, h, replace, showFieldErrors } from "../lib/ui.js";

const PAGE_SIZE = 50;
const GRANT_KINDS = [["grant", "Grant"], ["purchase", "Purchase"], ["adjust", "Adjustment"]];
const SOURCE_KINDS = [
  ["path", "Local path", "/models/my-checkpoint"],
  ["s3", "S3 URL", "s3://bucket/models/my-checkpoint"],
  ["hf_repo", "Hugging Face repo", "org/model"],
  ["tiny", "Tiny test checkpoint", "tiny-sd"],
];

function linkStylesheet() {
  if (document.querySelector('link[data-page-css="admin"]')) return;
  document.head.append(h("link", { rel: "stylesheet", href: new URL("./admin.css", import.meta.url).href,
    dataset: { pageCss: "admin" } }));
}

/** An idempotency key per submission attempt (crypto.randomUUID needs a secure context; this does not). */
function randomKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return `console-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function percent(rate) {
  return rate === null || rate === undefined ? "—" : `${(rate * 100).toFixed(1)} %`;
}

function stat(label, value, testid, note) {
  return h("div", { class: "card stat", dataset: { testid } },
    h("div", { class: "muted" }, label), h("div", { class: "value" }, value), note ? h("div", { class: "muted" }, note) : null);
}

function table(caption, headers, rows, testid) {
  return h("div", { class: "table-wrap" }, h("table", { dataset: { testid } },
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headers.map(([text, cls]) => h("th", { scope: "col", class: cls || null }, text)))),
    h("tbody", {}, rows)));
}

function formError(testid) {
  const el = h("p", { class: "error", role: "alert", hidden: true, dataset: { testid } });
  return {
    el,
    show(err) {
      el.textContent = err ? errorText(err) : "";
      el.hidden = !err;
    },
  };
}

// stats -----------------------------------------------------------------------------------------
function statsSection(ctx) {
  const body = h("div", { dataset: { testid: "admin-stats" } }, h("p", { class: "muted" }, "Loading…"));
  const refreshButton = h("button", { type: "button", dataset: { testid: "stats-refresh" } }, "Refresh");
  const el = h("section", { "aria-labelledby": "admin-stats-h" },
    h("div", { class: "admin-head" }, h("h2", { id: "admin-stats-h" }, "Stats"), refreshButton), body);

  async function load() {
    refreshButton.disabled = true;
    try {
      const s = await ctx.api("/v1/admin/stats", { signal: ctx.signal });
      const outcomes = s.outcomes || { total: 0, by_status: {}, success_rate: null };
      const credits = s.credits || {};
      const amount = (kind) => (credits[kind] ? credits[kind].amount : 0);
      const overflow = s.overflow || { jobs: 0, by_provider: {}, by_reason: {}, cost_usd: 0 };
      const statuses = ["queued", "running", "succeeded", "failed", "canceled"];
      replace(body,
        h("div", { class: "stats" },
          stat("Users", String(s.users), "stat-users"),
          stat("Jobs", String(outcomes.total), "stat-jobs",
            statuses.filter((st) => outcomes.by_status[st]).map((st) => `${outcomes.by_status[st]} ${st}`).join(", ")),
          stat("Success rate", percent(outcomes.success_rate), "stat-success-rate",
            "succeeded of succeeded + failed"),
          stat("Overflow", String(overflow.jobs), "stat-overflow",
            overflow.jobs ? `$${Number(overflow.cost_usd).toFixed(2)} at providers` : "all jobs ran locally"),
          stat("Credits granted", formatCredits(amount("grant") + amount("purchase")), "stat-credits-granted",
            `${formatCredits(amount("capture"))} spent, ${formatCredits(amount("refund"))} refunded`)),
        h("h3", {}, "Failure reasons"),
        (s.failures || []).length
          ? table("Failed jobs by model and error code", [["Model"], ["Error code"], ["Jobs", "num"]],
            s.failures.map((f) => h("tr", {}, h("td", {}, f.model), h("td", {}, h("code", {}, f.code)),
              h("td", { class: "num" }, String(f.jobs)))), "failures-table")
          : h("p", { class: "muted", dataset: { testid: "failures-none" } }, "No failed jobs."),
        h("h3", {}, "Jobs by model"),
        Object.keys(s.jobs || {}).length
          ? table("Jobs by model and status", [["Model"], ...statuses.map((st) => [st, "num"]),
            ["Avg run", "num"], ["Avg queue", "num"]],
          Object.entries(s.jobs).map(([model, counts]) => {
            const t = (s.timings || {})[model] || {};
            const secs = (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(2)} s`);
            return h("tr", {}, h("td", {}, model), statuses.map((st) => h("td", { class: "num" }, String(counts[st] || 0))),
              h("td", { class: "num" }, secs(t.avg_run_s)), h("td", { class: "num" }, secs(t.avg_queue_s)));
          }), "jobs-table")
          : h("p", { class: "muted" }, "No jobs yet."),
        h("h3", {}, "Overflow"),
        overflow.jobs
          ? table("Jobs run at a fallback provider", [["Provider"], ["Reason"], ["Jobs", "num"], ["Cost", "num"]],
            (s.routes || []).filter((r) => r.provider !== "local").map((r) => h("tr", {},
              h("td", {}, r.provider), h("td", {}, r.reason || "—"), h("td", { class: "num" }, String(r.jobs)),
              h("td", { class: "num" }, `$${Number(r.cost_usd).toFixed(2)}`))), "overflow-table")
          : h("p", { class: "muted", dataset: { testid: "overflow-none" } }, "No job overflowed to a provider."));
    } catch (err) {
      if (err && err.name === "AbortError") return;
      replace(body, h("p", { class: "error", role: "alert" }, errorText(err)));
    } finally {
      refreshButton.disabled = false;
    }
  }
  refreshButton.addEventListener("click", load);
  return { el, load };
}

// users and grants ----------------------------------------------------------------------------------
function usersSection(ctx, plans, { onChanged }) {
  let offset = 0;
  let users = [];
  const grantUser = h("select", { name: "user_id", required: true, dataset: { testid: "grant-user" } });
  const tbody = h("tbody", { dataset: { testid: "users-rows" } });
  const status = h("p", { class: "muted", "aria-live": "polite", dataset: { testid: "users-status" } });
  const search = h("input", { type: "search", id: "users-search", name: "q", autocomplete: "off", spellcheck: "false",
    maxlength: 254, placeholder: "part of an email", dataset: { testid: "users-search" } });
  const prev = h("button", { type: "button", dataset: { testid: "users-prev" } }, "Previous");
  const next = h("button", { type: "button", dataset: { testid: "users-next" } }, "Next");
  const planOptions = (selected) => plans.map((p) => h("option", { value: p.id, selected: p.id === selected }, p.name || p.id));

  function row(u) {
    const planSelect = h("select", { "aria-label": `Plan of ${u.email}`, dataset: { testid: "user-plan" } },
      planOptions(u.plan));
    if (!plans.some((p) => p.id === u.plan)) planSelect.prepend(h("option", { value: u.plan, selected: true }, u.plan));
    planSelect.addEventListener("change", async () => {
      planSelect.disabled = true;
      try {
        const updated = await ctx.api(`/v1/admin/users/${encodeURIComponent(u.id)}`,
          { method: "PATCH", json: { plan: planSelect.value } });
        u.plan = updated.plan;
        ctx.toast(`${u.email} is now on ${updated.plan}.`, "success");
      } catch (err) {
        planSelect.value = u.plan;
        ctx.toast(errorText(err), "error");
      } finally {
        planSelect.disabled = false;
      }
    });
    const toggle = h("button", { type: "button", class: u.disabled ? null : "danger",
      dataset: { testid: "user-toggle" } }, u.disabled ? "Enable" : "Disable");
    toggle.setAttribute("aria-label", `${u.disabled ? "Enable" : "Disable"} ${u.email}`);
    toggle.addEventListener("click", async () => {
      toggle.disabled = true;
      try {
        const updated = await ctx.api(`/v1/admin/users/${encodeURIComponent(u.id)}`,
          { method: "PATCH", json: { disabled: !u.disabled } });
        ctx.toast(`${u.email} ${updated.disabled ? "disabled: its keys are refused" : "enabled"}.`, "success");
        await load();
      } catch (err) {
        toggle.disabled = false;
        ctx.toast(errorText(err), "error");
      }
    });
    const grant = h("button", { type: "button", dataset: { testid: "user-grant" },
      "aria-label": `Grant credits to ${u.email}`, onclick: () => selectForGrant(u.id) }, "Grant credits");
    return h("tr", { dataset: { testid: "user-row", userId: u.id, email: u.email } },
      h("td", { dataset: { label: "User" } }, h("span", { class: "user-email" }, u.email),
        h("div", { class: "muted user-id" }, u.id)),
      h("td", { dataset: { label: "Plan" } }, planSelect),
      h("td", { class: "num", dataset: { testid: "user-balance", label: "Balance" } }, formatCredits(u.credits.balance)),
      h("td", { class: "num", dataset: { label: "Reserved" } }, formatCredits(u.credits.reserved)),
      h("td", { dataset: { label: "Role" } }, [u.is_admin ? "Admin" : "User", u.disabled ? " · disabled" : ""].join("")),
      h("td", { dataset: { label: "Created" } }, formatDate(u.created_at)),
      h("td", { dataset: { label: "Actions" } }, h("div", { class: "row-actions" }, grant, toggle)));
  }

  function fillGrantUsers() {
    const keep = grantUser.value;
    replace(grantUser, h("option", { value: "" }, "Choose a user"),
      users.map((u) => h("option", { value: u.id, selected: u.id === keep }, `${u.email} (${formatCredits(u.credits.balance)})`)));
  }

  let loadSeq = 0;
  async function load() {
    const seq = ++loadSeq;
    status.textContent = "Loading users…";
    try {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset) });
      if (search.value.trim()) query.set("q", search.value.trim());
      const list = await ctx.api(`/v1/admin/users?${query}`, { signal: ctx.signal });
      if (seq !== loadSeq) return; // a newer search answered first
      users = list.data || [];
      replace(tbody, users.map(row));
      fillGrantUsers();
      prev.disabled = offset === 0;
      next.disabled = users.length < PAGE_SIZE;
      status.textContent = users.length ? `Users ${offset + 1}–${offset + users.length}` : "No users on this page.";
    } catch (err) {
      if (err && err.name === "AbortError") return;
      status.textContent = errorText(err);
    }
  }
  prev.addEventListener("click", () => { offset = Math.max(0, offset - PAGE_SIZE); load(); });
  next.addEventListener("click", () => { offset += PAGE_SIZE; load(); });
  search.addEventListener("input", debounce(() => { offset = 0; load(); }, 250));

  // create ------------------------------------------------------------------------------------
  const email = field("Email", h("input", { type: "email", name: "email", required: true, autocomplete: "off",
    dataset: { testid: "new-user-email" } }), { name: "email" });
  const plan = field("Plan", h("select", { name: "plan", dataset: { testid: "new-user-plan" } }, planOptions(null)),
    { name: "plan" });
  const credits = field("Credits", h("input", { type: "number", name: "credits", min: 0, max: 10000000, step: 1,
    inputmode: "numeric", dataset: { testid: "new-user-credits" } }), { name: "credits", hint: "Empty: the plan's own." });
  const isAdmin = h("input", { type: "checkbox", id: "new-user-admin", name: "is_admin", dataset: { testid: "new-user-admin" } });
  const createError = formError("new-user-error");
  const created = h("div", { class: "card created", hidden: true, dataset: { testid: "new-user-result" } });
  const createForm = h("form", { class: "card", novalidate: true, dataset: { testid: "new-user-form" } },
    h("h3", {}, "Create a user"),
    h("div", { class: "fields" }, email.el, plan.el, credits.el,
      h("div", { class: "field checkbox" }, h("label", { for: "new-user-admin" }, isAdmin, " Admin"))),
    createError.el,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", dataset: { testid: "new-user-submit" } },
      "Create user")));
  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    createError.show(null);
    for (const f of [email, plan, credits]) f.setError(null);
    if (!email.input.value.trim()) {
      email.setError("Enter an email address.");
      email.input.focus();
      return;
    }
    const payload = { email: email.input.value.trim(), is_admin: isAdmin.checked };
    if (plan.input.value) payload.plan = plan.input.value;
    if (credits.input.value !== "") payload.credits = Number(credits.input.value);
    const button = createForm.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const user = await ctx.api("/v1/admin/users", { method: "POST", json: payload });
      const keyInput = h("input", { type: "text", readonly: true, value: user.api_key, id: "new-user-key",
        dataset: { testid: "new-user-key" }, onfocus: (e) => e.target.select() });
      replace(created,
        h("p", {}, `Created ${user.email} (${user.plan}). Its API key is shown once: copy it now.`),
        h("div", { class: "field" }, h("label", { for: "new-user-key" }, "API key"), keyInput));
      created.hidden = false;
      createForm.reset();
      await load();
      onChanged();
      keyInput.focus();
    } catch (err) {
      if (!(err instanceof ApiError) || !showFieldErrors(err, { email, plan, credits })) createError.show(err);
    } finally {
      button.disabled = false;
    }
  });

  // grant ---------------------------------------------------------------------------------------
  const grantUserField = field("User", grantUser, { name: "user_id" });
  const amount = field("Amount", h("input", { type: "number", name: "amount", required: true, min: 1, max: 10000000,
    step: 1, inputmode: "numeric", dataset: { testid: "grant-amount" } }), { name: "amount" });
  const kind = field("Kind", h("select", { name: "kind", dataset: { testid: "grant-kind" } },
    GRANT_KINDS.map(([v, label]) => h("option", { value: v }, label))), { name: "kind" });
  const note = field("Note", h("input", { type: "text", name: "note", maxlength: 500, dataset: { testid: "grant-note" } }),
    { name: "note", hint: "Shown in the user's transactions." });
  const grantError = formError("grant-error");
  const grantResult = h("p", { class: "muted", "aria-live": "polite", dataset: { testid: "grant-result" } });
  let grantKey = randomKey(); // the same key until a grant succeeds: a double submit grants once
  const grantForm = h("form", { class: "card", novalidate: true, id: "grant-form", dataset: { testid: "grant-form" } },
    h("h3", {}, "Grant credits"),
    h("div", { class: "fields" }, grantUserField.el, amount.el, kind.el, note.el),
    grantError.el, grantResult,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", dataset: { testid: "grant-submit" } },
      "Grant")));
  for (const f of [grantUserField, amount, kind, note]) f.input.addEventListener("input", () => { grantKey = randomKey(); });

  function selectForGrant(userId) {
    grantUser.value = userId;
    grantKey = randomKey();
    grantForm.scrollIntoView({ block: "nearest" });
    amount.input.focus();
  }

  grantForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    grantError.show(null);
    grantResult.textContent = "";
    for (const f of [grantUserField, amount, kind, note]) f.setError(null);
    let invalid = null;
    if (!grantUser.value) {
      grantUserField.setError("Choose a user.");
      invalid = invalid || grantUser;
    }
    const n = Number(amount.input.value);
    if (!Number.isInteger(n) || n < 1) {
      amount.setError("A whole number of credits, at least 1.");
      invalid = invalid || amount.input;
    }
    if (invalid) {
      invalid.focus();
      return;
    }
    const button = grantForm.querySelector("button[type=submit]");
    button.disabled = true;
    const target = users.find((u) => u.id === grantUser.value);
    try {
      const entry = await ctx.api(`/v1/admin/users/${encodeURIComponent(grantUser.value)}/credits`, {
        method: "POST",
        json: { amount: n, kind: kind.input.value, note: note.input.value.trim(), idempotency_key: grantKey },
      });
      grantKey = randomKey();
      const who = target ? target.email : grantUser.value;
      grantResult.textContent = `Granted ${formatCredits(entry.amount)} to ${who}: balance now ${formatCredits(entry.balance)}.`;
      ctx.toast(grantResult.textContent, "success");
      amount.input.value = "";
      note.input.value = "";
      await load();
      grantUser.value = target ? target.id : "";
      onChanged();
    } catch (err) {
      if (!(err instanceof ApiError)
        || !showFieldErrors(err, { amount, kind, note, user_id: grantUserField })) grantError.show(err);
    } finally {
      button.disabled = false;
    }
  });

  const el = h("section", { "aria-labelledby": "admin-users-h" },
    h("h2", { id: "admin-users-h" }, "Users"),
    h("div", { class: "field users-search" }, h("label", { for: "users-search" }, "Find by email"), search),
    h("div", { class: "stack-on-phone" },
      table("Users", [["User"], ["Plan"], ["Balance", "num"], ["Reserved", "num"], ["Role"], ["Created"], ["Actions"]],
        [], "users-table")),
    h("div", { class: "actions" }, prev, next, status),
    h("div", { class: "admin-forms" }, grantForm, createForm), created);
  el.querySelector("table").replaceChild(tbody, el.querySelector("tbody"));
  return { el, load };
}

// models ------------------------------------------------------------------------------------------
function modelsSection(ctx) {
  const tbody = h("tbody", { dataset: { testid: "models-rows" } });
  let models = [];
  const modelSelect = h("select", { name: "model", required: true, dataset: { testid: "swap-model" } });
  const sourceKind = h("select", { name: "source_kind", dataset: { testid: "swap-kind" } },
    SOURCE_KINDS.map(([v, label]) => h("option", { value: v }, label)));
  const value = h("input", { type: "text", name: "source", required: true, autocomplete: "off", spellcheck: "false",
    dataset: { testid: "swap-source" } });
  const revision = h("input", { type: "text", name: "revision", autocomplete: "off", dataset: { testid: "swap-revision" } });
  const modelField = field("Model", modelSelect, { name: "model" });
  const kindField = field("Source kind", sourceKind, { name: "source_kind" });
  const valueField = field("Source", value, { name: "source" });
  const revisionField = field("Revision", revision, { name: "revision", hint: "A commit or tag (Hugging Face only)." });
  const swapError = formError("swap-error");
  const swapResult = h("p", { class: "muted", "aria-live": "polite", dataset: { testid: "swap-result" } });
  const syncKind = () => {
    const spec = SOURCE_KINDS.find(([v]) => v === sourceKind.value);
    value.placeholder = spec ? spec[2] : "";
    revisionField.el.hidden = sourceKind.value !== "hf_repo";
  };
  sourceKind.addEventListener("change", syncKind);
  const form = h("form", { class: "card", novalidate: true, dataset: { testid: "swap-form" } },
    h("h3", {}, "Swap a checkpoint"),
    h("p", { class: "muted" }, "The model's replicas load the new checkpoint beside the old one and switch when it is "
      + "ready: no downtime."),
    h("div", { class: "fields" }, modelField.el, kindField.el, valueField.el, revisionField.el),
    swapError.el, swapResult,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", dataset: { testid: "swap-submit" } },
      "Swap")));
  syncKind();

  async function load() {
    try {
      const list = await ctx.api("/v1/models", { signal: ctx.signal });
      models = list.data || [];
      replace(tbody, models.map((m) => h("tr", { dataset: { testid: "model-row", modelId: m.id } },
        h("td", { dataset: { label: "Model" } }, h("code", {}, m.id), h("div", { class: "muted" }, m.name)),
        h("td", { dataset: { label: "Kind" } }, m.kind),
        h("td", { dataset: { label: "Tasks" } }, (m.tasks || []).join(", ")),
        h("td", { dataset: { label: "Runs" } }, m.remote_only ? `remote (${m.provider || "provider"})`
          : m.provider ? `local, overflow to ${m.provider}` : "local"),
        h("td", { dataset: { testid: "model-available", label: "Availability" } },
          h("span", { class: `badge ${m.available ? "badge-succeeded" : "badge-failed"}` },
            m.available ? "Available" : "Unavailable"),
          m.available ? null : h("div", { class: "muted" }, m.unavailable_reason || "")))));
      const keep = modelSelect.value;
      replace(modelSelect, models.filter((m) => !m.remote_only).map((m) =>
        h("option", { value: m.id, selected: m.id === keep }, m.id)));
    } catch (err) {
      if (err && err.name === "AbortError") return;
      replace(tbody, h("tr", {}, h("td", { colspan: 5, class: "error" }, errorText(err))));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    swapError.show(null);
    swapResult.textContent = "";
    valueField.setError(null);
    const text = value.value.trim();
    if (!text) {
      valueField.setError("Say where the new checkpoint is.");
      value.focus();
      return;
    }
    const source = { [sourceKind.value]: text };
    if (sourceKind.value === "hf_repo" && revision.value.trim()) source.revision = revision.value.trim();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const result = await ctx.api(`/v1/admin/models/${encodeURIComponent(modelSelect.value)}/swap`,
        { method: "POST", json: { source } });
      swapResult.textContent = `${result.model || modelSelect.value} now serves ${JSON.stringify(result.source ?? source)}.`;
      ctx.toast(swapResult.textContent, "success");
      await load();
    } catch (err) {
      swapError.show(err);
    } finally {
      button.disabled = false;
    }
  });

  const el = h("section", { "aria-labelledby": "admin-models-h" },
    h("h2", { id: "admin-models-h" }, "Models"),
    h("div", { class: "stack-on-phone" },
      table("Models and their availability", [["Model"], ["Kind"], ["Tasks"], ["Runs"], ["Availability"]], [],
        "models-table")),
    form);
  el.querySelector("table").replaceChild(tbody, el.querySelector("tbody"));
  return { el, load };
}

export default {
  id: "admin",
  title: "Admin",
  nav: "admin",
  async render(root, ctx) {
    linkStylesheet();
    const plans = await ctx.api("/v1/plans", { signal: ctx.signal });
    const stats = statsSection(ctx);
    const models = modelsSection(ctx);
    const users = usersSection(ctx, plans.data || [], {
      onChanged: () => {
        stats.load();
        if (ctx.refreshCredits) ctx.refreshCredits(); // an admin user may have granted itself
      },
    });
    root.append(h("h1", {}, "Admin"),
      h("p", { class: "muted" }, ctx.whoami && ctx.whoami.role === "admin-key"
        ? "Signed in with the admin key." : "Signed in as an admin user."),
      stats.el, users.el, models.el);
    await Promise.all([stats.load(), users.load(), models.load()]);
  },
};
