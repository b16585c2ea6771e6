"""The dashboard's one page: HTML, CSS and JavaScript inline, plots drawn as SVG by hand.

Served by dashboard.py to a browser holding the token or a session cookie.  Nothing
is loaded from elsewhere (no CDN, no web fonts): the page works offline.  It polls
the same JSON API the CLI's answers come from (``/api/status``, ``/api/tasks``, ...).
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>farpool dashboard</title>
<style>
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2329}
header{background:#1d2a3a;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:17px;margin:0}
header .meta{opacity:.8}
main{padding:12px 18px;display:grid;grid-template-columns:1fr 1fr;gap:14px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 12px;overflow:auto}
section.wide{grid-column:1 / span 2}
h2{font-size:14px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid #eef0f3;white-space:nowrap}
th{font-weight:600;color:#4a5562}
td.num,th.num{text-align:right}
.ALIVE,.FINISHED{color:#1a7f37}.DEAD,.FAILED{color:#c62828}.RUNNING{color:#1f5fbf}.PENDING,.RESTARTING{color:#a36a00}
.plots{display:flex;gap:14px;flex-wrap:wrap}
.plot{flex:1 1 300px}
.plot svg{width:100%;height:120px;background:#fbfcfd;border:1px solid #eef0f3}
.legend span{margin-right:10px}
.filters{display:flex;gap:8px;margin-bottom:6px}
pre{background:#0f1720;color:#d8e0e8;padding:8px;max-height:420px;overflow:auto;font-size:12px}
a{color:#1f5fbf;cursor:pointer}
#error{color:#c62828}
</style></head>
<body>
<header><h1>farpool</h1><span class="meta" id="summary">connecting...</span><span id="error"></span></header>
<main>
<section class="wide"><h2>Over time</h2>
 <div class="plots">
  <div class="plot"><div>tasks finished per second (last minute)</div><svg id="plot-tps"></svg></div>
  <div class="plot"><div>CPU % per node</div><svg id="plot-cpu"></svg><div class="legend" id="legend-cpu"></div></div>
  <div class="plot"><div>memory used per node (GB)</div><svg id="plot-mem"></svg><div class="legend" id="legend-mem"></div></div>
 </div></section>
<section class="wide"><h2>Nodes</h2><table id="nodes"></table></section>
<section><h2>Tasks by function</h2><table id="groups"></table><div id="infeasible"></div></section>
<section><h2>Actors</h2><table id="actors"></table></section>
<section class="wide"><h2>Tasks</h2>
 <div class="filters">
  <select id="f-state"><option value="">any state</option><option>PENDING</option><option>RUNNING</option>
   <option>FINISHED</option><option>FAILED</option></select>
  <input id="f-node" placeholder="node id prefix" size="14">
  <input id="f-name" placeholder="function name" size="18">
  <select id="f-limit"><option>50</option><option>200</option><option>1000</option></select>
 </div>
 <table id="tasks"></table></section>
<section><h2>Objects <a id="objects-refresh">refresh</a></h2><table id="objects"></table></section>
<section><h2>Placement groups</h2><table id="pgs"></table></section>
<section class="wide" id="stack-section" hidden><h2 id="stack-title">Stacks</h2><pre id="stack"></pre></section>
</main>
<script>
"use strict";
const COLORS = ["#1f77b4","#d62728","#2ca02c","#9467bd","#ff7f0e","#17becf","#8c564b","#e377c2"];
const history = {};   // node id -> [{t, cpu, mem}]
const HISTORY = 120;
const $ = id => document.getElementById(id);
function esc(v){ return String(v === null || v === undefined ? "-" : v).replace(/[&<>"']/g,
  c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }
function mb(n){ return n === null || n === undefined ? "-" : n >= 1e9 ? (n/1e9).toFixed(1) + " GB" : (n/1e6).toFixed(1) + " MB"; }
function amount(k, v){ return /memory/.test(k) ? (v/1e9).toFixed(1) + "G" : String(+v.toFixed(2)); }
async function api(path){
  const r = await fetch("/api/" + path, {credentials: "same-origin", cache: "no-store"});
  const body = await r.json();
  if(!r.ok) throw new Error(body.error || r.status);
  return body;
}
function table(el, columns, rows, cell){
  let h = "<tr>" + columns.map(c => `<th class="${c[2]||""}">${esc(c[1])}</th>`).join("") + "</tr>";
  for(const row of rows){
    h += "<tr>" + columns.map(c => {
      const v = cell ? cell(row, c[0]) : undefined;
      return `<td class="${c[2]||""} ${c[0]==="state"?esc(row.state):""}">${v !== undefined ? v : esc(row[c[0]])}</td>`;
    }).join("") + "</tr>";
  }
  if(!rows.length) h += `<tr><td colspan="${columns.length}">none</td></tr>`;
  el.innerHTML = h;
}
function line(svg, series, maxY){
  const W = svg.clientWidth || 300, H = svg.clientHeight || 120, pad = 4;
  let top = maxY || 1;
  for(const s of series) for(const v of s.values) top = Math.max(top, v);
  let out = `<text x="${W-4}" y="12" text-anchor="end" font-size="10" fill="#888">${top.toFixed(top < 10 ? 1 : 0)}</text>`;
  for(const s of series){
    const n = s.values.length; if(!n) continue;
    const pts = s.values.map((v,i) => `${(pad + (W-2*pad) * (n === 1 ? 1 : i/(n-1))).toFixed(1)},${(H - pad - (H-2*pad) * v / top).toFixed(1)}`);
    out += `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${pts.join(" ")}"/>`;
  }
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = out;
}
function bars(svg, values){
  const W = svg.clientWidth || 300, H = svg.clientHeight || 120, n = values.length || 1;
  const top = Math.max(1, ...values); const w = W / n;
  let out = `<text x="${W-4}" y="12" text-anchor="end" font-size="10" fill="#888">${top}</text>`;
  values.forEach((v,i) => { const h = (H-4) * v / top;
    out += `<rect x="${(i*w).toFixed(1)}" y="${(H-h).toFixed(1)}" width="${Math.max(1,w-1).toFixed(1)}" height="${h.toFixed(1)}" fill="#1f77b4"/>`; });
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = out;
}
function showStack(node, workerId){
  $("stack-section").hidden = false;
  $("stack-title").textContent = "Stacks of node " + node.slice(0,8) + (workerId ? ", worker " + workerId : "");
  $("stack").textContent = "asking the node...";
  api("stack?node=" + encodeURIComponent(node)).then(answers => {
    const lines = [];
    for(const a of answers){
      if(a.error){ lines.push(`node ${a.node_id.slice(0,8)}: ${a.error}`); continue; }
      for(const w of a.workers){
        if(workerId && String(w.worker_id) !== String(workerId)) continue;
        const t = w.task ? "running " + w.task.name : "idle";
        lines.push(`worker ${w.worker_id} pid ${w.pid}: ${t} [${w.status}]`);
        lines.push(w.stack.replace(/\s+$/, "").split("\n").map(l => "    " + l).join("\n"));
      }
    }
    $("stack").textContent = lines.join("\n") || "no workers";
    $("stack-section").scrollIntoView();
  }).catch(e => { $("stack").textContent = String(e); });
}
window.showStack = showStack;
async function refreshStatus(){
  const s = await api("status");
  const t = s.tasks.totals;
  $("summary").textContent = `${s.address || "embedded cluster"} · ${s.nodes_alive} node(s) alive, ${s.nodes_dead} dead · tasks: ` +
    `${t.PENDING} pending, ${t.RUNNING} running, ${t.FINISHED} finished, ${t.FAILED} failed` +
    (s.object_copies && s.object_copies.copies ?
     ` · object copies between nodes: ${s.object_copies.copies} (${(s.object_copies.bytes / 1e6).toFixed(1)} MB)` : "");
  const now = s.time;
  s.nodes.forEach(n => {
    const h = history[n.node_id] = history[n.node_id] || [];
    h.push({t: now, cpu: n.cpu_percent || 0, mem: (n.memory_used || 0) / 1e9});
    if(h.length > HISTORY) h.shift();
  });
  const ids = Object.keys(history);
  line($("plot-cpu"), ids.map((id,i) => ({color: COLORS[i % COLORS.length], values: history[id].map(p => p.cpu)})), 100);
  line($("plot-mem"), ids.map((id,i) => ({color: COLORS[i % COLORS.length], values: history[id].map(p => p.mem)})));
  const legend = ids.map((id,i) => `<span style="color:${COLORS[i % COLORS.length]}">&#9632; ${esc(id.slice(0,8))}</span>`).join("");
  $("legend-cpu").innerHTML = legend; $("legend-mem").innerHTML = legend;
  bars($("plot-tps"), s.tasks_per_second);
  table($("nodes"), [["node_id","node"],["state","state"],["address","address"],["cpu_percent","CPU %","num"],
    ["memory","memory"],["workers","workers","num"],["actors","actors","num"],["store","object store"],
    ["resources","available / total"],["stack",""]], s.nodes, (r, c) => {
      if(c === "node_id") return esc(r.node_id.slice(0,8));
      if(c === "cpu_percent") return r.cpu_percent === null || r.cpu_percent === undefined ? "-" : r.cpu_percent.toFixed(0);
      if(c === "memory") return r.memory_total ? `${mb(r.memory_used)} of ${mb(r.memory_total)}` : "-";
      if(c === "store") return r.store_capacity ? `${mb(r.store_used)} of ${mb(r.store_capacity)}, ${mb(r.spilled||0)} spilled` : "-";
      if(c === "resources") return esc(Object.keys(r.resources_total).sort().map(k =>
        `${k} ${amount(k, r.resources_available[k]||0)}/${amount(k, r.resources_total[k])}`).join(", "));
      if(c === "stack") return r.state === "ALIVE" ? `<a onclick="showStack('${esc(r.node_id)}')">stacks</a>` : "";
    });
  table($("groups"), [["name","function"],["shape","resources"],["PENDING","pending","num"],["RUNNING","running","num"],
    ["FINISHED","finished","num"],["FAILED","failed","num"]], s.tasks.groups.slice(0, 50));
  $("infeasible").innerHTML = s.tasks.infeasible.map(w =>
    `<p class="FAILED">${w.tasks} x ${esc(w.name)} ${esc(w.shape)} wait: ${esc(w.reason)}</p>`).join("");
  const pg = Object.entries(s.placement_groups);
  $("pgs").dataset.count = pg.length;
}
async function refreshTasks(){
  const q = new URLSearchParams({limit: $("f-limit").value});
  if($("f-state").value) q.set("state", $("f-state").value);
  if($("f-node").value) q.set("node", $("f-node").value);
  if($("f-name").value) q.set("name", $("f-name").value);
  const rows = await api("tasks?" + q);
  table($("tasks"), [["task_id","task"],["name","function"],["state","state"],["shape","resources"],["node_id","node"],
    ["worker_id","worker"],["duration","time","num"],["error_type","error"],["waiting_for","waiting for"]], rows, (r, c) => {
      if(c === "task_id") return `<span title="${esc(r.task_id)}">${esc(r.task_id.slice(0,6) + ".." + r.task_id.slice(16,22))}</span>`;
      if(c === "node_id") return esc((r.node_id || "-").slice(0,8));
      if(c === "worker_id") return r.state === "RUNNING" && r.node_id ?
        `<a onclick="showStack('${esc(r.node_id)}','${esc(r.worker_id)}')">${esc(r.worker_id)} (stack)</a>` : esc(r.worker_id);
      if(c === "duration") return r.started ? (((r.ended || Date.now()/1000) - r.started) * 1000).toFixed(1) + " ms" : "-";
    });
}
async function refreshActors(){
  const rows = await api("actors?limit=200");
  table($("actors"), [["actor_id","actor"],["class_name","class"],["name","name"],["state","state"],["node_id","node"],
    ["restarts","restarts","num"],["cause","cause"]], rows, (r, c) => {
      if(c === "actor_id") return esc(r.actor_id.slice(0,12));
      if(c === "node_id") return esc((r.node_id || "-").slice(0,8));
      if(c === "cause") return esc((r.cause || "").slice(0,80));
    });
  const pgs = await api("placement_groups");
  table($("pgs"), [["placement_group_id","group"],["name","name"],["state","state"],["strategy","strategy"],
    ["bundles","bundles"],["nodes","nodes"]], pgs);
}
async function refreshObjects(){
  const rows = await api("objects?limit=50");
  table($("objects"), [["object_id","object"],["node_id","node"],["size","size","num"],["state","state"],["owner","owner"]],
    rows, (r, c) => {
      if(c === "object_id") return `<span title="${esc(r.object_id)}">${esc((r.object_id || "-").slice(0,6) + ".." + (r.object_id || "").slice(16,22))}</span>`;
      if(c === "node_id") return esc((r.node_id || "-").slice(0,8));
      if(c === "size") return mb(r.size);
      if(c === "owner") return esc(r.error || r.owner);
    });
}
async function tick(){
  try{
    await refreshStatus(); await refreshTasks(); await refreshActors();
    $("error").textContent = "";
  }catch(e){ $("error").textContent = " " + e.message; }
  setTimeout(tick, 1000);
}
$("objects-refresh").onclick = () => refreshObjects().catch(e => { $("error").textContent = " " + e.message; });
["f-state","f-node","f-name","f-limit"].forEach(id => $(id).addEventListener("change", () => refreshTasks()));
tick(); refreshObjects().catch(() => {});
</script>
</body></html>
"""
