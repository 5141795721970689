// Credits: balance, reserved and plan (GET /v1/credits, /v1/plans) and the ledger's transactions
// (GET /v1/credits/transactions, newest first, paginated by next_cursor).

import { errorText, formatCredits, formatDate, h, shortId } from "../lib/ui.js";

const PAGE_SIZE = 20; // #/credits?limit=<n> asks for another page size (1-200)
const KIND_LABEL = {
  grant: "Grant", purchase: "Purchase", reserve: "Reserved", capture: "Charged", refund: "Refund",
  expire: "Expired", adjust: "Adjustment",
};

function stat(label, value, testid) {
  return h("div", { class: "card stat" }, h("div", { class: "muted" }, label),
    h("div", { class: "value", dataset: { testid } }, value));
}

export default {
  id: "credits",
  title: "Credits",
  nav: "user",
  async render(root, ctx) {
    const { api, signal } = ctx;
    root.append(h("h1", {}, "Credits"));
    const [credits, plans] = await Promise.all([
      api("/v1/credits", { signal }),
      api("/v1/plans", { signal }).catch(() => ({ data: [] })),
    ]);
    ctx.refreshCredits(); // the header's balance too
    const plan = plans.data.find((p) => p.id === credits.plan);
    root.append(h("div", { class: "stats" },
      stat("Available", formatCredits(credits.balance), "balance"),
      stat("Reserved by active jobs", formatCredits(credits.reserved), "reserved"),
      stat("Plan", plan ? plan.name : credits.plan, "plan")));
    if (plan) {
      root.append(h("p", { class: "muted", dataset: { testid: "plan-details" } },
        [plan.price_usd ? `$${plan.price_usd}/month` : "free",
          plan.monthly_credits ? `${plan.monthly_credits} credits/month` : null,
          plan.one_time_credits ? `${plan.one_time_credits} credits once` : null,
          `up to ${plan.limits.max_active_jobs} active jobs`,
          `${plan.limits.rate_limit_per_minute} requests/min`].filter(Boolean).join(" · ")));
    }
    const body = h("tbody", { dataset: { testid: "transactions" } });
    const more = h("button", { type: "button", hidden: true, dataset: { testid: "transactions-more" } }, "Load more");
    const empty = h("p", { class: "muted", hidden: true }, "No transactions yet.");
    root.append(h("h2", {}, "Transactions"),
      h("div", { class: "table-wrap card" }, h("table", {},
        h("caption", { class: "muted" }, "Newest first. Balance and reserved are after the transaction."),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "When"), h("th", { scope: "col" }, "Kind"),
          h("th", { scope: "col", class: "num" }, "Amount"), h("th", { scope: "col" }, "Job"),
          h("th", { scope: "col" }, "Note"), h("th", { scope: "col", class: "num" }, "Balance"),
          h("th", { scope: "col", class: "num" }, "Reserved"))),
        body)),
      empty, h("div", { class: "actions" }, more));

    let cursor = null;
    async function load() {
      const size = Math.min(200, Math.max(1, Number(ctx.query.get("limit")) || PAGE_SIZE));
      const params = new URLSearchParams({ limit: String(size) });
      if (cursor) params.set("cursor", cursor);
      more.disabled = true;
      try {
        const page = await api(`/v1/credits/transactions?${params}`, { signal });
        for (const t of page.data) {
          body.append(h("tr", { dataset: { testid: "transaction", kind: t.kind, jobId: t.job_id || "" } },
            h("td", {}, formatDate(t.created_at)),
            h("td", {}, KIND_LABEL[t.kind] || t.kind),
            h("td", { class: "num" }, (t.amount > 0 ? "+" : "") + t.amount),
            h("td", {}, t.job_id ? h("a", { href: `#/job/${encodeURIComponent(t.job_id)}` }, shortId(t.job_id)) : "—"),
            h("td", {}, t.note || ""),
            h("td", { class: "num" }, t.balance),
            h("td", { class: "num" }, t.reserved)));
        }
        cursor = page.next_cursor;
        more.hidden = !cursor;
        empty.hidden = body.children.length > 0;
      } catch (e) {
        if (e.name !== "AbortError") ctx.toast(errorText(e), "error");
      } finally {
        more.disabled = false;
      }
    }
    more.addEventListener("click", load);
    await load();
    return null;
  },
};
