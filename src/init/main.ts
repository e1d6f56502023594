/**
 * init: the first program of a VM's sandbox (pid 2, under bubblewrap's reaper).
 * The server drives it over the Node IPC channel on fd 3; it starts every
 * program of the VM, hands connected sockets out, and sets up the VM's network
 * namespace (port range, privileged ports) while it still holds the capability.
 *
 * It ends the VM when the channel closes: a VM never outlives its server.
 */
import { writeFileSync } from "node:fs";
import type { Socket } from "node:net";
import { startEgressServers } from "./egress-servers.ts";
import { closeInheritedDescriptors } from "./inherited-descriptors.ts";
import { ListenWaits } from "./listen-waits.ts";
import { PathWatcher } from "./path-watcher.ts";
import { fitProcesses, listeningPorts, vmProcesses } from "./proc-reader.ts";
import { MAX_WATCHES, type FromInit, type ToInit } from "./protocol.ts";
import { ServerRequests } from "./server-requests.ts";
import { SpawnError, Supervisor } from "./supervisor.ts";

export interface InitConfig {
  /** The range listen(0) allocates from (the VM's ip_local_port_range). */
  portRange: [number, number];
  /** Whether programs may bind ports below 1024 (ip_unprivileged_port_start 0). */
  allowPrivileged: boolean;
  /** setpriv inside the VM, used to start programs without capabilities. */
  setpriv: string;
}

closeInheritedDescriptors();
const config = JSON.parse(process.env.AGENTVM_INIT ?? "{}") as InitConfig;
delete process.env.AGENTVM_INIT;

const send = (message: FromInit, handle?: Socket, done?: () => void): void => {
  if (!process.connected) return;
  process.send!(message, handle, { keepOpen: false }, (error) => {
    if (error) shutdown();
    done?.();
  });
};

configureNetwork();
const requests = new ServerRequests((message) => send(message));
const openEgress = requests.openEgress.bind(requests);
const resolveName = requests.resolveName.bind(requests);
const egressReady = startEgressServers(openEgress, resolveName);
const watches = new Map<number, PathWatcher>();
const supervisor = new Supervisor({ setpriv: config.setpriv, send: (message, done) => send(message as FromInit, undefined, done) });
const listenWaits = new ListenWaits((pid) => supervisor.isRunning(pid));

process.on("message", (message: ToInit, handle: Socket | undefined) => {
  switch (message.t) {
    case "egress":
    case "resolved":
      requests.answered(message, handle);
      return;
    case "spawn":
      supervisor.spawn(message).then(
        (pid) => send({ t: "reply", id: message.id, ok: true, pid }),
        (error: SpawnError) => send({ t: "reply", id: message.id, ok: false, code: error.code ?? "SPAWN_FAILED", message: error.message }),
      );
      return;
    case "signal":
      supervisor.signal(message.pid, message.signal);
      return;
    case "stdin":
      supervisor.writeStdin(message.pid, Buffer.from(message.data, "base64")).then(
        () => send({ t: "reply", id: message.id, ok: true }),
        (error: SpawnError) => send({ t: "reply", id: message.id, ok: false, code: error.code, message: error.message }),
      );
      return;
    case "stdin-end":
      supervisor.endStdin(message.pid);
      return;
    case "resize":
      supervisor.resize(message.pid, { cols: message.cols, rows: message.rows });
      return;
    case "ports":
      send({ t: "reply", id: message.id, ok: true, ports: listeningPorts() });
      return;
    case "ps":
      send({ t: "reply", id: message.id, ok: true, processes: fitProcesses(vmProcesses()) });
      return;
    case "watch":
      try {
        if (watches.size >= MAX_WATCHES) throw Object.assign(new Error(`the VM has ${MAX_WATCHES} watches open; close one first`), { code: "LIMIT_EXCEEDED" });
        const id = message.watch;
        watches.set(
          id,
          new PathWatcher(message.path, message.recursive, {
            events: (events) => send({ t: "watch-events", watch: id, events }),
            ended: (code, text) => {
              watches.delete(id);
              send({ t: "watch-end", watch: id, code, message: text });
            },
          }),
        );
        send({ t: "reply", id: message.id, ok: true });
      } catch (error) {
        send({ t: "reply", id: message.id, ok: false, code: watchErrorCode((error as NodeJS.ErrnoException).code), message: `watch ${message.path}: ${(error as Error).message}` });
      }
      return;
    case "unwatch":
      watches.get(message.watch)?.close();
      watches.delete(message.watch);
      return;
    case "connect":
      listenWaits.connect(message.port, Array.isArray(message.wait) ? message.wait : []).then(
        (socket) => send({ t: "reply", id: message.id, ok: true }, socket),
        (error: NodeJS.ErrnoException) => send({ t: "reply", id: message.id, ok: false, code: error.code ?? "ECONNREFUSED", message: error.message }),
      );
      return;
  }
});

process.on("disconnect", shutdown);
process.on("uncaughtException", (error) => {
  // init failing ends this VM only; the server reports it to callers.
  process.stderr.write(`agentvm init: ${error.stack ?? error}\n`);
  process.exit(70);
});
egressReady.then(
  () => send({ t: "ready", pid: process.pid }),
  (error: Error) => {
    process.stderr.write(`agentvm init: egress servers could not start: ${error.message}\n`);
    process.exit(71);
  },
);

/**
 * The VM's network namespace is its own, so these sysctls are per VM. The
 * kernel wants the ephemeral range to start at or above the unprivileged
 * start, hence the order.
 */
function configureNetwork(): void {
  if (config.allowPrivileged) writeFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0");
  // An empty range (only privileged ports, not allowed) has no kernel form: Node
  // programs get EADDRINUSE from the preload; others allocate from the default range.
  if (config.portRange[0] <= config.portRange[1]) writeFileSync("/proc/sys/net/ipv4/ip_local_port_range", `${config.portRange[0]} ${config.portRange[1]}`);
}

/** inotify's ENOSPC and EMFILE mean its per-user watch or instance limit, not a full disk. */
function watchErrorCode(code: string | undefined): string {
  if (code === "ENOSPC" || code === "EMFILE" || code === "LIMIT_EXCEEDED") return "LIMIT_EXCEEDED";
  return code === "ENOENT" || code === "ENOTDIR" || code === "EACCES" || code === "ELOOP" || code === "EPERM" ? code : "INTERNAL";
}

function shutdown(): void {
  // bubblewrap's reaper (pid 1) ends with init, and the PID namespace with it.
  process.exit(0);
}
