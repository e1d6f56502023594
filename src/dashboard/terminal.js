// @ts-check
/**
 * A terminal into the chosen VM: xterm.js on the page, a PTY in the VM, and
 * the API's terminal WebSocket between them (docs/http-api.md#terminals).
 */
import { Terminal } from "/dashboard/vendor/xterm.mjs";
import { FitAddon } from "/dashboard/vendor/addon-fit.mjs";
import { credential } from "./api.js";

/**
 * @param {HTMLElement} container
 * @param {{ definition: string; key: string }} vm
 * @param {(state: string) => void} onState
 */
export async function openTerminal(container, vm, onState) {
  const xterm = new Terminal({ cursorBlink: true, fontSize: 13, convertEol: false });
  const fit = new FitAddon();
  xterm.loadAddon(fit);
  xterm.open(container);
  fit.fit();
  const url = new URL(`/api/${encodeURIComponent(vm.definition)}/${encodeURIComponent(vm.key)}/terminal`, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("cols", String(xterm.cols));
  url.searchParams.set("rows", String(xterm.rows));
  const token = credential();
  // A browser WebSocket cannot send headers: the credential rides as a subprotocol.
  const socket = new WebSocket(url, token ? ["agentvm.terminal", `agentvm.bearer.${token}`] : ["agentvm.terminal"]);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.addEventListener("open", () => {
    onState("connected");
    xterm.focus();
  });
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      xterm.write(new Uint8Array(event.data));
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "exit") onState(message.signal ? `ended by ${message.signal}` : `exited with ${message.exitCode}`);
    if (message.type === "error") onState(`${message.code}: ${message.message}`);
  });
  socket.addEventListener("close", (event) => {
    if (event.code !== 1000) onState(`disconnected${event.reason ? `: ${event.reason}` : ""}`);
  });
  const input = xterm.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  const resize = xterm.onResize(({ cols, rows }) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(container);
  return {
    close() {
      observer.disconnect();
      input.dispose();
      resize.dispose();
      socket.close(1000);
      xterm.dispose();
    },
  };
}
