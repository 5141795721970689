// Generate: pick a model, fill a form built from its spec (limits -> min/max/step), optionally an
// input image (upload or an earlier output as `job:<id>`) and LoRAs, see the server's price
// (POST /v1/jobs/quote, debounced) and submit (POST /v1/jobs), then follow the job live.
// Query (from the Library): ?model=<id>&image=job:<id> ("use as input"), ?from=<job id> ("run again").

import { ApiError } from "../lib/api.js";
import { debounce, errorText, field, formatCredits, formFromSpec, h, replace, showFieldErrors, shortId } from "../lib/ui.js";

function priceSummary(model) {
  const p = model.pricing || {};
  if (p.credits_per_image != null) return `${p.credits_per_image} credits/image`;
  if (p.credits_per_second != null) return `${p.credits_per_second} credits/s`;
  if (p.credits_per_reference_clip != null) return `${p.credits_per_reference_clip} credits/clip`;
  return "priced by the server";
}

function takesImage(model) {
  return model.tasks.includes("i2i") || model.tasks.includes("i2v");
}

function needsImage(model) {
  return !model.tasks.includes("t2i") && !model.tasks.includes("t2v");
}

/** The form fields a model's spec calls for, with its limits as min/max/step. */
function fieldSpecs(model) {
  const d = model.defaults || {};
  const lim = model.limits || {};
  const specs = [
    { name: "prompt", label: "Prompt", type: "textarea", required: true, value: "" },
    { name: "negative_prompt", label: "Negative prompt", type: "textarea", rows: 2, value: d.negative_prompt || "" },
  ];
  if (model.remote_only) {
    if (lim.durations) {
      specs.push({ name: "duration", label: "Duration (s)", type: "select", value: d.duration,
        options: lim.durations.map((v) => [v, `${v} s`]) });
    }
    if (lim.resolutions) {
      specs.push({ name: "resolution", label: "Resolution", type: "select", value: d.resolution,
        options: lim.resolutions.map((v) => [v, v]) });
    }
    if (lim.aspect_ratios) {
      specs.push({ name: "aspect_ratio", label: "Aspect ratio", type: "select", value: d.aspect_ratio,
        options: lim.aspect_ratios.map((v) => [v, v]) });
    }
  } else {
    const mult = lim.size_multiple || 8;
    specs.push(
      { name: "width", label: "Width (px)", type: "number", min: lim.min_width, max: lim.max_width, step: mult,
        value: d.width, hint: `${lim.min_width}–${lim.max_width}, multiple of ${mult}` },
      { name: "height", label: "Height (px)", type: "number", min: lim.min_height, max: lim.max_height, step: mult,
        value: d.height, hint: `${lim.min_height}–${lim.max_height}, multiple of ${mult}` },
      { name: "steps", label: "Steps", type: "number", min: 1, max: lim.max_steps, step: 1, value: d.steps,
        hint: `1–${lim.max_steps}` },
      { name: "guidance", label: "Guidance", type: "number", min: 0, max: 50, step: 0.1, value: d.guidance },
    );
    if (model.kind === "video") {
      const fm = lim.frame_multiple || 1;
      specs.push(
        { name: "num_frames", label: "Frames", type: "number", min: lim.min_frames, max: lim.max_frames, step: fm,
          value: d.num_frames, hint: lim.min_frames != null
            ? `${lim.min_frames}–${lim.max_frames}${fm > 1 ? `, ${fm}·k + ${lim.frame_offset || 0}` : ""}` : null },
        { name: "fps", label: "Frames per second", type: "number", min: lim.min_fps, max: lim.max_fps, step: 1,
          value: d.fps },
      );
    } else {
      specs.push({ name: "num_outputs", label: "Images", type: "number", min: 1, max: 10, step: 1, value: 1 });
    }
  }
  specs.push({ name: "seed", label: "Seed", type: "number", min: 0, max: 4294967295, step: 1,
    hint: "empty: random (the job records the seed it used)" });
  return specs;
}

export default {
  id: "generate",
  title: "Generate",
  nav: "user",
  async render(root, ctx) {
    const { api, query, signal } = ctx;
    root.append(h("h1", {}, "Generate"));
    const [models, loras] = await Promise.all([
      api("/v1/models", { signal }),
      api("/v1/loras", { signal }).catch(() => ({ data: [] })),
    ]);
    const usable = models.data.filter((m) => m.kind === "image" || m.kind === "video");
    if (!usable.length) {
      root.append(h("p", { class: "error" }, "No models are enabled on this server."));
      return null;
    }
    // "run again": the source job's model and input
    let source = null;
    if (query.get("from")) {
      try {
        source = await api(`/v1/jobs/${encodeURIComponent(query.get("from"))}`, { signal });
      } catch (e) {
        ctx.toast(`Could not load the job to run again: ${errorText(e)}`, "error");
      }
    }
    const presetImage = query.get("image") || (source && source.input.image) || "";
    let initial = query.get("model") || (source && source.model);
    if (!usable.some((m) => m.id === initial)) {
      const pick = presetImage
        ? usable.find((m) => m.available && m.tasks.includes("i2v")) || usable.find((m) => m.available && takesImage(m))
        : usable.find((m) => m.available);
      initial = (pick || usable[0]).id;
    }

    const modelSelect = h("select", { name: "model", dataset: { testid: "model-select" } },
      usable.map((m) => h("option", { value: m.id, selected: m.id === initial, disabled: !m.available },
        `${m.name} — ${m.kind} · ${priceSummary(m)}${m.available ? "" : ` (unavailable: ${m.unavailable_reason || "?"})`}`)));
    const modelField = field("Model", modelSelect, { name: "model" });
    const meta = h("div", { class: "model-meta", dataset: { testid: "model-meta" } });
    const specHost = h("div");
    const imageHost = h("div");
    const loraHost = h("div");
    const price = h("output", { class: "price", "aria-live": "polite", dataset: { testid: "price" } }, "—");
    const formError = h("p", { class: "error", role: "alert", hidden: true, dataset: { testid: "form-error" } });
    const submit = h("button", { type: "submit", class: "primary", dataset: { testid: "submit" } }, "Generate");
    const balance = ctx.whoami.credits
      ? h("span", { class: "muted", dataset: { testid: "balance" } }, `You have ${formatCredits(ctx.whoami.credits.balance)}.`)
      : null;
    const form = h("form", { class: "card", novalidate: true, dataset: { testid: "generate-form" } },
      modelField.el, meta, specHost, imageHost, loraHost,
      h("div", { class: "actions" }, h("span", {}, "Price: ", price), balance),
      formError, h("div", { class: "actions" }, submit));
    root.append(form);

    let model = null;
    let spec = null;
    // the input image chosen so far; `set` is the current picker's setter (a model switch rebuilds
    // the picker: an upload still in flight lands in the new one, a chosen image is kept)
    let image = { value: "", url: null, field: null, set: null };
    let modelSeq = 0;
    let loraRows = [];
    let quoteController = null;
    let quoteSeq = 0;

    const allFields = () => ({ ...(spec ? spec.fields : {}), ...(image.field ? { image: image.field } : {}),
      model: modelField, ...(loraRows.length ? { loras: loraRows[0].field } : {}) });

    const clearErrors = () => {
      for (const f of Object.values(allFields())) f.setError(null);
      formError.hidden = true;
    };

    const showError = (err) => {
      if (!showFieldErrors(err, allFields())) {
        formError.textContent = errorText(err);
        formError.hidden = false;
      }
    };

    const body = () => {
      const input = spec.values();
      if (image.value) input.image = image.value;
      const chosen = loraRows.filter((r) => r.check.checked)
        .map((r) => ({ id: r.lora.id, scale: Number(r.scale.value || 1) }));
      if (chosen.length) input.loras = chosen;
      return { model: model.id, input };
    };

    const quote = debounce(async () => {
      if (!spec) return;
      const payload = body();
      if (!payload.input.prompt) {
        price.textContent = "enter a prompt";
        return;
      }
      if (quoteController) quoteController.abort();
      quoteController = new AbortController();
      const seq = ++quoteSeq;
      price.textContent = "…";
      try {
        const q = await api("/v1/jobs/quote", { method: "POST", json: payload, signal: quoteController.signal });
        if (seq !== quoteSeq) return;
        clearErrors();
        price.textContent = formatCredits(q.credits) + (q.affordable === false
          ? ` — more than your ${formatCredits(q.balance.available)}` : "");
        price.dataset.credits = String(q.credits);
        price.dataset.affordable = String(q.affordable !== false);
      } catch (e) {
        if (e.name === "AbortError" || seq !== quoteSeq) return;
        price.textContent = "—";
        delete price.dataset.credits;
        clearErrors();
        showError(e);
      }
    }, 300);

    function buildImagePicker(earlier) {
      const kept = { value: image.value, url: image.url };
      if (!takesImage(model)) {
        image = { value: "", url: null, field: null, set: null };
        replace(imageHost);
        return;
      }
      const preview = h("img", { alt: "the input image", class: "input-preview", hidden: true,
        dataset: { testid: "image-preview" }, width: 96 });
      const status = h("span", { class: "muted", dataset: { testid: "image-status" } },
        needsImage(model) ? "This model needs an input image." : "Optional.");
      const fileInput = h("input", { type: "file", accept: "image/png,image/jpeg,image/webp",
        dataset: { testid: "image-upload" } });
      const pick = h("select", { dataset: { testid: "image-pick" } },
        h("option", { value: "" }, "— none —"),
        earlier.map((j) => h("option", { value: `job:${j.id}`, selected: `job:${j.id}` === presetImage },
          `${(j.input.prompt || "").slice(0, 40)} · ${j.model} · ${shortId(j.id)}`)));
      const setImage = (value, url) => {
        image.value = value;
        image.url = url || null;
        if (!value.startsWith("job:")) pick.value = "";
        preview.hidden = !url;
        if (url) preview.src = url;
        status.textContent = value ? `Using ${value.startsWith("job:") ? "output of " + shortId(value.slice(4)) : "upload " + value}`
          : (needsImage(model) ? "This model needs an input image." : "Optional.");
        quote();
      };
      fileInput.addEventListener("change", async () => {
        const file = fileInput.files[0];
        if (!file) return;
        status.textContent = "Uploading…";
        const form = new FormData();
        form.append("file", file, file.name);
        try {
          const up = await api("/v1/uploads", { method: "POST", form });
          // the picker may have been rebuilt meanwhile (another model): the upload goes to the
          // current one, or nowhere when the model takes no image
          if (image.set) image.set(up.id, up.url);
          ctx.toast(`Uploaded ${file.name}`, "success");
        } catch (e) {
          image.field.setError(errorText(e));
          status.textContent = "Upload failed.";
        }
      });
      pick.addEventListener("change", () => {
        const job = earlier.find((j) => `job:${j.id}` === pick.value);
        setImage(pick.value, job ? job.thumbnail_url || (job.outputs[0] && job.outputs[0].url) : null);
      });
      const uploadField = field("Upload an image", fileInput, { name: "image" });
      const pickField = field("…or use an earlier output", pick, { name: "image-pick" });
      image = { value: "", url: null, field: uploadField, set: setImage };
      replace(imageHost, h("fieldset", { dataset: { testid: "image-input" } }, h("legend", {}, "Input image"),
        status, h("div", { class: "fields" }, uploadField.el, pickField.el), preview));
      if (kept.value) {
        if (kept.value.startsWith("job:")) pick.value = kept.value;
        setImage(kept.value, kept.url);
      } else if (presetImage) {
        const job = earlier.find((j) => `job:${j.id}` === presetImage);
        image.value = presetImage;
        if (job) setImage(presetImage, job.thumbnail_url || (job.outputs[0] && job.outputs[0].url));
        else setImage(presetImage, null);
      }
    }

    function buildLoraPicker() {
      const mine = loras.data.filter((l) => l.base_model === model.id && l.status === "succeeded");
      loraRows = [];
      if (!mine.length || model.remote_only) {
        replace(loraHost);
        return;
      }
      const wanted = new Map(((source && source.input.loras) || []).map((l) => [l.id, l.scale]));
      const preset = query.get("lora");
      if (preset && !wanted.has(preset)) wanted.set(preset, 1);
      const rows = mine.map((lora) => {
        const check = h("input", { type: "checkbox", id: `lora-${lora.id}`, checked: wanted.has(lora.id),
          dataset: { testid: `lora-${lora.id}` } });
        const scale = h("input", { type: "number", min: -4, max: 4, step: 0.05, value: wanted.get(lora.id) ?? 1,
          id: `lora-scale-${lora.id}`, dataset: { testid: `lora-scale-${lora.id}` } });
        const row = h("div", { class: "lora-row" },
          h("div", { class: "field" }, h("label", { for: check.id }, check, ` ${lora.name} (“${lora.trigger_word}”)`)),
          h("div", { class: "field" }, h("label", { for: scale.id }, "Scale"), scale));
        check.addEventListener("change", quote);
        scale.addEventListener("input", quote);
        return { lora, check, scale, row, field: { setError: () => {} } };
      });
      const error = h("p", { class: "field-error", role: "alert", hidden: true, dataset: { testid: "error-loras" } });
      rows[0].field = {
        setError(message) {
          error.textContent = message || "";
          error.hidden = !message;
        },
      };
      loraRows = rows;
      replace(loraHost, h("fieldset", { dataset: { testid: "lora-picker" } },
        h("legend", {}, `LoRAs (at most ${model.limits.max_loras ?? 3})`), rows.map((r) => r.row), error));
    }

    let earlierCache = null;
    async function earlierOutputs() {
      if (earlierCache) return earlierCache;
      try {
        const page = await api("/v1/jobs?kind=image&status=succeeded&limit=50", { signal });
        earlierCache = page.data.filter((j) => j.outputs.length);
      } catch {
        earlierCache = [];
      }
      return earlierCache;
    }

    async function selectModel(id) {
      const previous = spec ? spec.values() : null;
      model = usable.find((m) => m.id === id);
      replace(meta, h("span", { class: "tag", dataset: { testid: "model-kind" } }, model.kind),
        h("span", { class: "tag" }, model.tasks.join(", ")),
        h("span", { class: "tag", dataset: { testid: "model-price" } }, priceSummary(model)),
        model.description ? h("span", {}, model.description) : null);
      spec = formFromSpec(fieldSpecs(model));
      // a "run again" fills every field; switching models keeps the prompts and the seed (sizes
      // and steps start from the new model's defaults, which fit its limits)
      const keep = ["prompt", "negative_prompt", "seed"];
      const carry = source && source.model === model.id ? source.input
        : previous && Object.fromEntries(keep.filter((k) => k in previous).map((k) => [k, previous[k]]));
      if (carry) {
        for (const [name, f] of Object.entries(spec.fields)) {
          if (carry[name] !== undefined && carry[name] !== null && name !== "num_outputs") f.input.value = carry[name];
        }
        if (source && source.model === model.id && source.input.num_outputs) {
          spec.fields.num_outputs.input.value = source.input.num_outputs;
        }
      }
      replace(specHost, spec.el);
      const seq = ++modelSeq;
      const earlier = takesImage(model) ? await earlierOutputs() : [];
      if (seq !== modelSeq) return; // another model was chosen meanwhile: its call builds the rest
      buildImagePicker(earlier);
      buildLoraPicker();
      quote();
    }

    modelSelect.addEventListener("change", () => {
      clearErrors();
      source = null;
      selectModel(modelSelect.value);
    });
    specHost.addEventListener("input", quote);
    specHost.addEventListener("change", quote);

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      quote.cancel();
      clearErrors();
      const payload = body();
      if (!payload.input.prompt) {
        spec.fields.prompt.setError("Enter a prompt.");
        spec.fields.prompt.input.focus();
        return;
      }
      if (needsImage(model) && !payload.input.image) {
        image.field.setError("This model needs an input image: upload one or pick an earlier output.");
        return;
      }
      submit.disabled = true;
      try {
        const job = await api("/v1/jobs", { method: "POST", json: payload });
        ctx.toast(`Job ${shortId(job.id)} queued (${formatCredits(job.credits.reserved)} reserved)`, "success");
        ctx.refreshCredits();
        ctx.navigate(`#/job/${job.id}`);
      } catch (e) {
        showError(e);
        if (e instanceof ApiError && e.status === 402) ctx.refreshCredits();
      } finally {
        submit.disabled = false;
      }
    });

    await selectModel(initial);
    return () => {
      quote.cancel();
      if (quoteController) quoteController.abort();
    };
  },
};
