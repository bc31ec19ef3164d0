"""
The status page as a browser sees it: one self-contained HTML document whose
script fetches the status JSON every second and shows it, and the
C{Content-Security-Policy} that lets only its own inline style and script
run.

Everything the JSON carries (repository names and registries come from
clients and upstreams) goes into the page as text, through the DOM, never as
markup.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .5em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #666; }
dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin-top: 1em; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #ddd; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
progress { width: 12em; }
code { font-size: .95em; }
#error { color: #b00; }
"""

_SCRIPT = """
"use strict";
const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function size(n) {
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}
function text(id, value) { document.getElementById(id).textContent = value; }
function cell(row, value, numeric) {
  const td = row.insertCell();
  td.textContent = value;
  if (numeric) td.className = "n";
  return td;
}
function row(d) {
  const tr = document.createElement("tr");
  tr.dataset.digest = d.digest;
  tr.dataset.state = d.state;
  tr.dataset.written = String(d.written);
  const bar = document.createElement("progress");
  if (d.expected !== null && d.expected > 0) {
    bar.setAttribute("max", String(d.expected));
    bar.setAttribute("value", String(d.written));
  }
  const done = d.expected === null ? size(d.written)
    : size(d.written) + " of " + size(d.expected);
  const td = cell(tr, "", false);
  td.append(bar, " ", done);
  const code = document.createElement("code");
  code.textContent = d.digest.slice(0, 19) + "\\u2026";
  code.title = d.digest;
  tr.insertCell().append(code);
  cell(tr, (d.registry === null ? "" : d.registry + "/") + d.repository, false);
  cell(tr, d.rate === null ? "\\u2013" : size(d.rate) + "/s", true);
  cell(tr, String(d.clients), true);
  cell(tr, d.age.toFixed(0) + " s", true);
  cell(tr, d.state, false);
  return tr;
}
function show(s) {
  const rows = s.in_flight.map(row);
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "no downloads in flight", false).colSpan = 7;
    rows.push(tr);
  }
  document.getElementById("downloads").replaceChildren(...rows);
  text("node", s.node || "\\u2013");
  text("responses", String(s.responses));
  const slots = s.upstream_slots;
  text("slots", slots ? slots.in_use + " of " + slots.limit + " in use, "
    + slots.queued + " queued" : "no limit");
  const store = s.store;
  text("store", !store ? "\\u2013" : store.max_size === null
    ? size(store.size) + " (no limit)"
    : size(store.size) + " of " + size(store.max_size)
      + " (" + Math.floor(100 * store.size / store.max_size) + " %)");
  const cache = s.cache;
  const requests = cache ? Object.values(cache).reduce((a, b) => a + b, 0) : 0;
  text("cache", !cache ? "\\u2013" : !requests ? "no requests yet"
    : (100 * ((cache.hits || 0) + (cache.stale || 0)) / requests).toFixed(1)
      + " % from the store (" + Object.entries(cache)
        .map(([k, v]) => k + " " + v).join(", ") + ")");
  text("error", "");
}
async function refresh() {
  try {
    const r = await fetch(location.pathname,
      {headers: {Accept: "application/json"}, cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    show(await r.json());
  } catch (e) {
    text("error", "status unavailable: " + e.message);
  }
  setTimeout(refresh, 1000);
}
refresh();
"""

_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>blobserve status</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>blobserve status</h1>
<dl>
<dt>Node</dt><dd id="node">\u2013</dd>
<dt>Responses in progress</dt><dd id="responses">\u2013</dd>
<dt>Upstream slots</dt><dd id="slots">\u2013</dd>
<dt>Store</dt><dd id="store">\u2013</dd>
<dt>Cache</dt><dd id="cache">\u2013</dd>
</dl>
<p id="error"></p>
<table>
<thead><tr><th>Progress</th><th>Digest</th><th>Repository</th><th>Rate</th>
<th>Clients</th><th>Age</th><th>State</th></tr></thead>
<tbody id="downloads"></tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _source_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


#: The page, UTF-8.
PAGE = _PAGE.encode()

#: Only the page's own inline style and script, and fetches from its origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"script-src {_source_hash(_SCRIPT)}; "
    f"style-src {_source_hash(_STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
).encode()
