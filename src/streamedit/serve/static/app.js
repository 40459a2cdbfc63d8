// streamedit live page: camera/file -> WebRTC -> server -> stylized stream back, live prompt changes.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token") || "";
const authHeaders = token ? { "X-Streamedit-Token": token } : {};

// Everything the page knows, also read by the end-to-end test.
const state = window.streamedit = {
  status: "idle", session: null, server: null, browser: {}, fps: 0, latencyMs: null, dropped: 0,
  outputFrames: 0, error: "", promptAck: null,
};
let pc = null, channel = null, localStream = null, fileVideo = null, statsTimer = null, renderTimes = [];

function setStatus(text, kind) {
  state.status = text;
  $("status").textContent = text;
  $("status").dataset.state = kind || text;
}

function showError(message) {
  state.error = message;
  $("error").textContent = message;
  if (message) setStatus("error", "error");
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders, ...(options.headers || {}) } });
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

async function openSource() {
  if ($("source").value === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    fileVideo = $("input");
    fileVideo.srcObject = null;
    Object.assign(fileVideo, { src: URL.createObjectURL(file), loop: true, muted: true });
    await fileVideo.play();
    return fileVideo.captureStream();
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera access here (use https or http://localhost)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: false, video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
  });
  $("input").srcObject = stream;
  return stream;
}

// Send no more than the server uses: short side scaled to ~the processing size, at most 30 fps.
function uploadEncoding(track, size) {
  const { width, height } = track.getSettings();
  const scale = width && height ? Math.max(1, Math.min(width, height) / size) : 1;
  return { scaleResolutionDownBy: scale, maxFramerate: 30 };
}

function waitForIce(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000); // use whatever candidates exist by then
  });
}

async function start() {
  showError("");
  $("start").disabled = true;
  setStatus("starting", "busy");
  try {
    localStream = await openSource();
    const track = localStream.getVideoTracks()[0];
    if (!track) throw new Error("the source has no video track");
    const { iceServers } = await api("ice-servers"); // the server's --ice-server list (STUN/TURN), or none
    pc = new RTCPeerConnection({ iceServers });
    channel = pc.createDataChannel("control");
    channel.onmessage = (event) => onMessage(JSON.parse(event.data));
    pc.addTransceiver(track, { direction: "sendrecv", streams: [localStream],
                               sendEncodings: [uploadEncoding(track, parseInt($("size").value, 10))] });
    pc.ontrack = (event) => {
      if ("jitterBufferTarget" in event.receiver) event.receiver.jitterBufferTarget = 0; // lowest latency
      $("output").srcObject = new MediaStream([event.track]);
      watchFrames($("output"));
    };
    pc.onconnectionstatechange = () => {
      if (!pc) return;
      if (pc.connectionState === "connected") setStatus("live");
      if (pc.connectionState === "failed") { showError("connection to the server failed"); stop(); }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const answer = await api("offer", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", prompt: $("prompt").value,
                             size: parseInt($("size").value, 10) }),
    });
    state.session = answer.session;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    setStatus("connecting", "busy");
    $("stop").disabled = false;
    statsTimer = setInterval(browserStats, 1000);
  } catch (err) {
    showError(err.message || String(err));
    await stop(true);
  }
}

async function stop(keepError) {
  const sid = state.session;
  state.session = null;
  clearInterval(statsTimer);
  if (sid) api(`session/${sid}`, { method: "DELETE" }).catch(() => {});
  if (channel) channel.close();
  if (pc) pc.close();
  pc = channel = null;
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  if (fileVideo) { fileVideo.pause(); URL.revokeObjectURL(fileVideo.src); fileVideo = null; }
  localStream = null;
  $("input").srcObject = null;
  $("input").removeAttribute("src");
  $("output").srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  if (keepError !== true) showError("");
  if (state.status !== "error") setStatus("idle");
}

function onMessage(msg) {
  if (msg.type === "stats") {
    state.server = msg;
    $("active-prompt").textContent = msg.active_prompt ? `· ${msg.active_prompt}` : "";
    if (msg.prompt_switch_frames !== null && msg.active_prompt === $("prompt").value.trim()) {
      $("prompt-state").textContent = `applied after ${msg.prompt_switch_frames} frame(s)`;
    }
    render();
  } else if (msg.type === "prompt") {
    state.promptAck = msg.prompt;
    $("prompt-state").textContent = "sent…";
  } else if (msg.type === "error") {
    showError(msg.error);
  }
}

function setPrompt(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || !state.session) return;
  if (channel && channel.readyState === "open") {
    channel.send(JSON.stringify({ type: "prompt", prompt }));
  } else {
    api(`session/${state.session}/prompt`, { method: "POST", body: JSON.stringify({ prompt }) })
      .then(() => { $("prompt-state").textContent = "sent…"; }).catch((e) => showError(e.message));
  }
}

function watchFrames(video) {
  const onFrame = (now) => {
    state.outputFrames += 1;
    renderTimes.push(now);
    while (renderTimes.length && now - renderTimes[0] > 2000) renderTimes.shift();
    if (video.srcObject) video.requestVideoFrameCallback(onFrame);
  };
  if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(onFrame);
}

// End-to-end latency = browser encode + network round trip + server (queue + model) + jitter buffer + decode.
// Only the server's own encode/decode (a few ms) is left out; the server decodes a frame as soon as its last
// packet is in (serve/rtp.py), so frame assembly adds no frame interval.
async function browserStats() {
  if (!pc) return;
  const b = {}, report = await pc.getStats();
  report.forEach((r) => {
    if (r.type === "outbound-rtp" && r.kind === "video" && r.framesEncoded) {
      b.encodeMs = 1000 * r.totalEncodeTime / r.framesEncoded;
    }
    if (r.type === "inbound-rtp" && r.kind === "video") {
      if (r.framesDecoded) b.decodeMs = 1000 * r.totalDecodeTime / r.framesDecoded;
      if (r.jitterBufferEmittedCount) b.jitterMs = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
      b.framesDropped = r.framesDropped || 0;
      b.framesReceived = r.framesReceived || 0;
    }
    if (r.type === "transport" && r.selectedCandidatePairId) {
      const pair = report.get(r.selectedCandidatePairId);
      if (pair && pair.currentRoundTripTime !== undefined) b.rttMs = 1000 * pair.currentRoundTripTime;
      const local = pair && report.get(pair.localCandidateId), remote = pair && report.get(pair.remoteCandidateId);
      if (local && remote) b.pair = { local: local.address, remote: remote.address };
    }
  });
  state.browser = b;
  render();
}

function render() {
  const s = state.server || {}, b = state.browser;
  const spanS = renderTimes.length > 1 ? (renderTimes[renderTimes.length - 1] - renderTimes[0]) / 1000 : 0;
  state.fps = spanS > 0 ? (renderTimes.length - 1) / spanS : (s.fps || 0);
  state.dropped = (s.dropped || 0) + (b.framesDropped || 0);
  if (s.latency_ms_p50 != null) {
    state.latencyMs = s.latency_ms_p50 + (b.encodeMs || 0) + (b.rttMs || 0) + (b.jitterMs || 0) +
      (b.decodeMs || 0);
  }
  $("fps").textContent = state.fps ? state.fps.toFixed(1) : "–";
  $("latency").textContent = state.latencyMs != null ? Math.round(state.latencyMs) : "–";
  $("dropped").textContent = state.dropped;
  const fmt = (v) => (v == null ? "–" : Math.round(v));
  $("details").textContent =
    `session ${state.session || "–"} · ${s.size || "–"}px · input ${s.input_size ? s.input_size.join("x") : "–"}\n` +
    `server: fps ${s.fps ?? "–"} · latency p50 ${s.latency_ms_p50 ?? "–"} ms, p95 ${s.latency_ms_p95 ?? "–"} ms · ` +
    `received ${s.received ?? 0} · sent ${s.sent ?? 0} · dropped ${s.dropped_input ?? 0} in, ${s.dropped_output ?? 0} out\n` +
    `browser: encode ${fmt(b.encodeMs)} ms · rtt ${fmt(b.rttMs)} ms · ` +
    `jitter buffer ${fmt(b.jitterMs)} ms · ` +
    `decode ${fmt(b.decodeMs)} ms · dropped ${b.framesDropped ?? 0}`;
}

// The server's default size and prompt; sizes above its limit are not offered.
api("stats").then((info) => {
  const select = $("size"), { size, prompt } = info.defaults || {}, max = (info.limits || {}).max_size;
  for (const option of Array.from(select.options)) if (max && +option.value > max) option.remove();
  if (size && !Array.from(select.options).some((o) => +o.value === size)) {
    select.add(new Option(String(size), size), Array.from(select.options).find((o) => +o.value > size) || null);
  }
  if (size) select.value = String(size);
  if (prompt) $("prompt").value = prompt;
}).catch((e) => showError(e.message));

$("source").addEventListener("change", () => { if ($("source").value === "file") $("file").click(); });
$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop());
$("prompt-form").addEventListener("submit", setPrompt);
window.addEventListener("pagehide", () => { if (state.session) stop(); });
