// The live-session page: a plain client of the server's public API (the same routes curl or the openai package use).
//
// Frames are taken from a <video> (a file or the webcam) or from a folder of images, drawn into a canvas at the
// frame size and uploaded one at a time as JPEG bytes to /v1/sessions/{id}/upload?timestamp=SECONDS. A frame that
// cannot be sent yet (bad key, server busy or unreachable) waits in a small queue; a frame the server refuses is
// reported and skipped, and the stream goes on. Uploads, questions, snapshots and restores take turns (one lock),
// so the stream time shown with an answer or a snapshot is exactly the last frame the server had taken in.
// The session id lives in the URL (?session=...); the stream clock of each session in localStorage, so that a
// reloaded page continues with later timestamps; the API key in sessionStorage (this tab only).

import { api, describe } from "./api.js";
import { Chart, bytes, seconds } from "./chart.js";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const MAX_QUEUE = 4; // frames waiting to be sent; a file pauses beyond it, the webcam drops its oldest frame
const POLL_MS = 2000; // session figures are refreshed this often when no frame is being sent

// -- messages -----------------------------------------------------------------------------------------------------

function say(text, kind = "info") {
  const list = $("messages");
  const last = list.firstElementChild;
  if (last && last.dataset.text === text) {
    // the same message again (a retry loop): count it instead of filling the list
    const n = Number(last.dataset.count) + 1;
    last.dataset.count = String(n);
    last.querySelector(".count").textContent = ` (×${n})`;
    return;
  }
  const item = document.createElement("li");
  item.className = kind;
  item.dataset.text = text;
  item.dataset.count = "1";
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  const words = document.createElement("span");
  words.textContent = text;
  const count = document.createElement("span");
  count.className = "count";
  item.append(time, " ", words, count);
  list.prepend(item);
  while (list.children.length > 40) list.lastElementChild.remove();
}

// -- the session --------------------------------------------------------------------------------------------------

const session = {
  id: null,
  info: null,
  clock: null, // stream time of the last frame the server accepted (seconds); null: unknown to this browser
  gone: false, // the server said it no longer has this session
};

const clockKey = (id) => `infinitevl.clock.${id}`;

function setClock(stamp) {
  session.clock = stamp;
  if (session.id && stamp !== null) localStorage.setItem(clockKey(session.id), String(stamp));
}

function setUrl(id) {
  const url = new URL(location.href);
  if (id) url.searchParams.set("session", id);
  else url.searchParams.delete("session");
  history.replaceState(null, "", url);
}

// Requests that change or read the stream at a point in time take turns, in the order they were made.
let turn = Promise.resolve();
function exclusive(job) {
  const run = turn.then(job, job);
  turn = run.catch(() => {});
  return run;
}

async function openSession(id) {
  const info = await api.json("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  session.id = info.id;
  session.gone = false;
  const saved = localStorage.getItem(clockKey(info.id));
  session.clock = saved === null ? null : Number(saved);
  setUrl(info.id);
  chart.reset();
  stateSeen.clear();
  show(info);
  const paired = info.pair_frames ? " in pairs" : "";
  const perStep = info.frames_per_step > (info.pair_frames ? 2 : 1) ? `, ${info.frames_per_step} per prefill` : "";
  $("session-id").textContent = `Session ${info.id}, frames at ${info.frame_size} px${paired}${perStep}, opened ${new Date(
    info.created * 1000,
  ).toLocaleString()}`;
  return info;
}

async function newSession() {
  const size = Number($("frame-size").value);
  const body = { frame_size: size, pair_frames: $("pair-frames").checked };
  const perStep = $("frames-per-step").value;
  if (perStep) body.frames_per_step = Number(perStep);
  const info = await exclusive(() => api.json("POST", "/v1/sessions", { json: body }));
  await openSession(info.id);
  say(`opened a new session ${info.id} (frames at ${size} px)`);
  await listSessions();
  return info;
}

async function listSessions() {
  const list = await api.json("GET", "/v1/sessions");
  const select = $("session-list");
  select.replaceChildren();
  if (!list.data.length) select.append(new Option("(none yet)", ""));
  for (const s of list.data) {
    const label = `${s.id} · opened ${new Date(s.created * 1000).toLocaleString()}`;
    select.append(new Option(label, s.id, false, s.id === session.id));
  }
}

// -- figures and the chart ----------------------------------------------------------------------------------------

const acks = []; // times (ms) of recent accepted frames, for the ingest rate
const stateSeen = new Set();
const chart = new Chart($("chart"));

function setFigure(id, value, text = String(value)) {
  const out = $(id);
  out.dataset.value = String(value);
  out.textContent = text;
}

function ingestRate() {
  const now = performance.now();
  while (acks.length && now - acks[0] > 5000) acks.shift();
  if (acks.length < 2) return 0;
  return (acks.length - 1) / ((acks[acks.length - 1] - acks[0]) / 1000);
}

function show(info) {
  session.info = info;
  setFigure("tokens", info.tokens, info.tokens.toLocaleString("en"));
  setFigure("frames", info.frames, info.frames.toLocaleString("en"));
  const exact = info.state_bytes.toLocaleString("en");
  setFigure("state-bytes", info.state_bytes, `${bytes(info.state_bytes)} (${exact} B)`);
  setFigure("stream-time", session.clock ?? "", seconds(session.clock));
  stateSeen.add(info.state_bytes);
  chart.add(info.tokens, info.state_bytes);
  const tokens = chart.points.map((p) => p[1]).map((n) => n.toLocaleString("en"));
  $("state-note").textContent =
    stateSeen.size === 1
      ? `Same state size at all ${chart.updates} updates seen, from ${tokens[0]} to ${tokens.at(-1)} tokens.`
      : `The state size changed: ${[...stateSeen].map(bytes).join(", ")}.`;
  showSnapshots(info.snapshots);
}

function showQueue() {
  setFigure("queue", feed.queue.length);
  setFigure("refused", feed.refused);
  setFigure("dropped", feed.dropped);
  const rate = ingestRate();
  setFigure("fps-now", rate.toFixed(2), rate.toFixed(1));
}

// -- feeding frames -----------------------------------------------------------------------------------------------

const feed = {
  source: null, // {kind: "file" | "folder" | "camera", stop()}
  queue: [], // [{blob, stamp}], the first one is being sent
  last: null, // stream time of the last frame queued
  refused: 0,
  dropped: 0,
  heldBack: false, // the video is paused because the queue is full
  pumping: false,
  waitingForKey: false,
  retryAfter: null, // seconds, from the server's last 429
};

const frameCanvas = () => $("frame");

function frameSize() {
  return Number($("frame-size").value);
}

function fps() {
  const value = Number($("fps").value);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 30) : 2;
}

// Draw a video frame or an image into the frame canvas (stretched to a square, as the model sees it) as JPEG.
function encode(drawable) {
  const canvas = frameCanvas();
  const size = frameSize();
  canvas.width = size;
  canvas.height = size;
  canvas.getContext("2d").drawImage(drawable, 0, 0, size, size);
  return new Promise((resolve, reject) => {
    const done = (blob) => (blob ? resolve(blob) : reject(new Error("a frame could not be encoded")));
    canvas.toBlob(done, "image/jpeg", 0.85);
  });
}

// Where a new source starts in the stream: just after the last frame, so timestamps never go back.
async function startClock() {
  if (!session.id || session.gone) await newSession();
  if (session.clock === null && session.info.frames > 0) {
    // This browser does not know when the session's last frame was: close that run of frames with a line of
    // text, after which the server accepts any timestamp.
    const marker = { text: "\n(a new video source)\n" };
    await exclusive(() => api.json("POST", `/v1/sessions/${session.id}/text`, { json: marker }));
    return 0;
  }
  return session.clock === null ? 0 : Math.max(session.clock, feed.last ?? 0) + 1 / fps();
}

function enqueue(blob, stamp) {
  if (feed.source && feed.source.kind === "camera" && feed.queue.length >= MAX_QUEUE) {
    feed.queue.splice(1, 1); // live: the oldest waiting frame goes (never the one being sent)
    feed.dropped += 1;
  }
  feed.queue.push({ blob, stamp });
  feed.last = stamp;
  showQueue();
  pump();
}

function queueFull() {
  return feed.queue.length >= MAX_QUEUE;
}

async function pump() {
  if (feed.pumping) return;
  feed.pumping = true;
  try {
    let delay = 500;
    while (feed.queue.length && session.id && !session.gone) {
      const item = feed.queue[0];
      const outcome = await exclusive(() => sendFrame(item));
      if (outcome === "sent" || outcome === "refused") {
        feed.queue.shift();
        delay = 500;
      } else if (outcome === "retry") {
        await sleep(Math.max(delay, (feed.retryAfter ?? 0) * 1000));
        delay = Math.min(delay * 2, 5000);
      } else if (outcome === "wait") {
        break; // the key must change first; the frames wait
      } else {
        feed.queue = []; // the session is gone: its frames have nowhere to go
        stopSource();
        break;
      }
      showQueue();
      if (feed.heldBack && feed.queue.length <= 1) {
        feed.heldBack = false;
        $("video").play().catch(() => {});
      }
    }
  } finally {
    feed.pumping = false;
    showQueue();
  }
}

async function sendFrame(item) {
  const path = `/v1/sessions/${session.id}/upload?timestamp=${item.stamp.toFixed(3)}`;
  try {
    const result = await api.json("POST", path, { body: item.blob, type: "image/jpeg" });
    feed.waitingForKey = false;
    acks.push(performance.now());
    setClock(Number(item.stamp.toFixed(3)));
    show(result.session);
    showQueue();
    return "sent";
  } catch (err) {
    if (err.status === 0 || err.status === 429 || err.status === 503) {
      say(`${describe(err)}. The frame waits and is sent again.`, "warn");
      feed.retryAfter = err.retryAfter; // waited for outside the turn, so that questions can still go
      return "retry";
    }
    if (err.status === 401) {
      feed.waitingForKey = true;
      say(`${describe(err)} Frames wait until then.`, "error");
      return "wait";
    }
    if (err.status === 404 && err.code === "session_not_found") {
      session.gone = true;
      say(`the server no longer has session ${session.id}: open or start another one`, "error");
      return "gone";
    }
    feed.refused += 1;
    say(`frame at ${seconds(item.stamp)} refused: ${describe(err)}. The stream goes on.`, "error");
    return "refused";
  }
}

function stopSource(reason) {
  const source = feed.source;
  if (!source) return;
  feed.source = null;
  source.stop();
  $("stop").disabled = true;
  if (reason) say(reason);
}

function showVideo() {
  $("video").hidden = false;
  $("still").hidden = true;
}

// A video element, file or webcam: a frame every 1/fps seconds of its own time while it plays.
function captureFrom(video, kind, label, base, clock) {
  let next = 0;
  let offset = base;
  let busy = false;
  const timer = setInterval(async () => {
    if (busy || video.paused || video.ended || video.readyState < 2) return;
    const t = clock();
    if (t < next) return;
    if (kind === "file" && queueFull()) {
      feed.heldBack = true; // a file can wait: pause it until the server catches up, so no frame is lost
      video.pause();
      return;
    }
    busy = true;
    try {
      let stamp = offset + t;
      if (feed.last !== null && stamp <= feed.last) {
        offset = feed.last + 1 / fps() - t; // the video went back (a seek): the stream time still goes on
        stamp = offset + t;
      }
      next += 1 / fps(); // on a fixed grid of the video's time, so that late ticks do not thin the frames out
      if (next <= t) next = t + 1 / fps();
      enqueue(await encode(video), stamp);
    } catch (err) {
      say(`a frame could not be taken: ${err.message}`, "error");
    } finally {
      busy = false;
    }
  }, 40);
  const onSeek = () => {
    next = clock();
  };
  video.addEventListener("seeked", onSeek);
  const onEnd = () => stopSource(`${label} finished; ${feed.queue.length} frames still to send`);
  video.addEventListener("ended", onEnd);
  feed.source = {
    kind,
    stop() {
      clearInterval(timer);
      video.removeEventListener("seeked", onSeek);
      video.removeEventListener("ended", onEnd);
      feed.heldBack = false;
      if (kind === "camera") {
        for (const track of video.srcObject?.getTracks() ?? []) track.stop();
        video.srcObject = null;
      } else {
        video.pause();
      }
    },
  };
  $("stop").disabled = false;
}

async function playFile(file) {
  stopSource();
  const video = $("video");
  showVideo();
  if (video.src.startsWith("blob:")) URL.revokeObjectURL(video.src);
  video.srcObject = null;
  video.src = URL.createObjectURL(file);
  try {
    await new Promise((resolve, reject) => {
      video.onloadeddata = resolve;
      video.onerror = () => {
        const why = video.error?.message || "a format it does not know";
        reject(new Error(`this browser cannot play ${file.name} (${why})`));
      };
    });
  } finally {
    video.onloadeddata = video.onerror = null;
  }
  const base = await startClock();
  captureFrom(video, "file", file.name, base, () => video.currentTime);
  await video.play();
  say(`sending ${file.name} at ${fps()} frames/s from stream time ${seconds(base)}`);
}

async function useCamera() {
  stopSource();
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("this browser offers no camera to this page (it needs https, or the server on localhost)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const base = await startClock();
  const video = $("video");
  showVideo();
  video.removeAttribute("src");
  video.srcObject = stream;
  await video.play();
  const t0 = performance.now();
  captureFrom(video, "camera", "the webcam", base, () => (performance.now() - t0) / 1000);
  say(`sending the webcam at ${fps()} frames/s from stream time ${seconds(base)}`);
}

// A folder of images as a slideshow: image i is at stream time base + i / fps; it waits while the queue is full.
async function sendImages(files) {
  stopSource();
  const byName = (a, b) => a.name.localeCompare(b.name, "en", { numeric: true });
  const images = [...files].filter((f) => f.type.startsWith("image/")).sort(byName);
  if (!images.length) throw new Error("the folder has no images");
  const base = await startClock();
  const still = $("still");
  $("video").hidden = true;
  still.hidden = false;
  let stopped = false;
  feed.source = { kind: "folder", stop: () => (stopped = true) };
  $("stop").disabled = false;
  say(`sending ${images.length} images at ${fps()} frames/s from stream time ${seconds(base)}`);
  let next = performance.now();
  for (let i = 0; i < images.length && !stopped; i += 1) {
    while (queueFull() && !stopped) await sleep(50);
    await sleep(Math.max(0, next - performance.now()));
    next = performance.now() + 1000 / fps();
    let bitmap;
    try {
      bitmap = await createImageBitmap(images[i]);
    } catch {
      feed.refused += 1;
      say(`${images[i].name} is not an image this browser can read: skipped`, "error");
      continue;
    }
    if (still.src.startsWith("blob:")) URL.revokeObjectURL(still.src);
    still.src = URL.createObjectURL(images[i]);
    still.alt = images[i].name;
    enqueue(await encode(bitmap), base + i / fps());
    bitmap.close();
  }
  if (!stopped) stopSource(`the ${images.length} images are queued`);
}

// -- questions ----------------------------------------------------------------------------------------------------

async function ask(question, maxTokens) {
  if (!session.id) throw new Error("open or start a session first");
  const item = document.createElement("li");
  item.dataset.state = "asking";
  const q = document.createElement("p");
  q.className = "q";
  q.textContent = question;
  const meta = document.createElement("p");
  meta.className = "meta";
  const a = document.createElement("p");
  a.className = "a";
  item.append(q, meta, a);
  $("answers").prepend(item);
  let response;
  let at;
  try {
    // Within the turn: no frame can arrive between the stream time noted here and the question's branch.
    response = await exclusive(async () => {
      at = { clock: session.clock, tokens: session.info.tokens, frames: session.info.frames };
      const body = { question, max_tokens: maxTokens, stream: true };
      return api.request("POST", `/v1/sessions/${session.id}/ask`, { json: body });
    });
  } catch (err) {
    item.dataset.state = "error";
    a.textContent = describe(err);
    say(`the question was not answered: ${describe(err)}`, "error");
    return;
  }
  item.dataset.clock = at.clock ?? "";
  meta.textContent = `about the stream up to ${seconds(at.clock)} (${at.frames} frames, ${at.tokens} tokens)`;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let finish = null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  item.dataset.state = "streaming";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (!data || data === "[DONE]") continue;
      const message = JSON.parse(data);
      if (message.error) {
        item.dataset.state = "error";
        say(`the answer stopped: ${message.error.message}`, "error");
        continue;
      }
      chunks += 1;
      const choice = message.choices[0];
      if (choice?.delta?.content) {
        first ??= performance.now();
        a.textContent += choice.delta.content;
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
  }
  if (item.dataset.state === "error") return;
  if (!a.textContent) a.textContent = "(an empty answer)";
  const took = ((performance.now() - started) / 1000).toFixed(2);
  const ttft = first === null ? "" : `, first text after ${((first - started) / 1000).toFixed(2)} s`;
  const end = finish === "length" ? "cut at max tokens" : "finished";
  meta.textContent += ` · ${chunks} events in ${took} s${ttft} · ${end}`;
  item.dataset.chunks = String(chunks);
  item.dataset.state = "done";
}

// -- snapshots ----------------------------------------------------------------------------------------------------

const snapKey = (id) => `infinitevl.snapclock.${id}`;

function showSnapshots(snapshots) {
  const list = $("snapshots");
  const ids = snapshots.map((s) => s.id).join(",");
  if (list.dataset.ids === ids) return;
  list.dataset.ids = ids;
  list.replaceChildren();
  for (const snap of [...snapshots].reverse()) {
    const item = document.createElement("li");
    item.dataset.id = snap.id;
    item.dataset.tokens = String(snap.tokens);
    const clock = localStorage.getItem(snapKey(snap.id));
    const when = new Date(snap.created * 1000).toLocaleTimeString();
    const text = document.createElement("span");
    const at = clock === null ? "" : ` · at ${seconds(Number(clock))}`;
    text.textContent = `${snap.id} · ${when} · ${snap.tokens} tokens, ${snap.frames} frames${at}`;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Restore";
    button.setAttribute("aria-label", `restore snapshot ${snap.id}`);
    button.addEventListener("click", () => guard(() => restore(snap.id)));
    item.append(text, " ", button);
    list.append(item);
  }
}

async function takeSnapshot() {
  if (!session.id) throw new Error("open or start a session first");
  const snap = await exclusive(async () => {
    const made = await api.json("POST", `/v1/sessions/${session.id}/snapshot`);
    if (session.clock !== null) localStorage.setItem(snapKey(made.id), String(session.clock));
    show(await api.json("GET", `/v1/sessions/${session.id}`));
    return made;
  });
  say(`snapshot ${snap.id} taken at ${snap.tokens} tokens, ${snap.frames} frames`);
}

async function restore(snapshotId) {
  await exclusive(async () => {
    const info = await api.json("POST", `/v1/sessions/${session.id}/restore`, { json: { snapshot_id: snapshotId } });
    const clock = localStorage.getItem(snapKey(snapshotId));
    // Frames still queued keep their later timestamps; without a known time the clock stays where it was.
    if (clock !== null) setClock(Number(clock));
    show(info);
  });
  say(`restored snapshot ${snapshotId}: ${session.info.tokens} tokens, ${session.info.frames} frames`);
}

// -- wiring -------------------------------------------------------------------------------------------------------

// Run a user action; its failure is told in words, never thrown into the console.
async function guard(action) {
  try {
    await action();
  } catch (err) {
    say(describe(err), "error");
    if (err.status === 401) {
      needKey = true;
      $("api-key").focus();
    }
    if (err.status === 404 && err.code === "session_not_found" && !session.id) setUrl(null);
  }
}

let reachable = true;
let needKey = false; // the last answer was 401: wait for the key form before asking again

async function poll() {
  const wanted = new URL(location.href).searchParams.get("session");
  if (!session.id && wanted && !needKey) {
    // the session of the URL could not be opened at load (the server was away): try again
    await openSession(wanted);
    say(`session ${wanted} found on the server`);
    return;
  }
  if (!session.id || feed.pumping) return;
  try {
    const info = await exclusive(() => api.json("GET", `/v1/sessions/${session.id}`));
    if (!reachable) say("the server answers again; the session is there");
    reachable = true;
    show(info);
  } catch (err) {
    if (err.status === 0) {
      if (reachable) say(`${describe(err)}; trying again every ${POLL_MS / 1000} s`, "warn");
      reachable = false;
    } else if (err.status === 404 && err.code === "session_not_found" && !session.gone) {
      session.gone = true;
      say(`the server no longer has session ${session.id}: open or start another one`, "error");
    }
  }
  showQueue();
}

async function start() {
  try {
    const health = await api.json("GET", "/health");
    const kinds = {
      untrained: " (untrained: its answers are meaningless)",
      task: " (trained for two digit tasks only; what to ask is below)",
    };
    $("server").textContent = `Model ${health.model}${kinds[health.model_kind] || ""}, at ${location.host}`;
    // a model that is not a general one says what it was trained for and, for a task model, what to ask it
    $("model-note").textContent = health.note ? `Note: ${health.note}` : "";
    $("model-note").hidden = !health.note;
  } catch (err) {
    $("server").textContent = describe(err);
  }
  $("api-key").value = api.key;
  try {
    await listSessions();
    const wanted = new URL(location.href).searchParams.get("session");
    if (wanted) {
      await openSession(wanted);
      say(`session ${wanted} found on the server`);
    }
  } catch (err) {
    needKey = err.status === 401;
    if (needKey) say("This server needs an API key: enter it above.", "error");
    else say(describe(err), "error");
    if (err.status === 404) setUrl(null);
  }
}

function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setKey($("api-key").value.trim());
    guard(async () => {
      await listSessions();
      needKey = false;
      say("API key accepted");
      const wanted = new URL(location.href).searchParams.get("session");
      if (wanted && session.id !== wanted) await openSession(wanted);
      if (feed.waitingForKey) pump();
    });
  });
  $("video-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) guard(() => playFile(file));
  });
  $("image-folder").addEventListener("change", (event) => {
    if (event.target.files.length) guard(() => sendImages(event.target.files));
  });
  $("camera").addEventListener("click", () => guard(useCamera));
  $("stop").addEventListener("click", () => stopSource("stopped sending"));
  $("new-session").addEventListener("click", () => guard(newSession));
  $("open").addEventListener("click", () => {
    const id = $("session-list").value;
    if (id) guard(() => openSession(id));
  });
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (question) guard(() => ask(question, Number($("max-tokens").value) || 64));
  });
  $("snapshot").addEventListener("click", () => guard(takeSnapshot));
  setInterval(() => guard(poll), POLL_MS);
  setInterval(showQueue, 1000);
}

wire();
chart.draw();
start();
