// Library: the user's jobs (GET /v1/jobs, paginated by next_cursor), filtered by kind and status,
// with image thumbnails and video posters; a viewer that plays MP4 and shows inputs and seed;
// "use as input", "run again" and delete (DELETE /v1/jobs/{id} removes the outputs; the job stays).

import { jobDetails } from "../lib/live.js";
import { errorText, field, formatDate, h, jobStatusBadge, mediaFor, replace, shortId } from "../lib/ui.js";

const PAGE_SIZE = 12; // #/library?limit=<n> asks for another page size (1-100)

export default {
  id: "library",
  title: "Library",
  nav: "user",
  async render(root, ctx) {
    const { api, signal } = ctx;
    const kind = h("select", { name: "kind", dataset: { testid: "filter-kind" } },
      [["", "All kinds"], ["image", "Images"], ["video", "Videos"], ["training", "LoRA trainings"]]
        .map(([v, label]) => h("option", { value: v, selected: v === (ctx.query.get("kind") || "") }, label)));
    const status = h("select", { name: "status", dataset: { testid: "filter-status" } },
      [["", "Any status"], ["succeeded", "Succeeded"], ["running,queued", "Active"], ["failed", "Failed"],
        ["canceled", "Canceled"]]
        .map(([v, label]) => h("option", { value: v, selected: v === (ctx.query.get("status") || "") }, label)));
    const gallery = h("ul", { class: "gallery", dataset: { testid: "gallery" }, "aria-label": "Jobs" });
    const more = h("button", { type: "button", dataset: { testid: "load-more" }, hidden: true }, "Load more");
    const empty = h("p", { class: "muted", hidden: true, dataset: { testid: "library-empty" } }, "No jobs match.");
    const viewer = h("section", { class: "viewer card", hidden: true, "aria-label": "Viewer",
      dataset: { testid: "viewer" } });
    root.append(
      h("h1", {}, "Library"),
      h("div", { class: "filters" }, field("Kind", kind, { name: "kind" }).el, field("Status", status, { name: "status" }).el),
      viewer, gallery, empty, h("div", { class: "actions" }, more));

    let cursor = null;
    let loaded = 0;
    let generation = 0;
    const jobs = new Map();

    function tile(job) {
      const output = job.outputs.find((o) => !o.role);
      const thumb = job.thumbnail_url || (output && output.content_type.startsWith("image/") ? output.url : null);
      const label = `${job.kind} job ${shortId(job.id)}: ${(job.input.prompt || "").slice(0, 60)}`;
      const picture = thumb
        ? h("img", { src: thumb, alt: label, loading: "lazy",
          dataset: { testid: job.kind === "video" ? "poster" : "thumbnail" } })
        : h("span", { class: "placeholder" }, job.outputs.length ? job.kind : job.status === "succeeded"
          ? "outputs deleted" : job.status);
      return h("li", { class: "tile", dataset: { testid: "job-tile", jobId: job.id, kind: job.kind, status: job.status } },
        h("button", { type: "button", class: "open", "aria-label": `Open ${label}`, onclick: () => open(job.id) }, picture),
        h("div", { class: "meta" },
          h("div", {}, jobStatusBadge(job.status), " ", h("span", { class: "muted" }, job.model)),
          h("span", {}, (job.input.prompt || "").slice(0, 60)),
          h("span", { class: "muted" }, formatDate(job.created_at))));
    }

    async function load(reset) {
      const mine = reset ? ++generation : generation;
      if (reset) {
        cursor = null;
        loaded = 0;
        jobs.clear();
        replace(gallery);
      }
      const size = Math.min(100, Math.max(1, Number(ctx.query.get("limit")) || PAGE_SIZE));
      const params = new URLSearchParams({ limit: String(size) });
      if (kind.value) params.set("kind", kind.value);
      if (status.value) params.set("status", status.value);
      if (cursor) params.set("cursor", cursor);
      more.disabled = true;
      try {
        const page = await api(`/v1/jobs?${params}`, { signal });
        if (mine !== generation) return;
        for (const job of page.data) {
          jobs.set(job.id, job);
          gallery.append(tile(job));
        }
        loaded += page.data.length;
        cursor = page.next_cursor;
        more.hidden = !cursor;
        empty.hidden = loaded > 0;
      } catch (e) {
        if (e.name !== "AbortError") ctx.toast(errorText(e), "error");
      } finally {
        more.disabled = false;
      }
    }

    function open(jobId) {
      const job = jobs.get(jobId);
      if (!job) return;
      const outputs = job.outputs.filter((o) => !o.role);
      const del = h("button", { type: "button", class: "danger", dataset: { testid: "delete" },
        disabled: job.status === "queued" || job.status === "running" || !job.outputs.length }, "Delete outputs");
      let armed = false;
      del.addEventListener("click", async () => {
        if (!armed) {
          armed = true;
          del.textContent = "Confirm: delete the outputs";
          del.dataset.testid = "delete-confirm";
          return;
        }
        del.disabled = true;
        try {
          const updated = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
          jobs.set(jobId, updated);
          const old = gallery.querySelector(`[data-job-id="${CSS.escape(jobId)}"]`);
          if (old) old.replaceWith(tile(updated));
          ctx.toast(`Deleted the outputs of job ${shortId(jobId)}`, "success");
          open(jobId);
        } catch (e) {
          ctx.toast(errorText(e), "error");
          del.disabled = false;
        }
      });
      const imageOut = job.kind === "image" && job.status === "succeeded" && outputs.length > 0;
      replace(viewer,
        h("h2", {}, `${job.kind === "video" ? "Video" : job.kind === "image" ? "Image" : "Job"} ${shortId(job.id)} `,
          jobStatusBadge(job.status)),
        outputs.length ? outputs.map((o, i) => mediaFor(o, { alt: `output ${i + 1}: ${job.input.prompt || ""}`,
          poster: job.thumbnail_url })) : h("p", { class: "muted" }, job.error
          ? `${job.error.code}: ${job.error.message || ""}` : "No outputs."),
        jobDetails(job),
        h("div", { class: "actions" },
          imageOut ? h("button", { type: "button", class: "primary", dataset: { testid: "use-as-input" },
            onclick: () => ctx.navigate(`#/generate?image=${encodeURIComponent(`job:${job.id}`)}`) }, "Use as input") : null,
          job.kind !== "training" ? h("button", { type: "button", dataset: { testid: "run-again" },
            onclick: () => ctx.navigate(`#/generate?from=${encodeURIComponent(job.id)}`) }, "Run again") : null,
          h("a", { href: `#/job/${encodeURIComponent(job.id)}`, dataset: { testid: "open-job" } }, "Open job page"),
          del,
          h("button", { type: "button", class: "link", onclick: () => { viewer.hidden = true; } }, "Close")));
      viewer.hidden = false;
      viewer.dataset.jobId = job.id;
      viewer.querySelector("h2").tabIndex = -1;
      viewer.querySelector("h2").focus();
    }

    kind.addEventListener("change", () => load(true));
    status.addEventListener("change", () => load(true));
    more.addEventListener("click", () => load(false));
    await load(true);
    return null;
  },
};
