/**
 * init: the first program of a VM's sandbox (pid 2, under bubblewrap's reaper).
 * The server drives it over the Node IPC channel on fd 3; it starts every
 * program of the VM, hands connected sockets out, and sets up the VM's network
 * namespace (port range, privileged ports) while it still holds the capability.
 *
 * It ends the VM when the channel closes: a VM never outlives its server.
 */
import { readdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import type { Socket } from "node:net";
import { startEgressServers } from "./egress-servers.ts";
import { connectToPort } from "./port-connector.ts";
import { EGRESS_PORTS, type FromInit, type ToInit, type VmProcess } from "./protocol.ts";
import { SpawnError, Supervisor } from "./supervisor.ts";

export interface InitConfig {
  /** The range listen(0) allocates from (the VM's ip_local_port_range). */
  portRange: [number, number];
  /** Whether programs may bind ports below 1024 (ip_unprivileged_port_start 0). */
  allowPrivileged: boolean;
  /** setpriv inside the VM, used to start programs without capabilities. */
  setpriv: string;
}

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
const INIT_PORTS = new Set<number>(Object.values(EGRESS_PORTS));
/** init's own requests to the server (egress, names), by id. */
const asked = new Map<number, { resolve(value: { message: ToInit; handle: Socket | undefined }): void }>();
let nextAsk = 1;
const ask = (message: Record<string, unknown>): Promise<{ message: ToInit; handle: Socket | undefined }> => {
  const id = nextAsk++;
  const { promise, resolve } = Promise.withResolvers<{ message: ToInit; handle: Socket | undefined }>();
  asked.set(id, { resolve });
  send({ ...message, id } as FromInit);
  return promise;
};
const failure = (message: { code: string; message: string }) => Object.assign(new Error(message.message), { code: message.code });
const openEgress = async (target: { host: string; port: number; via: string; pid?: number }) => {
  const { message, handle } = await ask({ t: "egress", host: target.host, port: target.port, via: target.via, ...(target.pid ? { pid: target.pid } : {}) });
  if (message.t !== "egress" || !message.ok || !handle) throw failure(message.t === "egress" && !message.ok ? message : { code: "EIO", message: "no connection" });
  return handle;
};
const resolveName = async (name: string, family: 4 | 6, pid?: number) => {
  const { message } = await ask({ t: "resolve", name, family, ...(pid ? { pid } : {}) });
  if (message.t !== "resolved" || !message.ok) throw failure(message.t === "resolved" && !message.ok ? message : { code: "EIO", message: "no answer" });
  return message.addresses;
};
const egressReady = startEgressServers(openEgress, resolveName);
const supervisor = new Supervisor({ setpriv: config.setpriv, send: (message, done) => send(message as FromInit, undefined, done) });

process.on("message", (message: ToInit, handle: Socket | undefined) => {
  switch (message.t) {
    case "egress":
    case "resolved": {
      const waiter = asked.get(message.id);
      asked.delete(message.id);
      if (waiter) waiter.resolve({ message, handle });
      else handle?.destroy();
      return;
    }
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
    case "ports":
      send({ t: "reply", id: message.id, ok: true, ports: listeningPorts() });
      return;
    case "ps":
      send({ t: "reply", id: message.id, ok: true, processes: vmProcesses() });
      return;
    case "connect":
      connectToPort(message.port).then(
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

/** Ports in LISTEN state (st 0A) in /proc/net/tcp and tcp6: this namespace's, so the VM's. */
function listeningPorts(): number[] {
  const ports = new Set<number>();
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = readFileSync(table, "utf8");
    } catch {
      continue; // no IPv6 in this kernel
    }
    for (const line of text.split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      const port = parseInt(fields[1]?.split(":")[1] ?? "", 16);
      if (fields[3] === "0A" && !INIT_PORTS.has(port)) ports.add(port);
    }
  }
  return [...ports].sort((a, b) => a - b);
}


/** The VM's processes from its own /proc (pid 1 is bubblewrap's reaper, this is init): what `ps` shows. */
function vmProcesses(): VmProcess[] {
  const bootMs = Number(/^btime (\d+)$/m.exec(readFileSync("/proc/stat", "utf8"))?.[1]) * 1000;
  const out: VmProcess[] = [];
  for (const entry of readdirSync("/proc")) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid <= 2) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      // Fields after the command name, which may itself hold spaces and parentheses.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (fields[0] === "Z") continue;
      const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").slice(0, -1);
      let cwd = "";
      try {
        cwd = readlinkSync(`/proc/${pid}/cwd`);
      } catch {
        // Exited meanwhile, or a kernel thread: no working directory to show.
      }
      // Clock ticks are 100 per second on Linux.
      out.push({ pid, ppid: Number(fields[1]), argv: argv.map((arg) => arg.slice(0, 4096)).slice(0, 256), cwd, startedAt: bootMs + Number(fields[19]) * 10 });
    } catch {
      // Exited while we looked.
    }
  }
  return out;
}

function shutdown(): void {
  // bubblewrap's reaper (pid 1) ends with init, and the PID namespace with it.
  process.exit(0);
}
