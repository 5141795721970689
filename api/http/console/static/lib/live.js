// Live job view (#/job/<id>): status, stage, progress bar, queue position while queued, the newest
// step preview, cancel, then the result. Follows GET /v1/jobs/{id}/events (SSE over fetch) and
// reads GET /v1/jobs/{id} for the full job when it ends.

import { errorText, formatCredits, formatSeconds, h, jobStatusBadge, mediaFor, progressBar, replace, shortId } from "./ui.js";

const ACTIVE = new Set(["queued", "running"]);

/** Inputs and seed of a job as a definition list (shared with the Library's viewer). */
export function jobDetails(job) {
  const rows = [["Model", job.model], ["Kind", `${job.kind} (${job.task})`], ["Seed", job.input.seed ?? "—"]];
  for (const [key, value] of Object.entries(job.input)) {
    if (key === "seed" || value === null || value === "" || (Array.isArray(value) && !value.length)) continue;
    rows.push([key, typeof value === "object" ? JSON.stringify(value) : String(value)]);
  }
  rows.push(["Credits", `${formatCredits(job.credits.charged)} charged, ${job.credits.refunded} refunded `
    + `(${job.credits.reserved} reserved)`]);
  if (job.metrics && job.metrics.run_s != null) rows.push(["Run time", formatSeconds(job.metrics.run_s)]);
  return h("dl", { class: "kv", dataset: { testid: "job-details" } },
    rows.map(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { testid: `detail-${k}` } }, v)]));
}

export default {
  id: "job",
  title: "Job",
  nav: null,
  async render(root, ctx) {
    const jobId = ctx.params[0];
    if (!jobId) {
      ctx.navigate("#/library");
      return null;
    }
    let job = await ctx.api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal: ctx.signal });
    const badge = h("span", { dataset: { testid: "job-status" }, "aria-live": "polite" });
    const stage = h("span", { class: "muted", dataset: { testid: "job-stage" } });
    const queue = h("p", { class: "muted", dataset: { testid: "queue-position" }, hidden: true, "aria-live": "polite" });
    const bar = progressBar("Job progress");
    const previewImg = h("img", { alt: "preview of the image forming", dataset: { testid: "preview" } });
    const previewCaption = h("p", { class: "muted", dataset: { testid: "preview-caption" } });
    const preview = h("figure", { class: "preview", hidden: true, dataset: { testid: "preview-figure" } }, previewImg, h("figcaption", {}, previewCaption));
    const errorBox = h("p", { class: "error", role: "alert", hidden: true, dataset: { testid: "job-error" } });
    const result = h("div", { class: "result", dataset: { testid: "job-result" } });
    const details = h("div");
    const cancel = h("button", { type: "button", class: "danger", dataset: { testid: "cancel" } }, "Cancel");
    const actions = h("div", { class: "actions" }, cancel,
      h("a", { href: `#/generate?from=${encodeURIComponent(jobId)}`, dataset: { testid: "run-again" } }, "Run again"),
      h("a", { href: "#/library" }, "Library"));
    root.append(
      h("h1", {}, `Job ${shortId(jobId)}`),
      h("div", { class: "card" },
        h("div", { class: "actions" }, badge, stage),
        bar.el, queue, preview, errorBox, actions),
      result, h("h2", {}, "Inputs"), details);

    let previewCount = 0;
    const show = () => {
      replace(badge, jobStatusBadge(job.status));
      root.dataset.status = job.status;
      stage.textContent = job.stage ? `stage: ${job.stage}` : "";
      bar.set(job.status === "succeeded" ? 1 : job.progress);
      if (job.status === "queued" && job.queue_position != null) {
        queue.hidden = false;
        queue.textContent = `Position in queue: ${job.queue_position + 1}`
          + (job.eta_s != null ? ` · about ${formatSeconds(job.eta_s)} to go` : "");
      } else if (job.status === "running" && job.eta_s != null) {
        queue.hidden = false;
        queue.textContent = `About ${formatSeconds(job.eta_s)} to go`;
      } else {
        queue.hidden = true;
      }
      cancel.hidden = !ACTIVE.has(job.status) || job.cancel_requested;
      if (job.error) {
        errorBox.hidden = false;
        errorBox.textContent = `${job.error.code}: ${job.error.message || ""}`;
      }
      replace(details, jobDetails(job));
    };
    const showResult = () => {
      const outputs = job.outputs.filter((o) => !o.role);
      preview.hidden = previewCount === 0 || (job.status === "succeeded" && outputs.length > 0);
      replace(result, outputs.length ? h("h2", {}, "Result") : null, outputs.map((o, i) =>
        h("figure", {}, mediaFor(o, { alt: `output ${i + 1} of job ${shortId(jobId)}` }),
          h("figcaption", { class: "muted" }, [o.content_type, o.width && `${o.width}×${o.height}`,
            o.duration_s && `${o.duration_s} s`].filter(Boolean).join(" · "),
          " ", h("a", { href: o.url, download: "" }, "Download")))));
    };
    show();
    showResult();

    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        job = await ctx.api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
        ctx.toast("Cancel requested", "info");
        show();
      } catch (e) {
        ctx.toast(errorText(e), "error");
      } finally {
        cancel.disabled = false;
      }
    });

    if (!ACTIVE.has(job.status)) return null;
    const refresh = async () => {
      try {
        job = await ctx.api(`/v1/jobs/${encodeURIComponent(jobId)}`);
        show();
        showResult();
      } catch (e) {
        console.warn(e);
      }
    };
    const close = ctx.streamEvents(jobId, {
      status(data) {
        if (data.status) job.status = data.status;
        if (data.stage !== undefined) job.stage = data.stage;
        show();
      },
      start(data) {
        if (data.status) job.status = data.status;
        show();
      },
      queue(data) {
        job.queue_position = data.queue_position;
        job.eta_s = data.eta_s;
        show();
      },
      progress(data) {
        if (job.status === "queued") job.status = "running";
        if (data.stage) job.stage = data.stage;
        if (typeof data.progress === "number") job.progress = data.progress;
        show();
        if (data.step != null && data.total) bar.set(job.progress, `${data.step}/${data.total}`);
      },
      preview(data) {
        if (!data || !data.image) return;
        previewCount += 1;
        previewImg.src = data.image;
        if (data.width) previewImg.width = Math.max(128, data.width);
        preview.hidden = false;
        preview.dataset.count = String(previewCount);
        previewCaption.textContent = `Preview at step ${data.step} of ${data.total}`;
        if (typeof data.step === "number" && data.total) {
          job.progress = Math.max(job.progress, data.step / data.total);
          bar.set(job.progress, `${data.step}/${data.total}`);
        }
      },
      output() {
        refresh();
      },
      completed(data) {
        if (data.job) job = data.job;
        show();
        showResult();
        if (job.status === "succeeded") ctx.toast(`Job ${shortId(jobId)} succeeded`, "success");
        else ctx.toast(`Job ${shortId(jobId)} ${job.status}`, job.status === "failed" ? "error" : "info");
        ctx.refreshCredits();
      },
      onError(e) {
        ctx.toast(`Live updates stopped: ${errorText(e)}`, "error");
        refresh();
      },
      onEnd() {
        refresh();
      },
    });
    return close;
  },
};
