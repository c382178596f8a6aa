"""serve.py's page (``GET /``): choose or drop an image, see it and its top classes as bars.

An HTML document, its style (``/page.css``) and its script (``/page.js``): no inline code, so the
Content-Security-Policy can allow the page's own files only; no external assets, nothing to build;
kept as strings so that they ship inside the package. The script posts the file's bytes to ``/predict``
(with the API key, asked once when an answer is 401 and kept for the tab) and draws the answer; class names
are set as text, never as HTML.
"""

# How the tests and benchmarks/serve_bench.py open the page: Debian's Chromium through Playwright,
# headless and offline (never a browser Playwright downloads).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cifarkit: classify an image</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="page.css">
</head>
<body>
<main>
  <h1>Classify an image</h1>
  <label id="drop">
    <img id="preview" alt="the chosen image">
    <div id="side">
      <p id="hint">Drop a PNG or JPEG here, or choose a file.</p>
      <div id="result"></div>
      <p id="error" role="alert"></p>
      <input id="file" type="file" accept="image/png,image/jpeg,image/*">
    </div>
  </label>
  <form id="keyform" hidden>
    <label for="key">This server needs its API key:</label>
    <input id="key" type="password" autocomplete="off" required>
    <button id="keysave" type="submit">Use the key</button>
  </form>
</main>
<script src="page.js"></script>
</body>
</html>
"""

STYLE = """  body { font: 16px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  main { max-width: 760px; margin: 32px auto; padding: 0 16px; }
  h1 { font-size: 22px; margin: 0 0 16px; }
  #drop { display: flex; gap: 24px; align-items: center; border: 2px dashed #9aa3b5; border-radius: 12px;
          padding: 20px; background: #fff; min-height: 200px; cursor: pointer; }
  #drop.over { border-color: #3867d6; background: #eef3ff; }
  #preview { width: 200px; height: 200px; object-fit: contain; border-radius: 8px; background: #e9ecf1; flex: none; }
  #preview:not([src]) { visibility: hidden; }
  #side { flex: 1; min-width: 0; }
  #hint { color: #5b6477; margin: 0 0 12px; }
  .row { display: grid; grid-template-columns: 110px 1fr 64px; gap: 10px; align-items: center; margin: 8px 0; }
  .name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { height: 18px; background: #e3e7ee; border-radius: 9px; overflow: hidden; }
  .bar { height: 100%; background: #3867d6; border-radius: 9px; }
  .row:first-child .bar { background: #20a464; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  #error { color: #c0392b; }
  input[type=file] { margin-top: 8px; }
  #keyform { margin-top: 16px; padding: 12px 16px; background: #fff; border-radius: 12px; }
  #keyform[hidden] { display: none; }
  #key { margin: 0 8px; }
"""

SCRIPT = """const drop = document.getElementById("drop"), preview = document.getElementById("preview");
const result = document.getElementById("result"), error = document.getElementById("error");
const hint = document.getElementById("hint"), input = document.getElementById("file");
const keyform = document.getElementById("keyform"), keyInput = document.getElementById("key");
// The API key, asked once (when an answer is 401) and kept for this tab only.
let key = sessionStorage.getItem("cifarkit-api-key"), waiting = null;

keyform.addEventListener("submit", e => {
  e.preventDefault();
  key = keyInput.value;
  sessionStorage.setItem("cifarkit-api-key", key);
  keyform.hidden = true;
  if (waiting) classify(waiting);
});

async function classify(file) {
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  result.replaceChildren();
  error.textContent = "";
  hint.textContent = file.name + ": classifying...";
  try {
    const headers = {"Content-Type": file.type || "application/octet-stream"};
    if (key) headers["X-API-Key"] = key;
    const response = await fetch("predict", {method: "POST", body: file, headers});
    const answer = await response.json();
    if (response.status === 401) {
      waiting = file;
      keyform.hidden = false;
      keyInput.focus();
      throw new Error(key ? "the key was not accepted; enter it again" : "enter the server's API key");
    }
    waiting = null;
    if (!response.ok) throw new Error(answer.error || response.statusText);
    hint.textContent = file.name;
    for (const [name, p] of answer.top) {
      const row = document.createElement("div"), label = document.createElement("span");
      const track = document.createElement("div"), bar = document.createElement("div");
      const pct = document.createElement("span");
      row.className = "row"; row.dataset.name = name; row.dataset.p = p;
      label.className = "name"; label.textContent = name; label.title = name;
      track.className = "track"; bar.className = "bar"; bar.style.width = (100 * p).toFixed(1) + "%";
      pct.className = "pct"; pct.textContent = (100 * p).toFixed(1) + "%";
      track.append(bar); row.append(label, track, pct); result.append(row);
    }
  } catch (e) {
    hint.textContent = file.name;
    error.textContent = String(e.message || e);
  }
}

input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
"""
