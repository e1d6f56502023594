// @ts-check
/**
 * The dashboard page: VMs by definition, and for the chosen VM its processes
 * (with logs), listening ports (with preview links), preview URLs (with
 * revoke) and a terminal. Everything a guest controls — keys, command lines,
 * output — is put on the page as text (textContent), never as HTML.
 */
import { api, ApiError, bytesToText, credential, setCredential } from "./api.js";
import { openTerminal } from "./terminal.js";

/** Preview links made here last an hour. */
const PREVIEW_TTL_SECONDS = 3600;
const LOG_TAIL = 200;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * @param {string} tag
 * @param {Record<string, string>} [attributes]
 * @param {(Node | string)[]} [children]
 */
function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

/** @param {string} label @param {() => unknown} onClick */
function button(label, onClick) {
  const node = element("button", { type: "button" }, [label]);
  node.addEventListener("click", () => void run(onClick));
  return node;
}

/** @param {number | null | undefined} ms */
const time = (ms) => (typeof ms === "number" && ms > 0 ? new Date(ms).toLocaleString() : "—");

/** @type {{ definition: string; key: string } | null} */
let selected = null;
/** @type {{ close(): void } | null} */
let terminal = null;

/** Runs a UI action, showing its failure instead of losing it. @param {() => unknown} work */
async function run(work) {
  try {
    $("error").hidden = true;
    await work();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showSignIn(credential() ? "That credential was refused." : "");
      return;
    }
    $("error").textContent = error instanceof ApiError ? `${error.code}: ${error.message}` : String(error);
    $("error").hidden = false;
  }
}

/** @param {string} reason */
function showSignIn(reason) {
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("server-state").textContent = reason || "This server needs an API key.";
  $("vm-list").replaceChildren();
}

async function loadVms() {
  const definitions = await api.definitions();
  $("sign-in").hidden = true;
  $("sign-out").hidden = !credential();
  $("server-state").textContent = credential() ? "signed in" : "open on loopback (no API key configured)";
  const sections = [];
  for (const definition of definitions) {
    /** @type {{ key: string; awake: boolean; lastActiveAt: number }[]} */
    const vms = await api.listVms(definition);
    const items = vms.map((vm) => {
      const choose = button("", () => selectVm(definition, vm.key));
      choose.replaceChildren(element("span", { class: vm.awake ? "dot awake" : "dot", title: vm.awake ? "awake" : "asleep" }), vm.key);
      choose.dataset.key = vm.key;
      if (selected?.definition === definition && selected.key === vm.key) choose.setAttribute("aria-current", "true");
      return element("li", {}, [choose]);
    });
    sections.push(element("h3", {}, [definition]), items.length ? element("ul", {}, items) : element("p", { class: "muted" }, ["no VMs yet"]));
  }
  $("vm-list").replaceChildren(...sections);
}

/** @param {string} definition @param {string} key */
async function selectVm(definition, key) {
  if (selected?.definition !== definition || selected.key !== key) closeTerminal();
  selected = { definition, key };
  for (const node of $("vm-list").querySelectorAll("button")) node.setAttribute("aria-current", String(node.dataset.key === key));
  $("vm").hidden = false;
  $("vm-title").textContent = key;
  $("log-panel").hidden = true;
  await loadVm();
}

async function loadVm() {
  if (!selected) return;
  const { definition, key } = selected;
  const status = await api.status(definition, key);
  $("vm-state").textContent = `${status.awake ? "awake" : "asleep"} · ${status.runningProcesses} running · created ${time(status.createdAt)} · last active ${time(status.lastActiveAt)}`;
  // Listing wakes a sleeping VM; that is what opening it here means.
  const [processes, ports, previews] = await Promise.all([
    api.action(definition, key, "listProcesses"),
    api.action(definition, key, "listeningPorts"),
    api.action(definition, key, "listPreviewUrls"),
  ]);
  renderProcesses(processes);
  renderPorts(ports);
  renderPreviews(previews);
}

/** @param {{ pid: number; command: string; args: string[]; running: boolean; exitCode: number | null; signal: string | null; ppid: number }[]} processes */
function renderProcesses(processes) {
  const rows = processes.map((process) => {
    const state = process.running ? "running" : process.signal ? `killed (${process.signal})` : `exited ${process.exitCode}`;
    return element("tr", { "data-pid": String(process.pid) }, [
      element("td", {}, [String(process.pid)]),
      element("td", {}, [element("code", {}, [[process.command, ...process.args].join(" ")])]),
      element("td", {}, [state]),
      element("td", {}, [process.ppid === 0 ? button("Logs", () => showLogs(process.pid)) : ""]),
    ]);
  });
  $("processes").querySelector("tbody")?.replaceChildren(...(rows.length ? rows : [element("tr", {}, [element("td", { colspan: "4", class: "muted" }, ["no processes"])])]));
}

/** @param {number} pid */
async function showLogs(pid) {
  if (!selected) return;
  /** @type {{ dropped: boolean; output: { stream: string; data: unknown }[] }} */
  const logs = await api.action(selected.definition, selected.key, "getProcessLogs", [pid, { tail: LOG_TAIL }]);
  $("log-title").textContent = `Output of ${pid}${logs.dropped ? " (older output was dropped)" : ""}`;
  const chunks = logs.output.map((chunk) => element("span", { class: chunk.stream }, [bytesToText(chunk.data)]));
  $("log").replaceChildren(...(chunks.length ? chunks : [element("span", { class: "muted" }, ["no output yet"])]));
  $("log-panel").hidden = false;
}

/** @param {number[]} ports */
function renderPorts(ports) {
  const items = ports.map((port) => {
    const holder = element("span");
    const open = button("Preview link", async () => {
      if (!selected) return;
      /** @type {{ url?: string; path: string }} */
      const preview = await api.action(selected.definition, selected.key, "createSignedPreviewUrl", [port, PREVIEW_TTL_SECONDS]);
      const href = preview.url ?? preview.path;
      holder.replaceChildren(element("a", { href, target: "_blank", rel: "noopener noreferrer", class: "preview-link" }, [href]));
      const previews = await api.action(selected.definition, selected.key, "listPreviewUrls");
      renderPreviews(previews);
    });
    return element("li", { "data-port": String(port) }, [`${port} `, open, " ", holder]);
  });
  $("ports").replaceChildren(...(items.length ? items : [element("li", { class: "muted" }, ["nothing listens"])]));
}

/** @param {{ tokenPrefix: string; port: number; expiresAt: number; lastUsedAt: number | null }[]} previews */
function renderPreviews(previews) {
  const rows = previews.map((preview) =>
    element("tr", { "data-token": preview.tokenPrefix }, [
      element("td", {}, [element("code", {}, [`${preview.tokenPrefix}…`])]),
      element("td", {}, [String(preview.port)]),
      element("td", {}, [time(preview.expiresAt)]),
      element("td", {}, [time(preview.lastUsedAt)]),
      element("td", {}, [
        button("Revoke", async () => {
          if (!selected) return;
          await api.action(selected.definition, selected.key, "expireSignedPreviewUrl", [preview.tokenPrefix]);
          renderPreviews(await api.action(selected.definition, selected.key, "listPreviewUrls"));
        }),
      ]),
    ]),
  );
  $("previews").querySelector("tbody")?.replaceChildren(...(rows.length ? rows : [element("tr", {}, [element("td", { colspan: "5", class: "muted" }, ["no active preview URLs"])])]));
}

function closeTerminal() {
  terminal?.close();
  terminal = null;
  $("terminal").replaceChildren();
  $("open-terminal").hidden = false;
  $("close-terminal").hidden = true;
  $("terminal-state").textContent = "";
}

async function startTerminal() {
  if (!selected || terminal) return;
  $("open-terminal").hidden = true;
  $("close-terminal").hidden = false;
  $("terminal-state").textContent = "connecting…";
  terminal = await openTerminal($("terminal"), selected, (state) => {
    $("terminal-state").textContent = state;
  });
}

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  setCredential(/** @type {HTMLInputElement} */ ($("credential")).value.trim());
  /** @type {HTMLInputElement} */ ($("credential")).value = "";
  void run(loadVms);
});
$("sign-out").addEventListener("click", () => {
  setCredential("");
  closeTerminal();
  $("vm").hidden = true;
  selected = null;
  void run(loadVms);
});
$("refresh-vms").addEventListener("click", () => void run(loadVms));
$("refresh-vm").addEventListener("click", () => void run(loadVm));
$("close-log").addEventListener("click", () => {
  $("log-panel").hidden = true;
});
$("open-terminal").addEventListener("click", () => void run(startTerminal));
$("close-terminal").addEventListener("click", closeTerminal);
void run(loadVms);
