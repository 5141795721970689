// Small DOM helpers shared by every page (no framework: plain elements).

/**
 * Build an element: h("button", {class: "primary", onclick: fn, dataset: {testid: "x"}}, "Go").
 * Attributes: `class`, `style` (string or object), `dataset`, `on<event>` functions, booleans
 * (true sets an empty attribute, false/null/undefined leaves it out), `value`/`checked` as properties.
 * Children: strings, numbers, nodes, arrays of them; null/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class" || name === "className") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked" || name === "selected" || name === "muted") el[name] = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Empty an element and put children in it. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function formatCredits(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "—";
  const v = Number(n);
  return `${v.toLocaleString("en-US")} ${Math.abs(v) === 1 ? "credit" : "credits"}`;
}

export function formatDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function formatSeconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

const STATUS_LABEL = {
  queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed", canceled: "Canceled",
};

/** A status pill: <span class="badge badge-running" data-status="running">Running</span>. */
export function jobStatusBadge(status) {
  return h("span", { class: `badge badge-${status || "unknown"}`, "data-status": status || "",
    dataset: { testid: "status-badge" } }, STATUS_LABEL[status] || status || "unknown");
}

/**
 * A labelled progress bar; answers {el, set(fraction, text?)}. Uses <progress> so assistive
 * technology reads it; `set` takes 0..1.
 */
export function progressBar(label = "Progress") {
  const bar = h("progress", { max: "100", value: "0", "aria-label": label, dataset: { testid: "progress" } });
  const text = h("span", { class: "progress-text", dataset: { testid: "progress-text" } }, "0 %");
  const el = h("div", { class: "progress" }, bar, text);
  return {
    el,
    set(fraction, caption) {
      const pct = Math.max(0, Math.min(100, Math.round((Number(fraction) || 0) * 100)));
      bar.value = pct;
      bar.dataset.value = String(pct);
      text.textContent = caption || `${pct} %`;
    },
  };
}

let fieldCounter = 0;

/** A labelled field: answers {el, input, error} where `error` shows a message next to the input. */
export function field(labelText, input, { hint, name } = {}) {
  const id = input.id || `f-${name || "x"}-${++fieldCounter}`;
  input.id = id;
  const errorId = `${id}-error`;
  const error = h("p", { class: "field-error", id: errorId, role: "alert", hidden: true,
    dataset: { testid: `error-${name || id}` } });
  const hintEl = hint ? h("p", { class: "field-hint", id: `${id}-hint` }, hint) : null;
  input.setAttribute("aria-describedby", [hintEl ? `${id}-hint` : null, errorId].filter(Boolean).join(" "));
  const el = h("div", { class: "field", dataset: { field: name || "" } },
    h("label", { for: id }, labelText), input, hintEl, error);
  return {
    el, input, error,
    setError(message) {
      if (message) {
        error.textContent = message;
        error.hidden = false;
        input.setAttribute("aria-invalid", "true");
      } else {
        error.textContent = "";
        error.hidden = true;
        input.removeAttribute("aria-invalid");
      }
    },
  };
}

/**
 * Fields from a list of specs: [{name, label, type: "number"|"text"|"textarea"|"select"|"checkbox",
 * min, max, step, value, options: [[value, label]], hint, required}]. Answers
 * {el, fields: {name: field}, values(), setErrors(apiError)}. `values()` leaves out empty inputs
 * and turns number inputs into numbers.
 */
export function formFromSpec(specs) {
  const fields = {};
  const el = h("div", { class: "fields" });
  for (const spec of specs) {
    let input;
    const common = { name: spec.name, required: spec.required || false, dataset: { testid: `input-${spec.name}` } };
    if (spec.type === "textarea") {
      input = h("textarea", { ...common, rows: spec.rows || 3, maxlength: spec.maxlength }, spec.value ?? "");
    } else if (spec.type === "select") {
      input = h("select", common, (spec.options || []).map(([v, label]) =>
        h("option", { value: v, selected: String(v) === String(spec.value ?? "") }, label)));
    } else if (spec.type === "checkbox") {
      input = h("input", { ...common, type: "checkbox", checked: Boolean(spec.value) });
    } else {
      input = h("input", { ...common, type: spec.type || "text", min: spec.min, max: spec.max,
        step: spec.step, placeholder: spec.placeholder, inputmode: spec.type === "number" ? "decimal" : null,
        value: spec.value ?? "" });
    }
    const f = field(spec.label, input, { hint: spec.hint, name: spec.name });
    fields[spec.name] = f;
    el.append(f.el);
  }
  return {
    el, fields,
    values() {
      const out = {};
      for (const [name, f] of Object.entries(fields)) {
        const input = f.input;
        if (input.type === "checkbox") out[name] = input.checked;
        else if (input.value === "") continue;
        else if (input.type === "number") out[name] = Number(input.value);
        else out[name] = input.value;
      }
      return out;
    },
    setErrors(err) {
      for (const f of Object.values(fields)) f.setError(null);
      return showFieldErrors(err, fields);
    },
  };
}

/**
 * Put an ApiError's field messages next to their fields (details.field, or details.errors[] from
 * the request parser). Answers true when at least one field got its message.
 */
export function showFieldErrors(err, fields) {
  if (!err || !err.details) return false;
  const found = [];
  const strip = (f) => String(f || "").replace(/^input\./, "").split(".")[0];
  if (err.details.field) found.push([strip(err.details.field), err.message]);
  for (const e of err.details.errors || []) found.push([strip(e.field), e.message]);
  let shown = false;
  for (const [name, message] of found) {
    if (fields[name]) {
      fields[name].setError(message);
      shown = true;
    }
  }
  return shown;
}

/** A readable one-line text for any error (an ApiError's message, never a stack trace). */
export function errorText(err) {
  if (!err) return "Something went wrong.";
  if (err.name === "ApiError") return err.message || err.code;
  return err.message || String(err);
}

/** Wait `ms` after the last call before running fn (for quotes while typing). */
export function debounce(fn, ms = 300) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** A media element for an output: <video controls> for MP4, <img> otherwise. */
export function mediaFor(output, { alt = "output", poster } = {}) {
  if (!output) return null;
  const type = output.content_type || "";
  if (type.startsWith("video/")) {
    return h("video", { src: output.url, controls: true, preload: "metadata", playsinline: true,
      poster: poster || output.thumbnail_url || null, dataset: { testid: "output-video" },
      width: output.width || null, height: output.height || null });
  }
  return h("img", { src: output.url, alt, dataset: { testid: "output-image" }, loading: "lazy" });
}

/** A job or upload id short enough for a caption ("job_3408ac36"). */
export function shortId(id) {
  return String(id || "").slice(0, 12);
}
