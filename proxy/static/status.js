// tokenrelay status page: fetches /-/status and writes it with textContent only.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="tokenrelay-csrf"]').content;
  const every = 5000;

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v >= 3600) return (v / 3600).toFixed(1) + " h";
    if (v >= 60) return Math.round(v / 60) + " min";
    return Math.round(v) + " s";
  }
  function ms(v) { return v === null || v === undefined ? "–" : Math.round(v * 1000) + " ms"; }
  function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "–"; }
  function pct(v) { return (v * 100).toFixed(1) + " %"; }
  function fill(id, rows) {
    const body = document.querySelector("#" + id + " tbody");
    body.replaceChildren(...rows);
  }
  function say(text) { document.getElementById("message").textContent = text; }

  async function act(provider, what, label) {
    if (!window.confirm(label + " for " + provider + "?")) return;
    const r = await fetch("/-/tokens/" + encodeURIComponent(provider) + "/" + what, {
      method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin",
    });
    let detail = "";
    try { const body = await r.json(); detail = body.detail || ""; } catch (e) { detail = ""; }
    say(r.ok ? label + " for " + provider + ": done" : label + " for " + provider + " refused: " + detail);
    refresh();
  }
  function button(td, text, provider, what) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.dataset.provider = provider;
    b.dataset.action = what;
    b.addEventListener("click", () => act(provider, what, text));
    td.appendChild(b);
  }

  function render(doc) {
    const reload = doc.last_reload ? doc.last_reload.outcome + " at " + when(doc.last_reload.time) : "none";
    document.getElementById("summary").textContent =
      "version " + doc.version + " · up " + secs(doc.uptime_seconds) + " · config " + doc.config +
      " · last reload " + reload + " · store " + doc.store.type +
      (doc.worker ? " · worker " + doc.worker : "") + " · pid " + doc.pid;
    fill("providers", doc.providers.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.provider = p.name;
      cell(tr, p.name);
      cell(tr, p.grant + (p.client_auth ? " / " + p.client_auth : ""));
      const state = p.cooldown_seconds_left ? "cooldown" : p.state;
      cell(tr, state, "state state-" + state);
      cell(tr, secs(p.seconds_left), "num");
      cell(tr, secs(p.refresh_in_seconds), "num");
      cell(tr, p.last_renewal ? p.last_renewal.why + " at " + when(p.last_renewal.time) : "–");
      cell(tr, p.last_error ? p.last_error + (p.last_error_vendor_detail ? ": " + p.last_error_vendor_detail : "") : "–");
      cell(tr, p.token_calls_last_hour, "num");
      const actions = cell(tr, "");
      actions.textContent = "";
      if (p.grant !== "static") {
        button(actions, "Renew", p.name, "renew");
        button(actions, "Test credentials", p.name, "test");
      }
      return tr;
    }));
    fill("routes", doc.routes.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.route = r.prefix;
      cell(tr, r.prefix);
      cell(tr, r.upstream);
      cell(tr, r.provider);
      cell(tr, r.rps_1m + " · " + r.rps_5m, "num");
      cell(tr, pct(r.error_ratio_1m) + " · " + pct(r.error_ratio_5m), "num");
      const rp = r.replays_5m || {};
      cell(tr, (rp.succeeded || 0) + " / " + (rp.unauthorized_again || 0) + " / " + (rp.not_replayable || 0), "num");
      cell(tr, ms(r.p50_seconds) + " · " + ms(r.p95_seconds), "num");
      return tr;
    }));
    fill("errors", doc.errors.map((e) => {
      const tr = document.createElement("tr");
      cell(tr, when(e.time));
      cell(tr, e.request_id);
      cell(tr, e.route);
      cell(tr, e.problem);
      cell(tr, e.status, "num");
      return tr;
    }));
    document.body.dataset.loaded = "yes";
  }

  async function refresh() {
    try {
      const r = await fetch("/-/status", { credentials: "same-origin", cache: "no-store" });
      if (r.ok) render(await r.json());
    } catch (e) {
      say("status unavailable: " + e);
    }
  }
  refresh();
  setInterval(refresh, every);
})();
