// Escape probes, run as ONE guest program inside a VM (see test/confinement.test.ts).
//
// Every probe tries to reach something outside the VM and reports
//   { name, outcome: "blocked" | "ESCAPED", detail }
// A probe throws (or its operation fails) -> "blocked"; a probe that gets through
// returns { escaped: true }. Probes that legitimately land in the VM's own world
// (its loopback, its pid 1) return { escaped: false, detail } and say why.
// The host's counters are the second, independent proof.
//
// The last stdout line is `PROBES <json>`; nothing else is printed to stdout.
"use strict";
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");

const config = JSON.parse(process.env.PROBE_CONFIG || "{}");
const HOME = "/home/agentos";
const PROBE_TIMEOUT_MS = 2000;
/** Probes that start a sibling guest (a whole sandbox) get more time. */
const CHILD_TIMEOUT_MS = 8000;

const results = [];
const controls = {};

function describe(error) {
  if (error === undefined || error === null) return String(error);
  const code = error.code ?? error.cause?.code ?? error.name ?? "Error";
  const message = String(error.message ?? error).split("\n")[0];
  const cause = error.cause && error.cause.message ? ` (cause: ${error.cause.code ?? ""} ${String(error.cause.message).split("\n")[0]})` : "";
  return `${code}: ${message}${cause}`.slice(0, 400);
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(Object.assign(new Error(`${what}: no answer within ${ms} ms`), { code: "PROBE_TIMEOUT" })), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function probe(name, fn, timeoutMs = PROBE_TIMEOUT_MS) {
  let outcome = "blocked";
  let detail;
  try {
    const result = await withTimeout(Promise.resolve().then(fn), timeoutMs, name);
    if (result && result.escaped) outcome = "ESCAPED";
    detail = result ? result.detail : "no result";
  } catch (error) {
    detail = describe(error);
  }
  results.push({ name, outcome, detail: String(detail).slice(0, 600) });
}

const escaped = (detail) => ({ escaped: true, detail });
const contained = (detail) => ({ escaped: false, detail });

// ---------------------------------------------------------------------------
// Helpers: each resolves escaped(...) when the attempt got through, and throws
// (rejects) when it failed.

function tcpConnect(options) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(options);
    socket.once("connect", () => {
      let banner = "";
      socket.on("data", (chunk) => (banner += chunk));
      socket.write("AGENTVM-PROBE\n");
      setTimeout(() => {
        socket.destroy();
        resolve(escaped(`connected to ${JSON.stringify(options)}; remote=${socket.remoteAddress}:${socket.remotePort} banner=${JSON.stringify(banner.slice(0, 80))}`));
      }, 200);
    });
    socket.once("error", reject);
  });
}

function httpGet(moduleName, url, extra = {}) {
  return new Promise((resolve, reject) => {
    const request = require(moduleName).get(url, { timeout: PROBE_TIMEOUT_MS - 200, ...extra }, (response) => {
      let body = "";
      response.on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve(escaped(`HTTP ${response.statusCode} from ${url}: ${JSON.stringify(body.slice(0, 80))}`)));
    });
    request.once("timeout", () => request.destroy(Object.assign(new Error("request timeout"), { code: "ETIMEDOUT" })));
    request.once("error", reject);
  });
}

async function fetchProbe(url) {
  const response = await fetch(url, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS - 200) });
  const body = await response.text();
  return escaped(`fetch ${url} answered ${response.status}: ${JSON.stringify(body.slice(0, 80))}`);
}

function tlsConnect(host, port) {
  return new Promise((resolve, reject) => {
    const socket = require("node:tls").connect({ host, port, rejectUnauthorized: false, servername: "probe.invalid" });
    // A TCP connection is already an escape, whatever the TLS handshake does next.
    socket.once("connect", () => {
      socket.destroy();
      resolve(escaped(`TCP connection for TLS to ${host}:${port} was established`));
    });
    socket.once("secureConnect", () => {
      socket.destroy();
      resolve(escaped(`TLS session with ${host}:${port}`));
    });
    socket.once("error", reject);
  });
}

function http2Connect(url) {
  // A session over a socket the preload made emits 'connect' at once (Node wraps a
  // handle-less socket in a JSStreamSocket), even when the connection is refused
  // a moment later: only an answer to a request proves anything arrived.
  return new Promise((resolve, reject) => {
    const session = require("node:http2").connect(url);
    session.once("error", (error) => {
      session.destroy();
      reject(error);
    });
    session.once("connect", () => {
      const request = session.request({ ":path": "/probe" });
      request.once("response", (headers) => {
        session.destroy();
        resolve(escaped(`http2 answer ${headers[":status"]} from ${url}`));
      });
      request.once("error", (error) => {
        session.destroy();
        reject(error);
      });
      request.end();
    });
  });
}

function udpSend(host, port, type = "udp4") {
  return new Promise((resolve, reject) => {
    const socket = require("node:dgram").createSocket(type);
    socket.once("error", (error) => {
      socket.close();
      reject(error);
    });
    socket.send(Buffer.from("AGENTVM-PROBE"), port, host, (error) => {
      socket.close();
      if (error) reject(error);
      // A datagram has no answer: the host's counter decides. The kernel only
      // delivers loopback datagrams inside the VM, so a clean send is contained
      // only for loopback destinations.
      else if (/^(127\.|::1$|localhost$)/.test(host)) resolve(contained(`datagram to ${host}:${port} went into the VM's loopback (nobody bound there in the VM; the host counter must stay 0)`));
      else resolve(escaped(`datagram to ${host}:${port} was sent`));
    });
  });
}

/** Runs `node <args>` through child_process (the kernel spawns a sibling guest) and returns its output. */
function runNodeChild(args, options = {}) {
  return new Promise((resolve, reject) => {
    const child = require("node:child_process").spawn("node", args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout?.on("data", (chunk) => (stdout += chunk));
    child.stderr?.on("data", (chunk) => (stderr += chunk));
    child.once("error", reject);
    child.once("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

// What a sibling guest reports about its own permissions: every flag must be false,
// and a real /bin/sh must not start.
const CHILD_REPORT = `
const report = {};
const p = process.permission;
report.permission = p && typeof p.has === "function"
  ? Object.fromEntries(["child", "net", "worker", "addon", "wasi", "inspector"].map((scope) => [scope, p.has(scope)]))
  : "no permission model";
try {
  const ChildProcess = require("child_process").ChildProcess;
  const cp = new ChildProcess();
  cp.on("error", () => {});
  cp.spawn({ file: "/bin/sh", args: ["sh", "-c", "echo PWNED-SH"], stdio: "pipe" });
  report.sh = "spawned";
} catch (error) {
  report.sh = error.code || error.message;
}
console.log("CHILD " + JSON.stringify(report));
`;

function judgeChild(run) {
  const line = run.stdout.split("\n").find((l) => l.startsWith("CHILD "));
  const text = `exit ${run.code}${run.signal ? ` ${run.signal}` : ""}; stdout=${JSON.stringify(run.stdout.slice(0, 200))} stderr=${JSON.stringify(run.stderr.slice(0, 300))}`;
  if (/PWNED/.test(run.stdout + run.stderr)) return escaped(`a real shell ran: ${text}`);
  if (/ld\.so|LD_PRELOAD/.test(run.stderr)) return escaped(`the dynamic loader honoured LD_PRELOAD: ${text}`);
  if (!line && run.code === 9 && /bad option/.test(run.stderr)) return contained(`node refused the option: ${text}`);
  if (!line && run.code === 1 && /ERR_MISSING_OPTION|--permission is required/.test(run.stderr)) return contained(`node refused to start: ${text}`);
  if (!line) {
    // The child did not get to report: anything but a clean refusal is suspicious
    // (an OpenSSL provider or preloaded library that crashed node at startup was loaded).
    return escaped(`the sibling guest started but did not report (a startup hook ran?): ${text}`);
  }
  const report = JSON.parse(line.slice("CHILD ".length));
  const widened = typeof report.permission !== "object" || Object.values(report.permission).some(Boolean) || report.sh === "spawned";
  return widened ? escaped(`the sibling guest runs with widened permissions: ${line}`) : contained(`the sibling guest ran with the fixed permission model: ${line}`);
}

/** A spawn that must be refused by the kernel, or must run with the normal permission model. */
async function childEscape(args, options = {}) {
  return judgeChild(await runNodeChild(args, options));
}

function readAttempt(file) {
  const content = fs.readFileSync(file, "utf8");
  return escaped(`read ${content.length} bytes from ${file}`);
}

// ---------------------------------------------------------------------------

async function main() {
  const {
    hostTcpPort,
    hostHttpPort,
    hostUdpPort,
    hostIp,
    hostIpTcpPort,
    hostIpHttpPort,
    hostIpUdpPort,
    hostPid,
    secretPath,
    secretDir,
    unixSocketPath,
    abstractSocketName,
    canary,
  } = config;
  if (!hostTcpPort || !hostHttpPort || !hostUdpPort || !hostPid || !secretPath || !canary) throw new Error(`incomplete PROBE_CONFIG: ${process.env.PROBE_CONFIG}`);

  // Positive controls: the harness can see a success when there is one.
  const local = require("node:http").createServer((req, res) => res.end("vm-local " + req.url));
  await new Promise((resolve, reject) => local.once("error", reject).listen(3000, "127.0.0.1", resolve));
  try {
    const response = await fetch("http://127.0.0.1:3000/control", { signal: AbortSignal.timeout(5000) });
    controls.fetchOwnLoopback = `${response.status} ${await response.text()}`;
  } catch (error) {
    controls.fetchOwnLoopback = `failed: ${describe(error)}`;
  }
  try {
    const raw = net.createServer((socket) => socket.on("data", () => {}).on("error", () => {}));
    await new Promise((resolve, reject) => raw.once("error", reject).listen(3001, "127.0.0.1", resolve));
    const result = await withTimeout(tcpConnect({ host: "localhost", port: 3001 }), 5000, "control connect");
    raw.close();
    controls.tcpOwnLoopback = result.escaped ? "connected" : "not connected";
  } catch (error) {
    controls.tcpOwnLoopback = `failed: ${describe(error)}`;
  }
  try {
    controls.childHarness = JSON.stringify(await withTimeout(childEscape(["-e", CHILD_REPORT]), CHILD_TIMEOUT_MS, "control child"));
  } catch (error) {
    controls.childHarness = `failed: ${describe(error)}`;
  }

  // 1. The host's port on 127.0.0.1 is the VM's own loopback in here.
  await probe("net.connect 127.0.0.1:<host tcp port>", () => tcpConnect({ host: "127.0.0.1", port: hostTcpPort }));
  await probe("net.connect localhost:<host tcp port>", () => tcpConnect({ host: "localhost", port: hostTcpPort }));
  await probe("net.connect [::1]:<host tcp port>", () => tcpConnect({ host: "::1", port: hostTcpPort }));
  await probe("net.connect 0.0.0.0:<host tcp port>", () => tcpConnect({ host: "0.0.0.0", port: hostTcpPort }));
  await probe("net.connect ::ffff:127.0.0.1:<host tcp port>", () => tcpConnect({ host: "::ffff:127.0.0.1", port: hostTcpPort }));
  await probe("net.connect 127.0.0.1:<host http port>", () => tcpConnect({ host: "127.0.0.1", port: hostHttpPort }));
  // Same port with a VM server on it: the connection must land on the VM's server.
  await probe("net.connect 127.0.0.1:<host tcp port> reaches the VM's own server on that port", async () => {
    const server = net.createServer((socket) => socket.end("VM-SERVER\n"));
    await new Promise((resolve, reject) => server.once("error", reject).listen(hostTcpPort, "127.0.0.1", resolve));
    try {
      const banner = await new Promise((resolve, reject) => {
        const socket = net.connect({ host: "127.0.0.1", port: hostTcpPort });
        let data = "";
        socket.on("data", (chunk) => (data += chunk));
        socket.once("end", () => resolve(data));
        socket.once("error", reject);
      });
      return banner === "VM-SERVER\n" ? contained(`answered by the VM's own server: ${JSON.stringify(banner)}`) : escaped(`answered by someone else: ${JSON.stringify(banner)}`);
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });

  // 2. The host's other addresses and the usual gateway addresses.
  if (hostIp) {
    await probe(`net.connect <host ip ${hostIp}>:<port>`, () => tcpConnect({ host: hostIp, port: hostIpTcpPort }));
    await probe(`net.connect 127.0.0.1 with localAddress <host ip>`, () => tcpConnect({ host: "127.0.0.1", port: hostTcpPort, localAddress: hostIp }));
  }
  for (const gateway of ["10.0.2.2", "172.17.0.1", "169.254.169.254", "192.168.0.1"]) {
    await probe(`net.connect ${gateway}:<host tcp port>`, () => tcpConnect({ host: gateway, port: hostTcpPort }));
  }
  await probe("net.connect host.agentvm.internal:<host tcp port> (no rule names it)", () => tcpConnect({ host: "host.agentvm.internal", port: hostTcpPort }));
  await probe("net.connect 127.1 / 2130706433 (odd spellings of loopback)", async () => {
    const outcomes = [];
    for (const host of ["127.1", "2130706433", "0x7f000001", "localhost."]) {
      try {
        const result = await tcpConnect({ host, port: hostTcpPort });
        return escaped(`${host}: ${result.detail}`);
      } catch (error) {
        outcomes.push(`${host}: ${describe(error)}`);
      }
    }
    throw new Error(outcomes.join("; "));
  });
  await probe("net.connect with a custom lookup returning the host ip", () =>
    tcpConnect({ host: "anything.example", port: hostIpTcpPort || hostTcpPort, lookup: (_name, _options, callback) => callback(null, [{ address: hostIp || "10.0.2.2", family: 4 }]) }),
  );

  // 3/4. HTTP clients.
  await probe("http.get http://127.0.0.1:<host http port>", () => httpGet("node:http", `http://127.0.0.1:${hostHttpPort}/probe`));
  await probe("http.get with agent:false http://localhost:<host http port>", () => httpGet("node:http", `http://localhost:${hostHttpPort}/probe`, { agent: false }));
  if (hostIp) await probe("http.get http://<host ip>:<port>", () => httpGet("node:http", `http://${hostIp}:${hostIpHttpPort}/probe`));
  await probe("https.get https://127.0.0.1:<host tcp port>", () => httpGet("node:https", `https://127.0.0.1:${hostTcpPort}/probe`, { rejectUnauthorized: false }));
  await probe("fetch http://127.0.0.1:<host http port>", () => fetchProbe(`http://127.0.0.1:${hostHttpPort}/probe`));
  if (hostIp) await probe("fetch http://<host ip>:<port>", () => fetchProbe(`http://${hostIp}:${hostIpHttpPort}/probe`));
  await probe("fetch http://host.agentvm.internal:<host http port>", () => fetchProbe(`http://host.agentvm.internal:${hostHttpPort}/probe`));
  await probe("fetch https://example.com", () => fetchProbe("https://example.com/"));
  await probe("WebSocket ws://127.0.0.1:<host http port>", () =>
    new Promise((resolve, reject) => {
      if (typeof WebSocket !== "function") return reject(new Error("no global WebSocket"));
      const ws = new WebSocket(`ws://127.0.0.1:${hostHttpPort}/probe`);
      ws.onopen = () => {
        ws.close();
        resolve(escaped("WebSocket opened"));
      };
      ws.onerror = (event) => reject(Object.assign(new Error(`WebSocket error: ${event?.message ?? event?.error?.message ?? "failed"}`), { code: "WS_ERROR" }));
    }),
  );

  // 5/6. DNS.
  const dns = require("node:dns");
  await probe("dns.lookup example.com", () =>
    new Promise((resolve, reject) => dns.lookup("example.com", (error, address) => (error ? reject(error) : resolve(escaped(`resolved to ${address}`))))),
  );
  await probe("dns.promises.lookup example.com (all)", async () => escaped(JSON.stringify(await dns.promises.lookup("example.com", { all: true }))));
  await probe("dns.Resolver setServers([8.8.8.8]) resolve4", () =>
    new Promise((resolve, reject) => {
      const resolver = new dns.Resolver({ timeout: 500, tries: 1 });
      resolver.setServers(["8.8.8.8"]);
      resolver.resolve4("example.com", (error, addresses) => (error ? reject(error) : resolve(escaped(`resolve4 gave ${addresses}`))));
    }),
  );
  await probe("dns.Resolver to the host's UDP port, resolveTxt (c-ares)", () =>
    new Promise((resolve, reject) => {
      const resolver = new dns.Resolver({ timeout: 500, tries: 1 });
      resolver.setServers([`127.0.0.1:${hostUdpPort}`, ...(hostIp ? [`${hostIp}:${hostIpUdpPort}`] : [])]);
      const timer = setTimeout(() => resolver.cancel(), PROBE_TIMEOUT_MS - 300);
      resolver.resolveTxt("example.com", (error, records) => {
        clearTimeout(timer);
        if (error) reject(error);
        else resolve(escaped(`resolveTxt gave ${JSON.stringify(records)}`));
      });
    }),
  );
  await probe("dns.promises.resolveAny example.com", async () => escaped(JSON.stringify(await dns.promises.resolveAny("example.com"))));

  // 7. UDP.
  await probe("dgram send 127.0.0.1:<host udp port>", () => udpSend("127.0.0.1", hostUdpPort));
  if (hostIp) await probe("dgram send <host ip>:<port>", () => udpSend(hostIp, hostIpUdpPort));
  await probe("dgram send 8.8.8.8:53", () => udpSend("8.8.8.8", 53));
  await probe("dgram send udp6 ::1:<host udp port>", () => udpSend("::1", hostUdpPort, "udp6"));
  if (hostIp) {
    await probe("dgram bind on the host ip", () =>
      new Promise((resolve, reject) => {
        const socket = require("node:dgram").createSocket("udp4");
        socket.once("error", reject);
        socket.bind(0, hostIp, () => {
          socket.close();
          resolve(escaped(`bound ${hostIp}`));
        });
      }),
    );
  }
  await probe("dgram send 127.0.0.1:<host udp port> with a VM socket bound there lands in the VM", () =>
    new Promise((resolve, reject) => {
      const dgram = require("node:dgram");
      const receiver = dgram.createSocket("udp4");
      receiver.once("error", reject);
      receiver.once("message", (message) => {
        receiver.close();
        resolve(contained(`delivered to the VM's own socket: ${message}`));
      });
      receiver.bind(hostUdpPort, "127.0.0.1", () => {
        const sender = dgram.createSocket("udp4");
        sender.send("AGENTVM-PROBE-LOCAL", hostUdpPort, "127.0.0.1", (error) => {
          sender.close();
          if (error) reject(error);
        });
      });
    }),
  );

  // 8/9. TLS and HTTP/2.
  await probe("tls.connect 127.0.0.1:<host tcp port>", () => tlsConnect("127.0.0.1", hostTcpPort));
  if (hostIp) await probe("tls.connect <host ip>:<port>", () => tlsConnect(hostIp, hostIpTcpPort));
  await probe("http2.connect http://127.0.0.1:<host http port>", () => http2Connect(`http://127.0.0.1:${hostHttpPort}`));
  if (hostIp) await probe("http2.connect http://<host ip>:<port>", () => http2Connect(`http://${hostIp}:${hostIpHttpPort}`));

  // 10. Raw bindings.
  for (const name of ["tcp_wrap", "udp_wrap", "pipe_wrap", "fs", "spawn_sync", "process_wrap", "cares_wrap"]) {
    await probe(`process.binding("${name}")`, () => {
      const binding = process.binding(name);
      return escaped(`got the binding: ${Object.keys(binding).slice(0, 8).join(",")}`);
    });
  }
  await probe("raw TCP handle from process.binding('tcp_wrap') connects to the host", () => {
    const { TCP, TCPConnectWrap, constants } = process.binding("tcp_wrap");
    const handle = new TCP(constants.SOCKET);
    const request = new TCPConnectWrap();
    const status = handle.connect(request, "127.0.0.1", hostTcpPort);
    return escaped(`raw connect returned ${status}`);
  });
  await probe("internalBinding / require('internal/test/binding')", () => {
    if (typeof globalThis.internalBinding === "function") return escaped("globalThis.internalBinding is exposed");
    const { internalBinding } = require("internal/test/binding");
    return escaped(`internal/test/binding loaded: ${typeof internalBinding}`);
  });

  // 11. Child processes.
  await probe('child_process.spawn("/bin/sh", ["-c", ...])', () =>
    new Promise((resolve, reject) => {
      const child = require("node:child_process").spawn("/bin/sh", ["-c", "echo PWNED-SPAWN; id"]);
      let out = "";
      child.stdout?.on("data", (chunk) => (out += chunk));
      child.once("error", reject);
      child.once("close", (code) => resolve(out.includes("PWNED") ? escaped(`sh ran: ${out}`) : contained(`exit ${code}, no output`)));
    }),
  );
  await probe('child_process.execSync("id")', () => escaped(String(require("node:child_process").execSync("id"))));
  await probe('child_process.spawnSync("/bin/sh")', () => {
    const result = require("node:child_process").spawnSync("/bin/sh", ["-c", "echo PWNED"]);
    if (result.error) throw result.error;
    return escaped(`spawnSync: ${result.stdout}`);
  });
  await probe('child_process.exec("/bin/sh -c id")', () =>
    new Promise((resolve, reject) =>
      require("node:child_process").exec("/bin/sh -c id", (error, stdout) => (error ? reject(error) : resolve(escaped(`exec: ${stdout}`)))),
    ),
  );
  await probe("unpatched ChildProcess.prototype.spawn of /bin/sh", () => {
    const { ChildProcess } = require("node:child_process");
    const child = new ChildProcess();
    child.on("error", () => {});
    child.spawn({ file: "/bin/sh", args: ["sh", "-c", "echo PWNED"], stdio: "pipe" });
    return escaped(`spawned host pid ${child.pid}`);
  });
  await probe("process.execve /bin/sh (in a sibling guest)", () =>
    runNodeChild(["-e", "try { process.execve('/bin/sh', ['sh', '-c', 'echo PWNED-EXECVE']) } catch (e) { console.log('CHILD ' + JSON.stringify({ permission: {}, sh: e.code })) }"]).then(judgeChild),
  CHILD_TIMEOUT_MS);
  // The kernel starts node siblings; nothing a guest passes may widen their permissions.
  await probe("spawn node -e <code> --allow-child-process (flag after the eval code)", () => childEscape(["-e", CHILD_REPORT, "--allow-child-process", "--allow-net"]), CHILD_TIMEOUT_MS);
  await probe("spawn node --allow_child_process (underscore spelling)", () => childEscape(["--allow_child_process", "--allow_net", "-e", CHILD_REPORT]), CHILD_TIMEOUT_MS);
  await probe("spawn node --input_type commonjs --allow-child-process (underscore value option)", () => childEscape(["--input_type", "commonjs", "--allow-child-process", "-e", CHILD_REPORT]), CHILD_TIMEOUT_MS);
  await probe("spawn node with NODE_OPTIONS=--allow_child_process", () =>
    childEscape(["-e", CHILD_REPORT], { env: { ...process.env, NODE_OPTIONS: "--allow_child_process" } }),
  CHILD_TIMEOUT_MS);
  await probe("spawn node --run=<script>", async () => {
    fs.mkdirSync(`${HOME}/probe-run-dir`, { recursive: true });
    fs.writeFileSync(`${HOME}/probe-run-dir/package.json`, JSON.stringify({ scripts: { probe: "echo PWNED-RUN" } }));
    return judgeChild(await runNodeChild(["--run=probe"], { cwd: `${HOME}/probe-run-dir` }));
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node with LD_LIBRARY_PATH=<guest dir>", () =>
    childEscape(["--no-warnings", "-e", CHILD_REPORT], { env: { ...process.env, LD_LIBRARY_PATH: HOME } }).then((result) => (result.escaped ? result : escaped(`the kernel passed LD_LIBRARY_PATH through: ${result.detail}`))),
  CHILD_TIMEOUT_MS);
  await probe("spawn node --no-permission", () => childEscape(["--no-permission", "-e", CHILD_REPORT]), CHILD_TIMEOUT_MS);
  await probe('spawn node with NODE_OPTIONS="\\"--allow-child-process\\"" (quoted)', () =>
    childEscape(["-e", CHILD_REPORT], { env: { ...process.env, NODE_OPTIONS: '"--allow-child-process" "--allow-net"' } }),
  CHILD_TIMEOUT_MS);
  await probe("spawn node --env-file=<file setting NODE_OPTIONS>", () => {
    fs.writeFileSync(`${HOME}/probe.env`, "NODE_OPTIONS=--allow-child-process --allow-net\n");
    return childEscape([`--env-file=${HOME}/probe.env`, "-e", CHILD_REPORT]);
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node --experimental-config-file=<file granting permissions>", () => {
    fs.writeFileSync(`${HOME}/probe.config.json`, JSON.stringify({ permission: { "allow-child-process": true, "allow-net": true } }));
    return childEscape([`--experimental-config-file=${HOME}/probe.config.json`, "-e", CHILD_REPORT]);
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node --experimental-default-config-file (node.config.json in cwd)", () => {
    fs.mkdirSync(`${HOME}/probe-config-dir`, { recursive: true });
    fs.writeFileSync(`${HOME}/probe-config-dir/node.config.json`, JSON.stringify({ permission: { "allow-child-process": true } }));
    return childEscape(["--experimental-default-config-file", "-e", CHILD_REPORT], { cwd: `${HOME}/probe-config-dir` });
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node --run <package.json script> (runs /bin/sh outside the permission model)", async () => {
    fs.mkdirSync(`${HOME}/probe-run-dir`, { recursive: true });
    fs.writeFileSync(`${HOME}/probe-run-dir/package.json`, JSON.stringify({ scripts: { probe: "echo PWNED-RUN" } }));
    return judgeChild(await runNodeChild(["--run", "probe"], { cwd: `${HOME}/probe-run-dir` }));
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node --expose-internals (internalBinding spawn_sync)", () =>
    runNodeChild([
      "--expose-internals",
      "-e",
      "const r = {}; try { const { internalBinding } = require('internal/test/binding'); const out = internalBinding('spawn_sync').spawn({ file: '/bin/sh', args: ['sh', '-c', 'echo PWNED-INTERNALS'], envPairs: [], stdio: [{ type: 'pipe', readable: true }, { type: 'pipe', writable: true }, { type: 'pipe', writable: true }] }); r.sh = String(out.output && out.output[1]) } catch (e) { r.sh = e.code || e.message } console.log('CHILD ' + JSON.stringify({ permission: {}, ...r }))",
    ]).then(judgeChild),
  CHILD_TIMEOUT_MS);
  await probe("spawn node with LD_PRELOAD=<guest-written library>", () => {
    fs.writeFileSync(`${HOME}/probe-preload.so`, "not really a library");
    return childEscape(["--no-warnings", "-e", CHILD_REPORT], { env: { ...process.env, LD_PRELOAD: `${HOME}/probe-preload.so` } });
  }, CHILD_TIMEOUT_MS);
  await probe("spawn node with OPENSSL_CONF=<config loading a guest-written provider>", () => {
    fs.writeFileSync(`${HOME}/probe-provider.so`, "not really a library");
    fs.writeFileSync(
      `${HOME}/probe-openssl.cnf`,
      `nodejs_conf = nodejs_init\n[nodejs_init]\nproviders = provider_sect\n[provider_sect]\nprobe = probe_sect\n[probe_sect]\nmodule = ${HOME}/probe-provider.so\nactivate = 1\n`,
    );
    return childEscape(["--no-warnings", "-e", CHILD_REPORT], { env: { ...process.env, OPENSSL_CONF: `${HOME}/probe-openssl.cnf` } });
  }, CHILD_TIMEOUT_MS);

  // 12. Workers.
  await probe("new Worker(eval)", () =>
    new Promise((resolve, reject) => {
      const { Worker } = require("node:worker_threads");
      const worker = new Worker("require('worker_threads').parentPort.postMessage('worker up')", { eval: true });
      worker.once("message", (message) => {
        void worker.terminate();
        resolve(escaped(`worker said ${message}`));
      });
      worker.once("error", reject);
    }),
  );

  // 13. Inspector.
  await probe('require("inspector").open()', () => {
    const inspector = require("node:inspector");
    inspector.open(0, "127.0.0.1");
    const url = inspector.url();
    inspector.close();
    return escaped(`inspector listening at ${url}`);
  });
  await probe("new inspector.Session().connect()", () => {
    const { Session } = require("node:inspector");
    const session = new Session();
    session.connect();
    session.disconnect();
    return escaped("an inspector session connected");
  });
  await probe("process._debugProcess(<host pid>) (SIGUSR1 opens a debugger)", () => {
    process._debugProcess(hostPid);
    return escaped(`signalled host pid ${hostPid}`);
  });

  // 14. The host's secret file.
  const secretAttempts = [
    secretPath,
    `/proc/1/root${secretPath}`,
    `/proc/self/root${secretPath}`,
    `/proc/2/root${secretPath}`,
    `/proc/${hostPid}/root${secretPath}`,
    `/proc/self/cwd/../../../../../..${secretPath}`,
    `../../../../../../../../..${secretPath}`,
    `/home/agentos/../../..${secretPath}`,
  ];
  for (const file of secretAttempts) await probe(`read the host secret via ${file.replace(secretPath, "<secret>")}`, () => readAttempt(file));
  await probe("fs.promises.readFile of the host secret", async () => escaped(`read ${(await fs.promises.readFile(secretPath)).length} bytes`));
  await probe("list the host secret's directory", () => escaped(fs.readdirSync(secretDir).join(",")));
  await probe("/tmp in the VM is not the host's /tmp", () => {
    const entries = fs.readdirSync("/tmp");
    return entries.includes(path.basename(secretDir)) ? escaped(`VM /tmp lists ${path.basename(secretDir)}`) : contained(`VM /tmp has ${entries.length} entries, none of them the host's`);
  });
  await probe("hard link to the host secret", () => {
    fs.linkSync(secretPath, `${HOME}/probe-hardlink`);
    return escaped("hard link created");
  });
  await probe("host environment (canary variable) is not in the guest", () => {
    // PROBE_CONFIG names the variable, so look for it as a variable, not as text.
    const sources = { "process.env": Object.keys(process.env) };
    for (const file of ["/proc/self/environ", "/proc/1/environ"]) {
      try {
        sources[file] = fs.readFileSync(file, "latin1").split("\0").map((entry) => entry.split("=")[0]);
      } catch (error) {
        sources[file] = [];
      }
    }
    const leaked = Object.entries(sources).filter(([, names]) => names.includes(canary));
    return leaked.length ? escaped(`${canary} found in ${leaked.map(([source]) => source).join(", ")}`) : contained(`checked ${Object.keys(sources).join(", ")}`);
  });
  await probe("mountinfo does not expose the host secret's directory", () => {
    const text = fs.readFileSync("/proc/self/mountinfo", "utf8");
    return text.includes(secretDir) ? escaped("mountinfo names the secret dir") : contained(`${text.split("\n").length} mount lines, no secret dir`);
  });
  await probe("inherited file descriptors lead outside the VM", () => {
    const seen = [];
    for (const fd of fs.readdirSync("/proc/self/fd")) {
      let target;
      try {
        target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        continue;
      }
      seen.push(`${fd}->${target}`);
    }
    const suspicious = seen.filter((entry) => {
      const target = entry.split("->")[1];
      return !/^(pipe:|socket:|anon_inode:|\/dev\/|\/proc\/)/.test(target);
    });
    return suspicious.length ? escaped(`fds point at files/dirs: ${suspicious.join(" ")}`) : contained(seen.join(" "));
  });

  // 15. Signals.
  await probe("process.kill(<host test pid>, 0)", () => {
    process.kill(hostPid, 0);
    return escaped(`host pid ${hostPid} is signalable`);
  });
  await probe("/proc/<host test pid> is visible", () => {
    fs.statSync(`/proc/${hostPid}`);
    return escaped(`/proc/${hostPid} exists in the guest`);
  });
  await probe("process.kill(1, 0) reaches only the sandbox's own init", () => {
    let alive;
    try {
      process.kill(1, 0);
      alive = true;
    } catch (error) {
      return contained(`pid 1 not signalable: ${describe(error)}`);
    }
    const cmdline = fs.readFileSync("/proc/1/cmdline", "latin1").replace(/\0/g, " ").trim();
    const pids = fs.readdirSync("/proc").filter((entry) => /^\d+$/.test(entry));
    // The sandbox's pid space holds bubblewrap's init and this VM process, nothing of the host.
    return alive && /bwrap/.test(cmdline) && pids.length <= 4 ? contained(`pid 1 is ${cmdline}; pids: ${pids.join(",")}`) : escaped(`pid 1 is ${cmdline}; pids: ${pids.join(",")}`);
  });

  // 16. WASI.
  await probe('new WASI({ preopens: { "/": "/" } })', () => {
    const { WASI } = require("node:wasi");
    new WASI({ version: "preview1", preopens: { "/": "/" } });
    return escaped("WASI instance created");
  });

  // 17. Native addons.
  fs.writeFileSync(`${HOME}/probe-addon.node`, "not an ELF file");
  const addonBlocked = (error) => /ERR_DLOPEN_DISABLED|ERR_ACCESS_DENIED/.test(String(error?.code));
  await probe("process.dlopen(<guest .node file>)", () => {
    try {
      process.dlopen({ exports: {} }, `${HOME}/probe-addon.node`);
    } catch (error) {
      if (addonBlocked(error)) throw error;
      return escaped(`the loader was reached: ${describe(error)}`);
    }
    return escaped("addon loaded");
  });
  await probe("require(<guest .node file>)", () => {
    try {
      require(`${HOME}/probe-addon.node`);
    } catch (error) {
      if (addonBlocked(error)) throw error;
      return escaped(`the loader was reached: ${describe(error)}`);
    }
    return escaped("addon loaded");
  });
  await probe("process.dlopen(libc)", () => {
    const libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6"].find((file) => fs.existsSync(file)) ?? "/lib/libc.so.6";
    try {
      process.dlopen({ exports: {} }, libc);
    } catch (error) {
      if (addonBlocked(error)) throw error;
      return escaped(`the loader was reached: ${describe(error)}`);
    }
    return escaped("libc loaded as an addon");
  });

  await probe("node:ffi dlopen(libc) / raw memory accessors", () => {
    const ffi = require("node:ffi");
    const outcomes = [];
    for (const [what, attempt] of [
      ["dlopen", () => ffi.dlopen("libc.so.6", { getpid: { result: "i32", parameters: [] } })],
      ["getRawPointer", () => ffi.getRawPointer(Buffer.alloc(8))],
      ["setUint8", () => ffi.setUint8(0n, 0)],
    ]) {
      try {
        attempt();
        return escaped(`ffi.${what} works`);
      } catch (error) {
        outcomes.push(`${what}: ${describe(error)}`);
      }
    }
    throw new Error(outcomes.join("; "));
  });
  await probe("node:sqlite loadExtension(<guest file>)", () => {
    const { DatabaseSync } = require("node:sqlite");
    const db = new DatabaseSync(":memory:", { allowExtension: true });
    try {
      db.loadExtension(`${HOME}/probe-addon.node`);
    } catch (error) {
      if (/ERR_LOAD_SQLITE_EXTENSION|ERR_ACCESS_DENIED/.test(String(error?.code))) throw error;
      return escaped(`the loader was reached: ${describe(error)}`);
    } finally {
      db.close();
    }
    return escaped("extension loaded");
  });
  // Writing one's own memory through /proc is native code without an addon.
  for (const file of ["/proc/self/mem", "/proc/1/mem"]) {
    await probe(`open ${file} for writing`, () => {
      fs.closeSync(fs.openSync(file, "r+"));
      return escaped(`${file} is writable`);
    });
  }

  // 18. Unix sockets.
  for (const socketPath of ["/var/run/docker.sock", "/run/docker.sock", unixSocketPath, `\0${abstractSocketName}`].filter(Boolean)) {
    await probe(`net.connect({ path: ${JSON.stringify(socketPath.replace("\0", "\\0"))} })`, () => tcpConnect({ path: socketPath }));
  }
  await probe("raw Pipe handle (from stdin) connects to the host's unix sockets", async () => {
    const Pipe = process.stdin._handle?.constructor;
    if (typeof Pipe !== "function" || typeof Pipe.prototype.connect !== "function") throw new Error(`no Pipe constructor (stdin handle: ${process.stdin._handle?.constructor?.name})`);
    const outcomes = [];
    for (const target of [unixSocketPath, `\0${abstractSocketName}`]) {
      try {
        const socket = new net.Socket({ handle: new Pipe(0), readable: false, writable: false });
        const result = await withTimeout(
          new Promise((resolve, reject) => {
            socket.once("error", reject);
            socket.connect({ path: target }, () => resolve(escaped(`connected to ${target.replace("\0", "@")}`)));
          }),
          PROBE_TIMEOUT_MS / 3,
          "pipe connect",
        );
        socket.destroy();
        return result;
      } catch (error) {
        outcomes.push(`${target.replace("\0", "@")}: ${describe(error)}`);
      }
    }
    throw new Error(outcomes.join("; "));
  });
  // fds 0-2 are the guest's stdio and fd 3 its kernel channel (all socketpairs to
  // the host process); pipes and anon inodes above them are libuv's own, and
  // closing those would break this process. Any other socket is a way out.
  await probe("net.Socket({ fd }) on every other socket fd up to 20, then write", async () => {
    const outcomes = [];
    for (let fd = 0; fd <= 20; fd++) {
      let target;
      try {
        target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        continue;
      }
      if (fd <= 3 || !target.startsWith("socket:")) {
        outcomes.push(`fd ${fd}: ${target} (skipped)`);
        continue;
      }
      try {
        const socket = new net.Socket({ fd, readable: false, writable: true });
        const type = socket._handle?.constructor?.name;
        const writeError = await new Promise((resolve) => {
          socket.once("error", resolve);
          socket.write("AGENTVM-PROBE\n", (error) => resolve(error));
        });
        socket.destroy();
        if (!writeError) return escaped(`fd ${fd} is an extra ${type} socket (${target}) and took a write`);
        outcomes.push(`fd ${fd}: ${type} write failed: ${describe(writeError)}`);
      } catch (error) {
        outcomes.push(`fd ${fd}: ${describe(error)}`);
      }
    }
    return contained(outcomes.join("; "));
  });

  // 19. Read-only system directories (opening existing files r+ writes nothing).
  const writeTargets = [
    ["create", "/usr/agentvm-probe"],
    ["create", "/usr/bin/agentvm-probe"],
    ["create", "/opt/node/bin/agentvm-probe"],
    ["create", "/opt/node/agentvm-probe"],
    ["create", "/opt/agentvm/agentvm-probe"],
    ["create", "/lib/agentvm-probe"],
    ["open r+", "/opt/node/bin/node"],
    ["open r+", "/opt/agentvm/preload.ts"],
    ["open r+", "/opt/agentvm/preload.js"],
    ["open r+", "/usr/bin/env"],
  ];
  for (const [kind, file] of writeTargets) {
    await probe(`${kind} ${file}`, () => {
      if (kind === "create") fs.writeFileSync(file, "AGENTVM-PROBE", { flag: "wx" });
      else fs.closeSync(fs.openSync(file, "r+"));
      return escaped(`${file} is writable`);
    });
  }
  await probe("chmod /opt/node/bin/node", () => {
    fs.chmodSync("/opt/node/bin/node", 0o777);
    return escaped("chmod succeeded");
  });

  // 20. The network as the guest's OS sees it.
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"]) {
    await probe(`${file} is empty`, () => {
      const rows = fs.readFileSync(file, "utf8").trim().split("\n").slice(1).filter(Boolean);
      return rows.length ? escaped(`${rows.length} sockets visible: ${rows.slice(0, 3).join(" | ")}`) : contained("no sockets");
    });
  }
  await probe("/proc/net/unix shows none of the host's sockets", () => {
    const text = fs.readFileSync("/proc/net/unix", "utf8");
    const hit = [unixSocketPath, abstractSocketName].filter(Boolean).find((name) => text.includes(name));
    return hit ? escaped(`host socket ${hit} is listed`) : contained(`${text.trim().split("\n").length - 1} unix sockets, none of the host's`);
  });
  await probe("os.networkInterfaces() shows only loopback", () => {
    const interfaces = os.networkInterfaces();
    const names = Object.keys(interfaces);
    const addresses = Object.values(interfaces).flat().map((entry) => entry.address);
    return names.some((name) => name !== "lo") || (hostIp && addresses.includes(hostIp))
      ? escaped(`interfaces: ${JSON.stringify(interfaces)}`)
      : contained(`interfaces: ${names.join(",") || "none"}`);
  });
  await probe("/sys/class/net lists only lo", () => {
    const names = fs.readdirSync("/sys/class/net");
    return names.some((name) => name !== "lo") ? escaped(`interfaces: ${names.join(",")}`) : contained(names.join(","));
  });
  await probe("listen on the host ip", () =>
    new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once("error", reject);
      server.listen(0, hostIp || "10.0.2.15", () => {
        server.close();
        resolve(escaped(`listening on ${JSON.stringify(server.address())}`));
      });
    }),
  );
  await probe("process.setuid(0)", () => {
    process.setuid(0);
    return escaped(`uid is now ${process.getuid()}`);
  });

  // Host API probe preparation: links the host reads back after this program ends.
  for (const [name, target] of [
    ["probe-link-abs", secretPath],
    ["probe-link-rel", `../../../../../../../../..${secretPath}`],
    ["probe-link-dir", secretDir],
  ]) {
    try {
      fs.symlinkSync(target, `${HOME}/${name}`);
    } catch {
      // The host checks whatever exists.
    }
  }

  local.close();
}

const watchdog = setTimeout(() => {
  process.stdout.write(`PROBES ${JSON.stringify({ results, controls, incomplete: "watchdog fired" })}\n`, () => process.exit(3));
}, 45_000);

main().then(
  () => {
    clearTimeout(watchdog);
    process.stdout.write(`PROBES ${JSON.stringify({ results, controls })}\n`, () => process.exit(0));
  },
  (error) => {
    clearTimeout(watchdog);
    process.stdout.write(`PROBES ${JSON.stringify({ results, controls, fatal: describe(error) })}\n`, () => process.exit(2));
  },
);
