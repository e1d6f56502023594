/**
 * A real escape probe (DESIGN §4). The host runs real listeners — TCP, HTTP,
 * UDP and unix sockets, on 127.0.0.1 and on the host's own address — that count
 * everything they receive, and keeps a secret file in os.tmpdir(). One guest
 * program (test/confinement-probes/probes.cjs) then tries every route out of the
 * VM it can think of and reports each attempt. Every attempt must be blocked,
 * the host's counters must stay at zero, and the secret must never show up —
 * while the same guest can still reach its own loopback (the positive control).
 */
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import dgram from "node:dgram";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, realpath, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Vm } from "agentvm";
import { collectOutput, tempDataDir, testVm } from "./helpers.ts";

const HERE = dirname(fileURLToPath(import.meta.url));

/**
 * v1 ran each program in Node's permission model, so these probes counted as
 * escapes from it. In v2 a VM is a Linux userland: its programs may spawn,
 * load native code, open an inspector, use workers or write their own memory —
 * inside the VM. What must hold is what the other tests here check: nothing
 * reaches the host's listeners, files or environment.
 */
const IN_VM_POWERS = [
  /^process\.binding/,
  /^raw TCP handle/,
  /^child_process\./,
  /^unpatched ChildProcess/,
  /^process\.execve/,
  /^spawn node/,
  /^new Worker/,
  /inspector/,
  /WASI/,
  /dlopen|^require\(<guest \.node/,
  /^node:ffi/,
  /^open \/proc\/(self|1)\/mem/,
  /^\/proc\/net\//,
  /^process\.setuid/,
];
const REPO = join(HERE, "..");

interface ProbeResult {
  name: string;
  outcome: "blocked" | "ESCAPED";
  detail: string;
}

interface ProbeReport {
  results: ProbeResult[];
  controls: Record<string, string>;
  fatal?: string;
  incomplete?: string;
}

/** What reached the host, counted by the host's own sockets. */
const received = { tcp: 0, http: 0, httpRequests: 0, udp: 0, unix: 0, log: [] as string[] };
const closers: (() => Promise<void>)[] = [];

function note(what: string): void {
  received.log.push(what);
}

async function tcpListener(host: string): Promise<number> {
  const server = net.createServer((socket) => {
    received.tcp++;
    note(`tcp connection on ${host} from ${socket.remoteAddress}:${socket.remotePort}`);
    socket.on("error", () => {});
    socket.end("HOST-TCP-BANNER\n");
  });
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(0, host, resolve));
  closers.push(() => new Promise((resolve) => server.close(() => resolve())));
  return (server.address() as net.AddressInfo).port;
}

async function httpListener(host: string): Promise<number> {
  const server = http.createServer((req, res) => {
    received.httpRequests++;
    note(`http request on ${host}: ${req.method} ${req.url}`);
    res.end("HOST-HTTP-BODY");
  });
  server.on("connection", (socket) => {
    received.http++;
    note(`http connection on ${host} from ${socket.remoteAddress}:${socket.remotePort}`);
  });
  server.on("upgrade", (_req, socket) => socket.destroy());
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(0, host, resolve));
  closers.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return (server.address() as net.AddressInfo).port;
}

async function udpListener(host: string): Promise<number> {
  const socket = dgram.createSocket("udp4");
  socket.on("message", (message, from) => {
    received.udp++;
    note(`udp datagram on ${host} from ${from.address}:${from.port}: ${JSON.stringify(message.subarray(0, 40).toString("latin1"))}`);
  });
  await new Promise<void>((resolve, reject) => socket.once("error", reject).bind(0, host, () => resolve()));
  closers.push(() => new Promise((resolve) => socket.close(() => resolve())));
  return socket.address().port;
}

async function unixListener(path: string): Promise<void> {
  const server = net.createServer((socket) => {
    received.unix++;
    note(`unix connection on ${path.replace("\0", "@")}`);
    socket.on("error", () => {});
    socket.end("HOST-UNIX-BANNER\n");
  });
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(path, resolve));
  closers.push(() => new Promise((resolve) => server.close(() => resolve())));
}

/** The host's first non-loopback IPv4 address, if it has one. */
function hostAddress(): string | undefined {
  for (const entries of Object.values(os.networkInterfaces())) {
    for (const entry of entries ?? []) if (entry.family === "IPv4" && !entry.internal) return entry.address;
  }
  return undefined;
}

async function selfCheck(
  ports: { hostTcpPort: number; hostHttpPort: number; hostUdpPort: number; hostIp?: string; hostIpTcpPort?: number; hostIpHttpPort?: number; hostIpUdpPort?: number },
  unixPath: string,
  abstractName: string,
): Promise<void> {
  const connectOnce = (options: net.NetConnectOpts) =>
    new Promise<void>((resolve, reject) => {
      const socket = net.connect(options, () => socket.end());
      socket.on("error", reject).on("close", () => resolve()).resume();
    });
  const sendOnce = (host: string, port: number) =>
    new Promise<void>((resolve, reject) => {
      const socket = dgram.createSocket("udp4");
      socket.send("host self-check", port, host, (error) => (socket.close(), error ? reject(error) : resolve()));
    });
  await connectOnce({ host: "127.0.0.1", port: ports.hostTcpPort });
  await fetch(`http://127.0.0.1:${ports.hostHttpPort}/self-check`).then((response) => response.text());
  await sendOnce("127.0.0.1", ports.hostUdpPort);
  await connectOnce({ path: unixPath });
  await connectOnce({ path: `\0${abstractName}` });
  let expected = { tcp: 1, http: 1, httpRequests: 1, udp: 1, unix: 2 };
  if (ports.hostIp) {
    await connectOnce({ host: ports.hostIp, port: ports.hostIpTcpPort! });
    await fetch(`http://${ports.hostIp}:${ports.hostIpHttpPort}/self-check`).then((response) => response.text());
    await sendOnce(ports.hostIp, ports.hostIpUdpPort!);
    expected = { tcp: 2, http: 2, httpRequests: 2, udp: 2, unix: 2 };
  }
  const deadline = Date.now() + 5000;
  const counts = () => ({ tcp: received.tcp, http: received.http, httpRequests: received.httpRequests, udp: received.udp, unix: received.unix });
  while (JSON.stringify(counts()) !== JSON.stringify(expected) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.deepEqual(counts(), expected, "the host's listeners do not count what reaches them");
  Object.assign(received, { tcp: 0, http: 0, httpRequests: 0, udp: 0, unix: 0, log: [] });
}

/** Files the guest tries to create in read-only system directories, as host paths. */
const HOST_WRITE_TARGETS = ["/usr/agentvm-probe", "/usr/bin/agentvm-probe", "/lib/agentvm-probe", join(REPO, "src/guest/agentvm-probe"), join(REPO, "dist/guest/agentvm-probe")];

const canary = `AGENTVM_PROBE_CANARY_${randomBytes(6).toString("hex").toUpperCase()}`;

const secretDir = await realpath(await mkdtemp(join(os.tmpdir(), "agentvm-secret-")));
after(() => rm(secretDir, { recursive: true, force: true }));
const secret = `AGENTVM-SECRET-${randomBytes(16).toString("hex")}`;
const secretPath = join(secretDir, "secret.txt");
await writeFile(secretPath, secret, { mode: 0o644 });

const hostIp = hostAddress();
const unixSocketPath = join(secretDir, "host.sock");
const abstractSocketName = `agentvm-probe-${process.pid}-${randomBytes(4).toString("hex")}`;
const config = {
  hostTcpPort: await tcpListener("127.0.0.1"),
  hostHttpPort: await httpListener("127.0.0.1"),
  hostUdpPort: await udpListener("127.0.0.1"),
  hostIp,
  hostIpTcpPort: hostIp ? await tcpListener(hostIp) : undefined,
  hostIpHttpPort: hostIp ? await httpListener(hostIp) : undefined,
  hostIpUdpPort: hostIp ? await udpListener(hostIp) : undefined,
  hostPid: process.pid,
  secretPath,
  secretDir,
  unixSocketPath,
  abstractSocketName,
  canary,
};
await unixListener(unixSocketPath);
await unixListener(`\0${abstractSocketName}`);
after(() => Promise.all(closers.map((close) => close())));

// The counters count: one real hello to each listener from the host itself, then back to zero.
await selfCheck(config, unixSocketPath, abstractSocketName);

// A host environment variable that must never reach a guest.
process.env[canary] = "host-only";
after(() => {
  delete process.env[canary];
});

const vm: Vm = await testVm(await tempDataDir("agentvm-confinement-"), { name: "confinement" });
await vm.writeFile("/home/agentos/confinement-probes.cjs", await readFile(join(HERE, "confinement-probes/probes.cjs")));
const { pid } = await vm.spawn("node", ["confinement-probes.cjs"], { env: { PROBE_CONFIG: JSON.stringify(config) } });
const output = collectOutput(vm, pid);
const exitCode = await Promise.race([
  vm.waitProcess(pid),
  new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`the probe guest did not finish in 50 s; output: ${output.all.slice(-2000)}`)), 50_000).unref()),
]);
// Output arrives before the exit event; give the last chunk a turn anyway.
await new Promise((resolve) => setImmediate(resolve));
output.stop();
const guestOutput = output.all;
const line = output.stdout.split("\n").find((l) => l.startsWith("PROBES "));
assert.ok(line, `the probe guest (exit ${exitCode}) printed no PROBES line; output:\n${guestOutput.slice(-3000)}`);
const report = JSON.parse(line.slice("PROBES ".length)) as ProbeReport;

describe("confinement: a guest cannot reach the host", () => {
  test("the probe harness works: the guest reaches its own loopback and sees sibling output", () => {
    assert.equal(report.fatal, undefined, `the probe program failed: ${report.fatal}`);
    assert.equal(report.incomplete, undefined, `the probe program timed out; results so far: ${JSON.stringify(report.results.slice(-3))}`);
    assert.equal(report.controls.fetchOwnLoopback, "200 vm-local /control");
    assert.equal(report.controls.tcpOwnLoopback, "connected");
    // A sibling program runs and reports: v2 has no permission model inside the VM to check here.
    assert.match(report.controls.childHarness ?? "", /CHILD/);
    // The probes that must land in the VM's own world did, and say so.
    const byName = new Map(report.results.map((result) => [result.name, result]));
    assert.match(byName.get("net.connect 127.0.0.1:<host tcp port> reaches the VM's own server on that port")?.detail ?? "", /VM's own server/);
    assert.match(byName.get("dgram send 127.0.0.1:<host udp port> with a VM socket bound there lands in the VM")?.detail ?? "", /VM's own socket/);
  });

  test("every probe that would reach the host is blocked; the powers a program has inside its own VM are listed", (t) => {
    for (const result of report.results) t.diagnostic(`${result.outcome.padEnd(7)} ${result.name} — ${result.detail}`);
    assert.ok(report.results.length >= 15, `only ${report.results.length} probes ran`);
    const inVm = report.results.filter((result) => IN_VM_POWERS.some((pattern) => pattern.test(result.name)));
    // What the VM shows of sockets is its own: none of the host's listening ports.
    const hostPorts = [config.hostTcpPort, config.hostHttpPort, config.hostUdpPort, config.hostIpTcpPort, config.hostIpHttpPort, config.hostIpUdpPort];
    for (const result of inVm.filter((r) => r.name.startsWith("/proc/net/"))) {
      for (const port of hostPorts) if (port) assert.doesNotMatch(result.detail, new RegExp(`:${port.toString(16).toUpperCase().padStart(4, "0")} `), `${result.name} shows host port ${port}`);
    }
    const escapes = report.results.filter((result) => result.outcome !== "blocked" && !inVm.includes(result));
    assert.deepEqual(
      escapes.map((result) => `${result.name}: ${result.detail}`),
      [],
      `${escapes.length} of ${report.results.length} probes ESCAPED`,
    );
    // 127.0.0.1 in a VM is the VM's loopback: the host's port is simply not there.
    const loopback = report.results.find((result) => result.name === "net.connect 127.0.0.1:<host tcp port>");
    assert.match(loopback?.detail ?? "", /ECONNREFUSED/);
    assert.match(report.results.find((result) => result.name === "http.get http://127.0.0.1:<host http port>")?.detail ?? "", /ECONNREFUSED/);
    // TLS must fail on the VM's loopback too, or be refused by the permission model outright.
    assert.match(report.results.find((result) => result.name === "tls.connect 127.0.0.1:<host tcp port>")?.detail ?? "", /ECONNREFUSED|ERR_ACCESS_DENIED/);
  });

  test("nothing arrived at the host's listeners", () => {
    assert.deepEqual(
      { tcp: received.tcp, http: received.http, httpRequests: received.httpRequests, udp: received.udp, unix: received.unix },
      { tcp: 0, http: 0, httpRequests: 0, udp: 0, unix: 0 },
      received.log.join("\n"),
    );
  });

  test("the host secret never reached the guest", async () => {
    assert.ok(!guestOutput.includes(secret), "the guest printed the host secret");
    assert.equal(await readFile(join(secretDir, "secret.txt"), "utf8"), secret);
    // Links the guest planted must not lead the host API out of the VM either.
    for (const link of ["/home/agentos/probe-link-abs", "/home/agentos/probe-link-rel"]) {
      const content = await vm.readFile(link).then(
        (bytes) => Buffer.from(bytes).toString("utf8"),
        (error: Error & { code?: string }) => `error ${error.code}`,
      );
      assert.ok(!content.includes(secret), `vm.readFile(${link}) returned the host secret`);
    }
    const listing = await vm.readdir("/home/agentos/probe-link-dir").catch((error: Error & { code?: string }) => [`error ${error.code}`]);
    assert.ok(!listing.includes("secret.txt"), `vm.readdir followed the guest's link to the host: ${listing}`);
    // Writing through the link may fail or land inside the VM; it must not reach the host file.
    await vm.writeFile("/home/agentos/probe-link-abs", "overwritten by the host API").catch(() => {});
    assert.equal(await readFile(join(secretDir, "secret.txt"), "utf8"), secret, "the host API wrote through a guest link");
  });

  test("read-only system directories stayed untouched on the host", () => {
    const created = HOST_WRITE_TARGETS.filter((file) => existsSync(file));
    assert.deepEqual(created, [], "the guest created files in host system directories");
  });
});

after(async () => {
  // If a probe ever got through, do not leave its litter on the host.
  await Promise.all(HOST_WRITE_TARGETS.map((file) => rm(file, { force: true })));
});
