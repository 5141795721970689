// LoRAs: train a personal LoRA from photos (several images, or one ZIP with captions), follow the
// training (stage, progress and loss from the job's SSE stream), see the validation image, then
// generate with it; list and delete. Everything goes through the public API:
//   POST /v1/uploads (multipart "file", one part per file) -> upload ids
//   POST /v1/loras/quote (the price of a training before submitting), POST /v1/loras
//   GET /v1/loras, GET /v1/loras/{id}, DELETE /v1/loras/{id}, GET /v1/jobs/{job_id}/events

import { ApiError } from "../lib/api.js";
import {
  debounce, errorText, field, formatCredits, formatDate, h, jobStatusBadge, progressBar, replace, showFieldErrors,
} from "../lib/ui.js";

const ACCEPT = "image/png,image/jpeg,image/webp,application/zip,.png,.jpg,.jpeg,.webp,.zip";
const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/webp"]);
const PRESETS = [600, 1200, 2000];
const ACTIVE = new Set(["queued", "running"]);
const TRIGGER_PATTERN = "[A-Za-z0-9_<>\\-]{1,32}";
const MAX_LOSS_POINTS = 400;

/** The page's own stylesheet, linked once (the console's CSP allows styles from 'self' only). */
function linkStylesheet() {
  if (document.querySelector('link[data-page-css="loras"]')) return;
  document.head.append(h("link", { rel: "stylesheet", href: new URL("./loras.css", import.meta.url).href,
    dataset: { pageCss: "loras" } }));
}

function isZip(file) {
  return file.type === "application/zip" || file.type === "application/x-zip-compressed"
    || /\.zip$/i.test(file.name);
}

function isImage(file) {
  return IMAGE_TYPES.has(file.type) || /\.(png|jpe?g|webp)$/i.test(file.name);
}

function fileKey(file) {
  return `${file.name}:${file.size}:${file.lastModified}`;
}

function formatLoss(value) {
  const v = Number(value);
  if (!Number.isFinite(v)) return "—";
  return Math.abs(v) >= 0.01 ? v.toFixed(4) : v.toExponential(2);
}

const STAGE_LABEL = {
  queued: "Waiting for a trainer", preparing: "Preparing the photos", training: "Training",
  exporting: "Exporting the weights", uploading: "Storing the result", done: "Done",
};

function stageText(status, stage) {
  if (status === "succeeded") return "Trained";
  if (status === "failed") return "Training failed";
  if (status === "canceled") return "Canceled";
  return STAGE_LABEL[stage] || stage || "Waiting";
}

/** A small SVG line of the loss so far (no library, no inline style: attributes only). */
function lossChart() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "loss-chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Training loss per step");
  svg.dataset.testid = "lora-loss-chart";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(line);
  return {
    el: svg,
    draw(points) {
      if (points.length < 2) {
        line.setAttribute("points", "");
        return;
      }
      const values = points.map((p) => p.loss);
      const lo = Math.min(...values);
      const span = Math.max(...values) - lo || 1;
      const last = points[points.length - 1].step;
      const first = points[0].step;
      const width = last - first || 1;
      line.setAttribute("points", points.map((p) =>
        `${(((p.step - first) / width) * 100).toFixed(2)},${(28 - ((p.loss - lo) / span) * 26).toFixed(2)}`).join(" "));
    },
  };
}

/** One LoRA's card; `update(lora)` from the API view, `progress(event)` from the SSE stream. */
function loraCard(initial, ctx, { onDelete }) {
  let lora = initial;
  const losses = [];
  const badgeSlot = h("span", { class: "lora-badge" });
  const stage = h("p", { class: "lora-stage", dataset: { testid: "lora-stage" } });
  // announced to screen readers on stage changes and every 10 %, not on every step
  const announce = h("p", { class: "visually-hidden", "aria-live": "polite", dataset: { testid: "lora-announce" } });
  let announced = "";
  const bar = progressBar(`Training progress of ${lora.name}`);
  const lossText = h("p", { class: "lora-loss", dataset: { testid: "lora-loss" } });
  const chart = lossChart();
  const lossBox = h("div", { class: "lora-loss-box", hidden: true }, lossText, chart.el);
  const media = h("div", { class: "lora-validation", dataset: { testid: "lora-validation" } });
  const error = h("p", { class: "error", role: "alert", hidden: true, dataset: { testid: "lora-error" } });
  const credits = h("p", { class: "muted lora-credits", dataset: { testid: "lora-credits" } });
  const generate = h("button", { type: "button", class: "primary", hidden: true, dataset: { testid: "lora-generate" },
    onclick: () => ctx.navigate(`#/generate?${new URLSearchParams({ model: lora.base_model, lora: lora.id })}`) },
  "Generate with it");
  let confirming = false;
  const del = h("button", { type: "button", class: "danger", dataset: { testid: "lora-delete" } }, "Delete");
  const keep = h("button", { type: "button", hidden: true, dataset: { testid: "lora-delete-keep" } }, "Keep it");
  const resetDelete = () => {
    confirming = false;
    del.textContent = "Delete";
    keep.hidden = true;
  };
  keep.addEventListener("click", () => {
    resetDelete();
    del.focus();
  });
  del.addEventListener("click", async () => {
    if (!confirming) { // two steps instead of window.confirm (keyboard and screen-reader friendly)
      confirming = true;
      del.textContent = ACTIVE.has(lora.status) ? "Confirm: stop training and delete" : "Confirm delete";
      keep.hidden = false;
      return;
    }
    del.disabled = true;
    try {
      await ctx.api(`/v1/loras/${encodeURIComponent(lora.id)}`, { method: "DELETE" });
      ctx.toast(`Deleted ${lora.name}.`, "success");
      onDelete(lora);
    } catch (err) {
      del.disabled = false;
      resetDelete();
      ctx.toast(errorText(err), "error");
    }
  });
  const params = lora.params || {};
  const title = h("h3", {}, lora.name);
  const meta = h("p", { class: "model-meta" },
    h("span", {}, "Trigger ", h("code", { dataset: { testid: "lora-trigger" } }, lora.trigger_word)),
    h("span", { class: "tag" }, lora.base_model),
    params.steps ? h("span", { class: "tag" }, `${params.steps} steps`) : null,
    params.resolution ? h("span", { class: "tag" }, `${params.resolution} px`) : null,
    params.rank ? h("span", { class: "tag" }, `rank ${params.rank}`) : null,
    h("span", {}, formatDate(lora.created_at)));
  const el = h("li", { class: "card lora-card", dataset: { testid: "lora-card", loraId: lora.id } },
    h("div", { class: "lora-head" }, title, badgeSlot), meta, stage, announce,
    h("div", { class: "lora-progress" }, bar.el), lossBox, error, media, credits,
    h("div", { class: "actions" }, generate, del, keep));

  function setAnnouncement(text) {
    if (text !== announced) {
      announced = text;
      announce.textContent = text;
    }
  }

  function render() {
    replace(badgeSlot, jobStatusBadge(lora.status));
    el.dataset.status = lora.status;
    const pct = Math.round((lora.progress || 0) * 100);
    stage.textContent = stageText(lora.status, lora.stage);
    const active = ACTIVE.has(lora.status);
    bar.el.hidden = !active && lora.status !== "succeeded";
    bar.set(lora.status === "succeeded" ? 1 : lora.progress || 0);
    setAnnouncement(active ? `${lora.name}: ${stage.textContent}, ${Math.floor(pct / 10) * 10} %`
      : `${lora.name}: ${stage.textContent}`);
    const summary = lora.summary && lora.summary.loss;
    if (losses.length) {
      const last = losses[losses.length - 1];
      lossText.textContent = `Step ${last.step} of ${last.total} · loss ${formatLoss(last.loss)}`;
      lossBox.hidden = false;
    } else if (summary) {
      lossText.textContent = `Loss ${formatLoss(summary.first)} → ${formatLoss(summary.last)} `
        + `(lowest ${formatLoss(summary.min)})`;
      lossBox.hidden = false;
    }
    chart.draw(losses);
    chart.el.hidden = losses.length < 2;
    if (lora.error) {
      error.textContent = lora.error.message ? `${lora.error.message} (${lora.error.code})` : lora.error.code;
      error.hidden = false;
    } else {
      error.hidden = true;
    }
    if (lora.validation_url && !media.querySelector("img")) {
      replace(media, h("figure", {},
        h("img", { src: lora.validation_url, alt: `Validation image of ${lora.name} (“a photo of ${lora.trigger_word}”)`,
          dataset: { testid: "lora-validation-image" }, width: 128, height: 128 }),
        h("figcaption", { class: "muted" }, `Validation: “a photo of ${lora.trigger_word}”`)));
    }
    const c = lora.credits;
    if (c) {
      credits.textContent = lora.status === "succeeded" ? `Charged ${formatCredits(c.charged)}`
        : c.refunded ? `Refunded ${formatCredits(c.refunded)}` : `Reserved ${formatCredits(c.reserved)}`;
    }
    generate.hidden = lora.status !== "succeeded";
  }

  render();
  return {
    el,
    get lora() { return lora; },
    update(next) {
      lora = { ...lora, ...next };
      render();
    },
    progress(data) {
      const next = { ...lora, status: lora.status === "queued" ? "running" : lora.status };
      if (data.stage) next.stage = data.stage;
      if (typeof data.progress === "number") next.progress = data.progress;
      lora = next;
      if (typeof data.loss === "number" && typeof data.step === "number") {
        if (!losses.length || losses[losses.length - 1].step < data.step) {
          losses.push({ step: data.step, total: data.total, loss: data.loss });
          if (losses.length > MAX_LOSS_POINTS) losses.splice(0, losses.length - MAX_LOSS_POINTS);
        }
      }
      render();
    },
  };
}

/** The training form: files (drop or pick), name, trigger word, base model, steps, resolution, price. */
function trainingForm(models, ctx, { onCreated }) {
  let files = [];
  const previews = new Map(); // file key -> object URL
  const fileInput = h("input", { type: "file", id: "lora-files", name: "file", multiple: true, accept: ACCEPT,
    "aria-describedby": "lora-files-hint lora-files-error", dataset: { testid: "lora-files" } });
  const fileList = h("ul", { class: "lora-files", dataset: { testid: "lora-file-list" } });
  const fileCount = h("p", { class: "muted", "aria-live": "polite", dataset: { testid: "lora-file-count" } },
    "No photos yet.");
  const filesError = h("p", { class: "field-error", id: "lora-files-error", role: "alert", hidden: true,
    dataset: { testid: "error-files" } });
  const drop = h("div", { class: "dropzone", dataset: { testid: "lora-dropzone" } },
    h("p", { class: "dropzone-text" }, "Drag photos (PNG, JPEG, WebP) or one ZIP here"),
    h("label", { for: "lora-files" }, "…or choose files"),
    fileInput,
    h("p", { class: "field-hint", id: "lora-files-hint" },
      "5–30 photos of one subject work best. A ZIP may hold captions as .txt files beside the images."));

  const setFilesError = (message) => {
    filesError.textContent = message || "";
    filesError.hidden = !message;
    if (message) fileInput.setAttribute("aria-invalid", "true");
    else fileInput.removeAttribute("aria-invalid");
  };

  function renderFiles() {
    const keys = new Set(files.map(fileKey));
    for (const [key, url] of previews) {
      if (!keys.has(key)) {
        URL.revokeObjectURL(url);
        previews.delete(key);
      }
    }
    replace(fileList, files.map((file) => {
      const key = fileKey(file);
      let thumb;
      if (isZip(file)) {
        thumb = h("span", { class: "lora-file-zip", "aria-hidden": "true" }, "ZIP");
      } else {
        if (!previews.has(key)) previews.set(key, URL.createObjectURL(file));
        thumb = h("img", { src: previews.get(key), alt: "", width: 48, height: 48 });
      }
      return h("li", { class: "lora-file", dataset: { testid: "lora-file" } }, thumb,
        h("span", { class: "lora-file-name" }, file.name),
        h("button", { type: "button", class: "link", "aria-label": `Remove ${file.name}`,
          onclick: () => {
            files = files.filter((f) => fileKey(f) !== key);
            renderFiles();
            fileInput.focus();
          } }, "Remove"));
    }));
    const images = files.filter((f) => !isZip(f)).length;
    const zips = files.length - images;
    fileCount.textContent = !files.length ? "No photos yet."
      : [images ? `${images} ${images === 1 ? "photo" : "photos"}` : null,
        zips ? `${zips} ZIP ${zips === 1 ? "file" : "files"}` : null].filter(Boolean).join(" and ") + " selected.";
  }

  function addFiles(list) {
    const refused = [];
    const known = new Set(files.map(fileKey));
    for (const file of list) {
      if (!isImage(file) && !isZip(file)) {
        refused.push(file.name);
        continue;
      }
      if (!known.has(fileKey(file))) {
        files.push(file);
        known.add(fileKey(file));
      }
    }
    setFilesError(refused.length ? `Not an image or ZIP: ${refused.join(", ")}` : null);
    renderFiles();
  }

  fileInput.addEventListener("change", () => {
    addFiles([...fileInput.files]);
    fileInput.value = ""; // picking the same file again still fires change
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  drop.addEventListener("dragleave", (event) => {
    if (!drop.contains(event.relatedTarget)) drop.classList.remove("dragging");
  });
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    addFiles([...(event.dataTransfer ? event.dataTransfer.files : [])]);
  });

  const fields = {};
  const name = field("Name", h("input", { type: "text", name: "name", required: true, maxlength: 100,
    autocomplete: "off", dataset: { testid: "input-name" } }), { name: "name", hint: "For you: shown in your list." });
  const trigger = field("Trigger word", h("input", { type: "text", name: "trigger_word", required: true,
    maxlength: 32, pattern: TRIGGER_PATTERN, value: "TOK", autocomplete: "off", spellcheck: "false",
    dataset: { testid: "input-trigger_word" } }),
  { name: "trigger_word", hint: "Put it in a prompt to call up your subject: “a photo of TOK”. "
    + "Letters, digits, _ - < > (up to 32)." });
  // available models first; one that is not deployed here is listed but cannot be picked
  const ordered = [...models.filter((m) => m.available !== false), ...models.filter((m) => m.available === false)];
  const base = field("Base model", h("select", { name: "base_model", dataset: { testid: "input-base_model" } },
    ordered.map((m) => h("option", { value: m.id, disabled: m.available === false },
      `${m.name} (${m.id})${m.available === false ? ` — unavailable: ${m.unavailable_reason || "not deployed"}` : ""}`))),
  { name: "base_model" });
  const steps = field("Steps", h("input", { type: "number", name: "steps", required: true, step: 1,
    inputmode: "numeric", dataset: { testid: "input-steps" } }), { name: "steps", hint: " " });
  const stepsHint = steps.el.querySelector(".field-hint");
  const resolution = field("Resolution", h("select", { name: "resolution", dataset: { testid: "input-resolution" } }),
    { name: "resolution" });
  Object.assign(fields, { name, trigger_word: trigger, base_model: base, steps, resolution });
  const presets = h("div", { class: "lora-presets", role: "group", "aria-label": "Step presets" });
  const price = h("output", { class: "price", for: steps.input.id, "aria-live": "polite",
    dataset: { testid: "lora-price" } }, "—");
  const priceNote = h("p", { class: "field-hint", dataset: { testid: "lora-price-note" } });
  const formError = h("p", { class: "error", role: "alert", hidden: true, dataset: { testid: "lora-form-error" } });
  const submit = h("button", { type: "submit", class: "primary", dataset: { testid: "lora-submit" } }, "Start training");
  const busy = h("p", { class: "muted", "aria-live": "polite", dataset: { testid: "lora-busy" } });

  const spec = () => models.find((m) => m.id === base.input.value) || models[0];

  function applySpec() {
    const m = spec();
    const [low, high] = (m.limits && m.limits.training_steps) || [1, 100000];
    steps.input.min = String(low);
    steps.input.max = String(high);
    const current = Number(steps.input.value);
    if (!current || current < low || current > high) {
      steps.input.value = String(Math.min(high, Math.max(low, 1200)));
    }
    replace(presets, PRESETS.filter((n) => n >= low && n <= high).map((n) =>
      h("button", { type: "button", class: "preset", "aria-pressed": String(Number(steps.input.value) === n),
        dataset: { testid: `steps-${n}` }, onclick: () => {
          steps.input.value = String(n);
          steps.input.dispatchEvent(new Event("input", { bubbles: true }));
        } }, String(n))));
    const resolutions = (m.limits && m.limits.training_resolutions) || [];
    replace(resolution.input, resolutions.map((r) => h("option", { value: String(r) }, `${r} px`)));
    resolution.el.hidden = resolutions.length < 2;
    stepsHint.textContent = `Between ${low} and ${high}. More steps learn more and cost more.`;
  }

  function body(images) {
    const out = { name: name.input.value.trim() || "untitled", base_model: spec().id,
      trigger_word: trigger.input.value.trim(), steps: Number(steps.input.value) };
    if (resolution.input.value) out.resolution = Number(resolution.input.value);
    if (images) out.images = images;
    return out;
  }

  let quoteSeq = 0;
  async function quote() {
    const seq = ++quoteSeq;
    for (const b of presets.querySelectorAll("button")) {
      b.setAttribute("aria-pressed", String(Number(b.textContent) === Number(steps.input.value)));
    }
    steps.setError(null);
    trigger.setError(null);
    price.dataset.credits = "";
    if (!steps.input.value) {
      price.textContent = "—";
      return;
    }
    price.textContent = "Pricing…";
    try {
      const q = await ctx.api("/v1/loras/quote", { method: "POST", json: body(), signal: ctx.signal });
      if (seq !== quoteSeq) return;
      price.textContent = formatCredits(q.credits);
      price.dataset.credits = String(q.credits);
      const available = q.balance ? q.balance.available : null;
      priceNote.textContent = available === null || available === undefined ? ""
        : q.affordable === false ? `You have ${formatCredits(available)}: not enough for this training.`
          : `You have ${formatCredits(available)}.`;
    } catch (err) {
      if (seq !== quoteSeq || (err && err.name === "AbortError")) return;
      price.textContent = "—";
      priceNote.textContent = "";
      if (!showFieldErrors(err, fields)) priceNote.textContent = errorText(err);
    }
  }
  const requote = debounce(quote, 250);
  for (const f of [steps, trigger, resolution]) f.input.addEventListener("input", requote);
  resolution.input.addEventListener("change", requote);
  base.input.addEventListener("change", () => {
    applySpec();
    quote();
  });

  const form = h("form", { class: "card lora-form", novalidate: true, dataset: { testid: "lora-form" } },
    h("h2", {}, "Train a LoRA"),
    drop, fileCount, filesError, fileList,
    h("div", { class: "fields" }, name.el, trigger.el, base.el, resolution.el),
    h("div", { class: "lora-steps" }, steps.el, presets),
    h("p", {}, "Price: ", price), priceNote,
    formError,
    h("div", { class: "actions" }, submit, busy));
  base.el.hidden = ordered.length < 2;

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formError.hidden = true;
    for (const f of Object.values(fields)) f.setError(null);
    setFilesError(null);
    let invalid = null;
    if (!files.length) {
      setFilesError("Add at least one photo (or one ZIP).");
      invalid = invalid || fileInput;
    }
    if (!name.input.value.trim()) {
      name.setError("Give the LoRA a name.");
      invalid = invalid || name.input;
    }
    if (!new RegExp(`^${TRIGGER_PATTERN}$`).test(trigger.input.value.trim())) {
      trigger.setError("1–32 letters, digits, _ - < > (no spaces).");
      invalid = invalid || trigger.input;
    }
    if (invalid) {
      invalid.focus();
      return;
    }
    submit.disabled = true;
    let uploaded = [];
    try {
      busy.textContent = `Uploading ${files.length} ${files.length === 1 ? "file" : "files"}…`;
      const data = new FormData();
      for (const file of files) data.append("file", file, file.name);
      const up = await ctx.api("/v1/uploads", { method: "POST", form: data });
      uploaded = (up.data || [up]).map((u) => u.id);
      busy.textContent = "Starting the training…";
      const created = await ctx.api("/v1/loras", { method: "POST", json: body(uploaded) });
      uploaded = []; // the LoRA owns them now
      ctx.toast(`Training “${created.name}” started: ${formatCredits(created.job.credits.reserved)} reserved.`,
        "success");
      files = [];
      renderFiles();
      name.input.value = "";
      if (ctx.refreshCredits) ctx.refreshCredits();
      onCreated(created);
      quote(); // the balance beside the price moved
    } catch (err) {
      if (err instanceof ApiError && !showFieldErrors(err, fields)) {
        const target = ["too_many_files", "invalid_upload", "payload_too_large", "no_images",
          "unsupported_media_type"].includes(err.code) || err.details.field === "images" ? setFilesError : null;
        if (target) target(errorText(err));
        else {
          formError.textContent = errorText(err);
          formError.hidden = false;
        }
      } else if (!(err instanceof ApiError)) {
        formError.textContent = errorText(err);
        formError.hidden = false;
      }
      // uploads a refused training left behind are removed (best effort)
      for (const id of uploaded) {
        ctx.api(`/v1/uploads/${encodeURIComponent(id)}`, { method: "DELETE" }).catch(() => {});
      }
    } finally {
      submit.disabled = false;
      busy.textContent = "";
    }
  });

  applySpec();
  quote();
  return {
    el: form,
    cleanup() {
      requote.cancel();
      for (const url of previews.values()) URL.revokeObjectURL(url);
      previews.clear();
    },
  };
}

export default {
  id: "loras",
  title: "LoRAs",
  nav: "user",
  async render(root, ctx) {
    linkStylesheet();
    const [models, list] = await Promise.all([
      ctx.api("/v1/models", { signal: ctx.signal }),
      ctx.api("/v1/loras", { signal: ctx.signal }),
    ]);
    const trainable = (models.data || []).filter((m) => m.trainable && m.enabled !== false);
    const streams = new Map(); // lora id -> close()
    const cards = new Map();
    const listEl = h("ul", { class: "lora-list", dataset: { testid: "lora-list" } });
    const empty = h("p", { class: "muted", dataset: { testid: "lora-empty" } },
      "No LoRAs yet. Train one from a few photos of your subject.");
    let closed = false;

    const syncEmpty = () => { empty.hidden = cards.size > 0; };

    async function refresh(id) {
      try {
        const view = await ctx.api(`/v1/loras/${encodeURIComponent(id)}`);
        if (!closed && cards.has(id)) cards.get(id).update(view);
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) console.warn("could not refresh LoRA", id, err);
      }
    }

    function follow(card) {
      const { id, job_id: jobId } = card.lora;
      if (!jobId || streams.has(id) || !ACTIVE.has(card.lora.status)) return;
      streams.set(id, ctx.streamEvents(jobId, {
        status: (data) => { if (data.status) card.update({ status: data.status }); },
        progress: (data) => card.progress(data),
        completed: (data) => {
          const job = data.job || {};
          card.update({ status: job.status || data.status, stage: job.stage, progress: job.progress,
            credits: job.credits, error: job.error });
          streams.delete(id);
          refresh(id); // the validation image and the loss summary live on the LoRA
          if (ctx.refreshCredits) ctx.refreshCredits();
        },
        onError: (err) => {
          streams.delete(id);
          if (!closed) ctx.toast(`Lost the training's progress: ${errorText(err)}`, "error");
        },
      }));
    }

    function add(lora, { first = false } = {}) {
      const card = loraCard(lora, ctx, {
        onDelete: (gone) => {
          const close = streams.get(gone.id);
          if (close) close();
          streams.delete(gone.id);
          cards.get(gone.id)?.el.remove();
          cards.delete(gone.id);
          syncEmpty();
          if (ctx.refreshCredits) ctx.refreshCredits();
        },
      });
      cards.set(lora.id, card);
      if (first) listEl.prepend(card.el);
      else listEl.append(card.el);
      syncEmpty();
      follow(card);
      return card;
    }

    root.append(h("h1", {}, "LoRAs"),
      h("p", { class: "muted" }, "A LoRA teaches a model your subject from a few photos. Train it once, then use it "
        + "in any generation on its base model."));
    let form = null;
    if (trainable.some((m) => m.available !== false)) {
      form = trainingForm(trainable, ctx, {
        onCreated: (created) => {
          const { job, ...lora } = created;
          add({ ...lora, status: job.status, stage: job.stage, progress: job.progress, credits: job.credits,
            job_id: job.id }, { first: true });
        },
      });
      root.append(form.el);
    } else {
      root.append(h("p", { class: "card", dataset: { testid: "lora-no-trainable" } },
        "No model on this server can be trained right now."));
    }
    root.append(h("h2", {}, "Your LoRAs"), empty, listEl);
    for (const lora of list.data || []) add(lora);
    return () => {
      closed = true;
      for (const close of streams.values()) close();
      streams.clear();
      if (form) form.cleanup();
    };
  },
};
