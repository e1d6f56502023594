/**
 * Real egress through an allowed rule (DESIGN §3 "Network policy"): TLS stays
 * end to end inside the guest (the host never terminates it), large bodies
 * stream with backpressure both ways, and a host server's end or reset reaches
 * the guest as `end` or ECONNRESET.
 *
 * Workplace rule: every host server listens on 127.0.0.1 and guests reach it
 * only as `host.agentvm.internal:<port>`, through a rule naming that port.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, X509Certificate } from "node:crypto";
import { spawn } from "node:child_process";
import { once } from "node:events";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { after } from "node:test";
import type { Vm } from "agentvm";
import { collectOutput, tempDataDir, testVm, waitForOutput } from "./helpers.ts";
import { guestResult, writeScript } from "./vm-network-support.ts";
import { arrivals, attempt, attemptOne, hostHttpServer, hostHttpsServer, hostTcpServer, makeCertificates, pattern, type SeenRequest, type TestCertificates } from "./policy-support.ts";

const MiB = 1024 * 1024;
const BIG = 20 * MiB;
/** What the backpressure test's server sends: far more than the sockets' buffers can hold. */
const HELD = 64 * MiB;

let certs: TestCertificates;
let web: { port: number; seen: SeenRequest[] };
let secure: Awaited<ReturnType<typeof hostHttpsServer>>;
let tcp: Awaited<ReturnType<typeof hostTcpServer>>;
/** A server whose responses the test can watch: how much is still waiting to be sent. */
let slow: { port: number; flushed: number[] };
let slowServer: http.Server;
let vm: Vm;

before(async () => {
  certs = makeCertificates();
  web = await hostHttpServer({ tag: "egress" });
  secure = await hostHttpsServer(certs);
  tcp = await hostTcpServer();
  const flushed: number[] = [];
  slowServer = http.createServer((req, res) => {
    // Written in 64 KiB pieces with backpressure; `flushed` counts what the OS has taken.
    const index = flushed.push(0) - 1;
    const data = pattern(HELD, 11);
    res.writeHead(200, { "content-length": String(HELD) });
    let offset = 0;
    const pump = () => {
      while (offset < HELD) {
        const chunk = data.subarray(offset, offset + 64 * 1024);
        offset += chunk.length;
        if (!res.write(chunk, () => (flushed[index]! += chunk.length))) return void res.once("drain", pump);
      }
      res.end();
    };
    pump();
  });
  await new Promise<void>((resolve) => slowServer.listen(0, "127.0.0.1", resolve));
  slow = { port: (slowServer.address() as AddressInfo).port, flushed };
  vm = await testVm(await tempDataDir("agentvm-policy-egress-"), {
    name: "policy-egress",
    permissions: {
      network: {
        rules: [
          {
            mode: "allow",
            operations: ["connect"],
            patterns: [`host.agentvm.internal:${web.port}`, `host.agentvm.internal:${secure.port}`, `host.agentvm.internal:${tcp.port}`, `host.agentvm.internal:${slow.port}`],
          },
        ],
      },
    },
  });
  await vm.writeFile("/home/agentos/ca.pem", certs.caCert);
});

after(async () => {
  slowServer.closeAllConnections();
  await new Promise<void>((resolve) => slowServer.close(() => resolve()));
});

describe("TLS end to end", () => {
  test("with the test CA (NODE_EXTRA_CA_CERTS), guest fetch verifies the host's certificate and the host server sees the request", async () => {
    const before = secure.seen.length;
    const outcome = await attemptOne(vm, { kind: "fetch", url: `https://host.agentvm.internal:${secure.port}/over-tls` }, { NODE_EXTRA_CA_CERTS: "/home/agentos/ca.pem" });
    assert.equal(outcome.ok, true, JSON.stringify(outcome));
    assert.equal(outcome.body, "secure hello /over-tls");
    assert.deepEqual(secure.seen.slice(before).map((r) => r.url), ["/over-tls"]);
    // The guest's TLS client sent SNI for the name it asked for.
    assert.equal(secure.handshakes.at(-1)!.servername, "host.agentvm.internal");
  });

  test("with the `ca` option, https.get and tls.connect see exactly the host server's certificate", async () => {
    const expected = new X509Certificate(certs.serverCert).fingerprint256;
    const [viaHttps, viaTls] = await attempt(vm, [
      { kind: "https", url: `https://host.agentvm.internal:${secure.port}/with-ca`, ca: "/home/agentos/ca.pem" },
      { kind: "tls", host: "host.agentvm.internal", port: secure.port, ca: "/home/agentos/ca.pem" },
    ]);
    assert.equal(viaHttps!.ok, true, JSON.stringify(viaHttps));
    assert.equal(viaHttps!.body, "secure hello /with-ca");
    assert.equal(viaHttps!.fingerprint, expected, "the guest talks TLS with the host server itself, not with a middlebox");
    assert.equal(viaTls!.ok, true, JSON.stringify(viaTls));
    assert.equal(viaTls!.authorized, true);
    assert.equal(viaTls!.fingerprint, expected);
    assert.match(String(viaTls!.body), /^HTTP\/1\.1 200/);
  });

  test("without the CA the guest rejects the certificate: the host does not terminate TLS", async () => {
    const seenBefore = secure.seen.length;
    const connectionsBefore = arrivals.tlsHandshakes;
    const outcomes = await attempt(vm, [
      { kind: "fetch", url: `https://host.agentvm.internal:${secure.port}/no-ca` },
      { kind: "https", url: `https://host.agentvm.internal:${secure.port}/no-ca` },
      { kind: "tls", host: "host.agentvm.internal", port: secure.port },
    ]);
    for (const outcome of outcomes) {
      assert.equal(outcome.ok, false, JSON.stringify(outcome));
      assert.match(String(outcome.code), /UNABLE_TO_GET_ISSUER_CERT_LOCALLY|UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN/, JSON.stringify(outcome));
    }
    // The bytes did reach the host server (three TCP connections), but no request was ever decrypted there.
    assert.ok(arrivals.tlsHandshakes - connectionsBefore >= 3, "the connections reached the host server");
    assert.equal(secure.seen.length, seenBefore);
  });

  test("the guest checks the name too: the right CA but another server name fails", async () => {
    const outcome = await attemptOne(vm, { kind: "tls", host: "host.agentvm.internal", port: secure.port, servername: "other.example", ca: "/home/agentos/ca.pem" });
    assert.equal(outcome.ok, false, JSON.stringify(outcome));
    assert.equal(outcome.code, "ERR_TLS_CERT_ALTNAME_INVALID", JSON.stringify(outcome));
  });
});

describe("large bodies and backpressure on real egress", () => {
  test("the guest downloads 20 MiB from a host server through the allowed rule; the bytes match", async () => {
    const outcome = await attemptOne(vm, { kind: "fetch", url: `http://host.agentvm.internal:${web.port}/big?n=${BIG}`, hash: true });
    assert.equal(outcome.ok, true, JSON.stringify(outcome));
    assert.equal(outcome.length, BIG);
    assert.equal(outcome.sha256, createHash("sha256").update(pattern(BIG)).digest("hex"));
  });

  test("the guest uploads 20 MiB to a host server; the bytes match", async () => {
    const before = web.seen.length;
    const result = await guestResult(
      vm,
      `${patternSource}
       const body = pattern(${BIG}, 5);
       const req = require("node:http").request({ host: "host.agentvm.internal", port: ${web.port}, method: "POST", path: "/upload" }, (res) => {
         let text = ""; res.on("data", (c) => (text += c)); res.on("end", () => console.log("RESULT " + text));
       });
       req.end(body);`,
    );
    assert.equal(result.body, BIG);
    assert.equal(result.sha256, createHash("sha256").update(pattern(BIG, 5)).digest("hex"));
    assert.equal(web.seen.length, before + 1);
  });

  test("a guest that stops reading holds the host server back instead of the kernel buffering the body", async () => {
    const script = await writeScript(
      vm,
      `const crypto = require("node:crypto");
       const hash = crypto.createHash("sha256");
       let length = 0;
       require("node:http").get({ host: "host.agentvm.internal", port: ${slow.port}, path: "/" }, (res) => {
         res.once("data", (chunk) => {
           hash.update(chunk); length += chunk.length;
           res.pause();
           console.log("PAUSED");
           process.stdin.once("data", () => {
             process.stdin.destroy();
             res.on("data", (c) => { hash.update(c); length += c.length; });
             res.on("end", () => console.log("RESULT " + JSON.stringify({ length, sha256: hash.digest("hex") })));
             res.resume();
           });
         });
       });`,
    );
    const { pid } = await vm.spawn("node", [script]);
    const output = collectOutput(vm, pid);
    await waitForOutput(vm, pid, /PAUSED/, 15_000);
    const index = slow.flushed.length - 1;
    assert.ok(index >= 0, "the host server got the request");
    // Let whatever can flow flow; then the most the path holds is the sockets' buffers and one window.
    await new Promise((resolve) => setTimeout(resolve, 500));
    const flushed = slow.flushed[index]!;
    assert.ok(flushed < HELD - 16 * MiB, `the host server could hand over only ${flushed} of ${HELD} bytes: the kernel does not read ahead without bound`);
    await vm.writeProcessStdin(pid, "go\n");
    assert.equal(await vm.waitProcess(pid), 0);
    output.stop();
    const line = output.stdout.split("\n").find((l) => l.startsWith("RESULT "));
    assert.ok(line, output.all);
    const result = JSON.parse(line.slice("RESULT ".length));
    assert.equal(result.length, HELD);
    assert.equal(result.sha256, createHash("sha256").update(pattern(HELD, 11)).digest("hex"));
  });
});

describe("close and reset propagate from the host server to the guest", () => {
  const CLOSE_GUEST = String.raw`
    const net = require("node:net");
    const command = process.argv[2];
    const socket = net.connect({ host: "host.agentvm.internal", port: Number(process.argv[3]) });
    let data = "";
    const events = [];
    socket.on("connect", () => { events.push("connect"); socket.write(command + "\n"); });
    socket.on("data", (c) => (data += c));
    socket.on("end", () => events.push("end"));
    socket.on("error", (e) => events.push("error:" + e.code));
    socket.on("close", (hadError) => {
      events.push("close:" + hadError);
      console.log("RESULT " + JSON.stringify({ data, events }));
    });
  `;

  test("the host server ending the connection → the guest sees its data, then end, then close", async () => {
    const before = tcp.connections();
    const result = await guestResult(vm, CLOSE_GUEST, ["end", String(tcp.port)]);
    assert.equal(result.data, "bye\n");
    assert.deepEqual(result.events, ["connect", "end", "close:false"]);
    assert.equal(tcp.connections(), before + 1);
  });

  test("the host server resetting the connection → the guest sees ECONNRESET", async () => {
    const result = await guestResult(vm, CLOSE_GUEST, ["reset", String(tcp.port)]);
    assert.deepEqual(result.events.filter((e: string) => e.startsWith("error")), ["error:ECONNRESET"], JSON.stringify(result));
    assert.equal(result.events.at(-1), "close:true");
    assert.ok(!result.events.includes("end"), `a reset is not an orderly end: ${JSON.stringify(result.events)}`);
  });
});

/** The guest's copy of policy-support's pattern(). */
const patternSource = `
function pattern(size, seed) {
  const out = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i += 4) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  return out;
}`;

describe("egress work in flight per VM", () => {
  test("a guest opening more connections than limits.maxEgressInFlight gets EACCES for the extra ones, logged as denials", async () => {
    // A host listener that never accepts: once its queue is full, further connects hang (the kernel drops their SYNs).
    const listener = spawn(process.execPath, ["-e", `
      const server = require("node:net").createServer().listen({ port: 0, host: "127.0.0.1", backlog: 1 }, () => {
        console.log(server.address().port);
        setTimeout(() => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 120000), 10);
      });
    `], { stdio: ["ignore", "pipe", "inherit"] });
    const listenerPort = await firstLine(listener);
    const capped = await testVm(await tempDataDir("agentvm-egress-cap-"), {
      name: "egress-cap",
      limits: { maxEgressInFlight: 4 },
      permissions: { network: { rules: [{ mode: "allow", operations: ["connect"], patterns: [`host.agentvm.internal:${listenerPort}`] }] } },
    });
    try {
      const result = await guestResult(capped, EGRESS_FLOOD_GUEST, [String(listenerPort), "12", "4"]);
      const denied = result.outcomes.filter((o: { code?: string }) => o.code !== undefined);
      assert.ok(denied.length >= 1, JSON.stringify(result));
      for (const outcome of denied) {
        assert.equal(outcome.code, "EACCES", JSON.stringify(outcome));
        assert.match(outcome.message, /limits\.maxEgressInFlight/);
      }
      const recorded = capped.networkDenials().recent.filter((denial) => denial.rule === "limits.maxEgressInFlight");
      assert.equal(recorded.length, denied.length, "each refusal is a recorded (and logged) denial");
    } finally {
      listener.kill("SIGKILL");
      await capped.dispose();
    }
  });
});

/** The port the listener child prints first. */
async function firstLine(child: ReturnType<typeof spawn>): Promise<number> {
  const [data] = (await once(child.stdout!, "data")) as [Buffer];
  return Number(String(data).trim());
}

/** Opens argv[3] connections at once; reports once all but argv[4] (the cap: those may hang) have settled. */
const EGRESS_FLOOD_GUEST = `
const net = require("node:net");
const [port, count, cap] = process.argv.slice(2).map(Number);
const outcomes = [];
for (let i = 0; i < count; i++) {
  const socket = net.connect(port, "host.agentvm.internal");
  socket.on("connect", () => settle({ connected: true }));
  socket.on("error", (error) => settle({ code: error.code, message: error.message }));
}
function settle(outcome) {
  outcomes.push(outcome);
  if (outcomes.length === count - cap) {
    console.log("RESULT " + JSON.stringify({ outcomes }));
    process.exit(0);
  }
}
`;
