/**
 * Network policy end to end (DESIGN §3 "Network policy", §4 layer 1): real
 * guests, real host servers on 127.0.0.1, the kernel in this process.
 *
 * Workplace rule: traffic only ever goes to loopback. Guests reach the host
 * servers as `host.agentvm.internal:<port>` or through a `hosts` entry mapped to
 * 127.0.0.1 plus a rule naming 127.0.0.1. Every other destination here is one
 * the kernel must refuse before connecting; the DNS trap in policy-support.ts
 * guarantees no name is ever sent to a real resolver.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { agentOS, createVm, type CreateVmOptions, type Vm } from "agentvm";
import { rejection, tempDataDir, testVm } from "./helpers.ts";
import { guestResult } from "./vm-network-support.ts";
import { attempt, attemptOne, denialLinesFor, dnsLookups, hostHttpServer, type Outcome, type SeenRequest } from "./policy-support.ts";

let dataDir: string;
let host: { port: number; seen: SeenRequest[] };
/** A second host server on a port in 8000-9000, for the `*.svc.test:8000-9000` rule. */
let ranged: { port: number; seen: SeenRequest[] };

before(async () => {
  dataDir = await tempDataDir("agentvm-policy-net-");
  host = await hostHttpServer({ tag: "plain" });
  ranged = await hostHttpServer({ tag: "ranged", range: [8000, 9000] });
});

let vms = 0;
async function vmWith(options: Partial<CreateVmOptions>): Promise<Vm> {
  return testVm(dataDir, { name: `policy-net-${++vms}`, ...options });
}

function assertDenied(outcome: Outcome, destination: RegExp, operation: RegExp = /connect/): void {
  assert.equal(outcome.ok, false, `expected a refusal, got ${JSON.stringify(outcome)}`);
  assert.equal(outcome.code, "EACCES", JSON.stringify(outcome));
  assert.match(outcome.message ?? "", destination, `the message names the destination: ${outcome.message}`);
  assert.match(outcome.message ?? "", operation, `the message names the operation: ${outcome.message}`);
}

describe("default deny", () => {
  test("net.connect, fetch, http.get and dns.lookup to outside fail with EACCES naming the destination and operation; nothing is resolved", async () => {
    const vm = await vmWith({});
    const before = dnsLookups.length;
    const outcomes = await attempt(vm, [
      { kind: "net", host: "example.com", port: 443 },
      { kind: "net", host: "203.0.113.7", port: 80 },
      { kind: "fetch", url: "http://example.com/" },
      { kind: "fetch", url: "https://api.example.com:8443/v1" },
      { kind: "http", url: "http://203.0.113.7:8080/" },
      { kind: "dns", host: "example.com" },
      { kind: "net", host: "host.agentvm.internal", port: host.port },
    ]);
    assertDenied(outcomes[0]!, /example\.com:443/);
    assert.equal(outcomes[0]!.syscall, "connect");
    assertDenied(outcomes[1]!, /203\.0\.113\.7:80/);
    assertDenied(outcomes[2]!, /example\.com:80/, /^connect EACCES/);
    assertDenied(outcomes[3]!, /api\.example\.com:8443/, /^connect EACCES/);
    assertDenied(outcomes[4]!, /203\.0\.113\.7:8080/);
    assertDenied(outcomes[5]!, /example\.com/, /\(dns example\.com denied/);
    assertDenied(outcomes[6]!, /host\.agentvm\.internal/);
    for (const outcome of outcomes) assert.match(outcome.message!, /denied in VM policy-net-\d+ by default \(deny\)|default \(deny\)/);
    assert.deepEqual(dnsLookups.slice(before), [], "a refused name is never sent to a resolver");
    assert.equal(host.seen.length, 0);
  });

  test("the VM's own loopback stays reachable under deny", async () => {
    const vm = await vmWith({ permissions: { network: "deny" } });
    const result = await guestResult(
      vm,
      `const http = require("node:http");
       const server = http.createServer((q, r) => r.end("inside")).listen(0, "127.0.0.1", async () => {
         const r = await fetch("http://localhost:" + server.address().port + "/");
         console.log("RESULT " + JSON.stringify(await r.text()));
         server.close();
       });`,
    );
    assert.equal(result, "inside");
  });
});

describe("host.agentvm.internal", () => {
  test("an allow rule naming host.agentvm.internal:<port> lets fetch and http reach the host server", async () => {
    const vm = await vmWith({ permissions: { network: { rules: [{ mode: "allow", operations: ["fetch"], patterns: [`host.agentvm.internal:${host.port}`] }] } } });
    const seenBefore = host.seen.length;
    const [viaFetch, viaHttp, viaDns] = await attempt(vm, [
      { kind: "fetch", url: `http://host.agentvm.internal:${host.port}/from-fetch?x=1` },
      { kind: "http", url: `http://host.agentvm.internal:${host.port}/from-http` },
      { kind: "dns", host: "host.agentvm.internal" },
    ]);
    assert.equal(viaFetch!.ok, true, JSON.stringify(viaFetch));
    assert.equal(viaFetch!.status, 200);
    assert.equal(JSON.parse(viaFetch!.body!).url, "/from-fetch?x=1");
    assert.equal(viaHttp!.ok, true, JSON.stringify(viaHttp));
    assert.equal(JSON.parse(viaHttp!.body!).url, "/from-http");
    // The host server saw both requests, with the name the guest used.
    const seen = host.seen.slice(seenBefore);
    assert.deepEqual(seen.map((r) => r.url), ["/from-fetch?x=1", "/from-http"]);
    assert.equal(seen[0]!.host, `host.agentvm.internal:${host.port}`);
    // Resolving the alias gives an unrouted placeholder, never a real host address.
    assert.equal(viaDns!.ok, true, JSON.stringify(viaDns));
    assert.deepEqual(viaDns!.addresses, ["198.18.0.254"]);
  });

  test("other ports of host.agentvm.internal are refused, by name and by its placeholder address", async () => {
    const vm = await vmWith({ permissions: { network: { rules: [{ mode: "allow", operations: ["connect"], patterns: [`host.agentvm.internal:${host.port}`] }] } } });
    const other = ranged.port;
    const seenBefore = ranged.seen.length;
    const outcomes = await attempt(vm, [
      { kind: "fetch", url: `http://host.agentvm.internal:${other}/` },
      { kind: "net", host: "host.agentvm.internal", port: other },
      { kind: "net", host: "198.18.0.254", port: other },
      { kind: "net", host: "198.18.0.254", port: host.port, label: "placeholder, named port" },
    ]);
    assertDenied(outcomes[0]!, new RegExp(`host\\.agentvm\\.internal:${other}`));
    assertDenied(outcomes[1]!, new RegExp(`host\\.agentvm\\.internal:${other}`));
    assertDenied(outcomes[2]!, new RegExp(`${other}`));
    assert.match(outcomes[1]!.message!, /default \(deny\)|reachable only on ports a rule names/);
    assert.equal(outcomes[3]!.ok, true, `the placeholder address maps to the named port: ${JSON.stringify(outcomes[3])}`);
    assert.equal(ranged.seen.length, seenBefore, "the unnamed port's server saw nothing");
  });

  test('"allow" alone does not open host.agentvm.internal; neither does a rule without a port', async () => {
    for (const network of ["allow", { rules: [{ mode: "allow" as const, patterns: ["host.agentvm.internal", "*"] }] }] as const) {
      const vm = await vmWith({ permissions: { network } });
      const seenBefore = host.seen.length;
      const outcomes = await attempt(vm, [
        { kind: "fetch", url: `http://host.agentvm.internal:${host.port}/` },
        { kind: "net", host: "host.agentvm.internal", port: host.port },
        { kind: "net", host: "198.18.0.254", port: host.port },
      ]);
      for (const outcome of outcomes) assertDenied(outcome, new RegExp(`${host.port}`));
      assert.equal(host.seen.length, seenBefore, `${JSON.stringify(network)}: the host server saw nothing`);
    }
  });

  test("a deny rule beats the naming allow rule", async () => {
    const vm = await vmWith({
      permissions: {
        network: {
          rules: [
            { mode: "allow", operations: ["connect"], patterns: [`host.agentvm.internal:${host.port}`] },
            { mode: "deny", patterns: ["host.agentvm.internal"] },
          ],
        },
      },
    });
    const outcome = await attemptOne(vm, { kind: "fetch", url: `http://host.agentvm.internal:${host.port}/` });
    assertDenied(outcome, /host\.agentvm\.internal/);
    assert.match(outcome.message!, /rules\[1\] \(deny/);
  });
});

describe("suffixes, port ranges, deny over allow, and the floor", () => {
  const svcHosts = { "a.svc.test": "127.0.0.1", "b.svc.test": "127.0.0.1", "svc.test": "127.0.0.1" };

  test("*.svc.test:8000-9000 plus a rule naming 127.0.0.1 reaches the host server through a hosts entry", async () => {
    const vm = await vmWith({
      hosts: svcHosts,
      permissions: {
        network: {
          rules: [
            { mode: "allow", operations: ["connect"], patterns: ["*.svc.test:8000-9000"] },
            { mode: "allow", operations: ["connect"], patterns: ["127.0.0.1:8000-9000"] },
          ],
        },
      },
    });
    const seenBefore = ranged.seen.length;
    const hostSeenBefore = host.seen.length;
    const outcomes = await attempt(vm, [
      { kind: "fetch", url: `http://a.svc.test:${ranged.port}/suffix` },
      { kind: "http", url: `http://x.b.svc.test:${ranged.port}/suffix-http`, label: "allowed by the policy, but not in the hosts map" },
      { kind: "http", url: `http://b.svc.test:${ranged.port}/suffix-http` },
      { kind: "fetch", url: `http://a.svc.test:${host.port}/out-of-range`, label: "outside 8000-9000" },
      { kind: "net", host: "127.0.0.1", port: ranged.port, label: "127.0.0.1 by itself is the VM's loopback" },
    ]);
    assert.equal(outcomes[0]!.ok, true, JSON.stringify(outcomes[0]));
    assert.equal(JSON.parse(outcomes[0]!.body!).from, "host ranged");
    // Not in the hosts map: the server resolves it (the trap answers ENOTFOUND instead of real DNS).
    assert.equal(outcomes[1]!.ok, false, JSON.stringify(outcomes[1]));
    assert.equal(outcomes[1]!.code, "ENOTFOUND", JSON.stringify(outcomes[1]));
    assert.ok(dnsLookups.includes("x.b.svc.test"), "an allowed name is resolved by the server, once");
    assert.equal(outcomes[2]!.ok, true, JSON.stringify(outcomes[2]));
    assertDenied(outcomes[3]!, new RegExp(`a\\.svc\\.test:${host.port}`));
    assert.equal(outcomes[4]!.ok, false);
    assert.equal(outcomes[4]!.code, "ECONNREFUSED", JSON.stringify(outcomes[4]));
    assert.deepEqual(ranged.seen.slice(seenBefore).map((r) => r.url), ["/suffix", "/suffix-http"]);
    assert.equal(host.seen.length, hostSeenBefore);
  });

  test("without the rule naming 127.0.0.1 the egress floor refuses the same destination; the bare suffix and other ports are not allowed", async () => {
    const vm = await vmWith({
      hosts: svcHosts,
      permissions: { network: { rules: [{ mode: "allow", operations: ["connect"], patterns: ["*.svc.test:8000-9000"] }] } },
    });
    const seenBefore = ranged.seen.length;
    const hostSeenBefore = host.seen.length;
    const [inRange, bare, outOfRange] = await attempt(vm, [
      { kind: "fetch", url: `http://a.svc.test:${ranged.port}/` },
      { kind: "fetch", url: `http://svc.test:${ranged.port}/` },
      { kind: "fetch", url: `http://a.svc.test:${host.port}/` },
    ]);
    assertDenied(inRange!, new RegExp(`a\\.svc\\.test:${ranged.port} \\(127\\.0\\.0\\.1\\)`));
    assert.match(inRange!.message!, /egress floor/);
    assertDenied(bare!, new RegExp(`svc\\.test:${ranged.port}`));
    assert.match(bare!.message!, /default \(deny\)/);
    assertDenied(outOfRange!, new RegExp(`a\\.svc\\.test:${host.port}`));
    assert.match(outOfRange!.message!, /default \(deny\)/);
    assert.equal(ranged.seen.length, seenBefore);
    assert.equal(host.seen.length, hostSeenBefore);
  });

  test("deny beats allow: a deny rule on one name, in either order", async () => {
    for (const order of ["deny-last", "deny-first"]) {
      const allow = { mode: "allow" as const, operations: ["connect" as const], patterns: ["*.svc.test", "127.0.0.1"] };
      const deny = { mode: "deny" as const, patterns: ["b.svc.test"] };
      const vm = await vmWith({ hosts: svcHosts, permissions: { network: { rules: order === "deny-last" ? [allow, deny] : [deny, allow] } } });
      const seenBefore = ranged.seen.length;
      const [a, b] = await attempt(vm, [
        { kind: "fetch", url: `http://a.svc.test:${ranged.port}/a` },
        { kind: "fetch", url: `http://b.svc.test:${ranged.port}/b` },
      ]);
      assert.equal(a!.ok, true, `${order}: ${JSON.stringify(a)}`);
      assertDenied(b!, /b\.svc\.test/);
      assert.match(b!.message!, /\(deny \* b\.svc\.test\)/);
      assert.deepEqual(ranged.seen.slice(seenBefore).map((r) => r.url), ["/a"]);
    }
  });

  test("a deny CIDR beats an allow rule naming the address", async () => {
    const vm = await vmWith({
      hosts: svcHosts,
      permissions: {
        network: {
          rules: [
            { mode: "allow", patterns: ["*.svc.test", "127.0.0.1"] },
            { mode: "deny", patterns: ["127.0.0.0/8"] },
          ],
        },
      },
    });
    const outcome = await attemptOne(vm, { kind: "fetch", url: `http://a.svc.test:${ranged.port}/` });
    assertDenied(outcome, /a\.svc\.test/);
    assert.match(outcome.message!, /deny \* 127\.0\.0\.0\/8/);
  });

  test('the floor holds under "allow": private, shared, link-local, metadata, mapped and unspecified addresses', async () => {
    const vm = await vmWith({ permissions: { network: "allow" }, hosts: { "internal.test": "10.1.2.3", "metadata.test": "169.254.169.254", "v6.test": "fd00::1" } });
    const port = 80;
    const floored: [string, string][] = [
      ["10.0.0.1", "10.0.0.1"],
      ["172.16.5.4", "172.16.5.4"],
      ["169.254.169.254", "169.254.169.254"],
      ["192.168.1.1", "192.168.1.1"],
      ["100.64.0.1", "100.64.0.1"],
      ["fd00::1", "fd00::1"],
      ["fe80::1", "fe80::1"],
      ["::ffff:10.0.0.1", "::ffff:10.0.0.1"],
      ["::ffff:a00:1", "::ffff:a00:1"],
      ["224.0.0.1", "224.0.0.1"],
      ["internal.test", "internal\\.test:80 \\(10\\.1\\.2\\.3\\)"],
      ["metadata.test", "metadata\\.test:80 \\(169\\.254\\.169\\.254\\)"],
      ["v6.test", "v6\\.test:80 \\(fd00::1\\)"],
    ];
    const outcomes = await attempt(vm, [
      ...floored.map(([target]) => ({ kind: "net" as const, host: target, port })),
      { kind: "fetch", url: "http://169.254.169.254/latest/meta-data/" },
      { kind: "fetch", url: "http://[fd00::1]/" },
      { kind: "fetch", url: "http://[::ffff:10.0.0.1]/" },
      { kind: "fetch", url: "http://internal.test/" },
    ]);
    floored.forEach(([, destination], i) => {
      assertDenied(outcomes[i]!, new RegExp(destination));
      assert.match(outcomes[i]!.message!, /egress floor/);
    });
    for (const outcome of outcomes.slice(floored.length)) {
      assertDenied(outcome, /169\.254\.169\.254|fd00::1|::ffff:a00:1|internal\.test/);
      assert.match(outcome.message!, /egress floor/);
    }
  });

  test("127.0.0.2, 0.0.0.0 and [::] in a VM are the VM's own loopback, never the host's", async () => {
    const vm = await vmWith({ permissions: { network: "allow" } });
    const seenBefore = host.seen.length;
    const outcomes = await attempt(vm, [
      { kind: "net", host: "127.0.0.2", port: host.port },
      { kind: "net", host: "127.0.0.1", port: host.port },
      { kind: "net", host: "0.0.0.0", port: host.port },
      { kind: "net", host: "::", port: host.port },
      { kind: "fetch", url: `http://127.0.0.2:${host.port}/` },
      { kind: "fetch", url: `http://[::1]:${host.port}/` },
    ]);
    for (const outcome of outcomes) {
      assert.equal(outcome.ok, false, JSON.stringify(outcome));
      assert.equal(outcome.code, "ECONNREFUSED", `nothing listens on that port in the VM: ${JSON.stringify(outcome)}`);
      // Linux's own refusal now: the VM's loopback is a real network namespace.
      assert.match(outcome.message!, /ECONNREFUSED/);
    }
    assert.equal(host.seen.length, seenBefore, "the host server on 127.0.0.1 saw nothing");
    // The positive control: a guest server on the same port answers on 127.0.0.2.
    const result = await guestResult(
      vm,
      `const server = require("node:http").createServer((q, r) => r.end("vm loopback")).listen(${host.port}, async () => {
         const r = await fetch("http://127.0.0.2:${host.port}/");
         console.log("RESULT " + JSON.stringify(await r.text()));
         server.close();
       });`,
    );
    assert.equal(result, "vm loopback");
  });

  test("a listen rule in the network policy refuses a port with EACCES", async () => {
    const vm = await vmWith({ permissions: { network: { default: "allow", rules: [{ mode: "deny", operations: ["listen"], patterns: ["*:3000-3999"] }] } } });
    const result = await guestResult(
      vm,
      `const net = require("node:net");
       const tryListen = (port) => new Promise((resolve) => {
         const server = net.createServer();
         server.once("error", (e) => resolve({ code: e.code, message: e.message }));
         server.listen(port, () => { const p = server.address().port; server.close(); resolve({ port: p }); });
       });
       (async () => console.log("RESULT " + JSON.stringify([await tryListen(3500), await tryListen(4000)])))();`,
    );
    assert.equal(result[0].code, "EACCES", JSON.stringify(result[0]));
    assert.match(result[0].message, /listen .*3500/);
    assert.equal(result[1].port, 4000);
  });
});

describe("invalid policies are rejected when the VM is defined", () => {
  const cases: [string, unknown, RegExp][] = [
    ["an unknown mode", { rules: [{ mode: "permit", patterns: ["*"] }] }, /permissions\.network\.rules\[0\]\.mode must be "allow" or "deny"/],
    ["an unknown operation", { rules: [{ mode: "allow", patterns: ["a.com"] }, { mode: "allow", operations: ["connect", "smtp"] }] }, /permissions\.network\.rules\[1\]\.operations\[1\] "smtp" is not an operation/],
    ["empty patterns", { rules: [{ mode: "allow", patterns: [] }] }, /permissions\.network\.rules\[0\]\.patterns must be a non-empty array/],
    ["a malformed CIDR", { rules: [{ mode: "deny", patterns: ["10.0.0.0/33"] }] }, /permissions\.network\.rules\[0\]\.patterns\[0\] "10\.0\.0\.0\/33" is not a valid CIDR/],
    ["a bad port range", { rules: [{ mode: "allow", patterns: ["ok.example", "host:9000-8000"] }] }, /permissions\.network\.rules\[0\]\.patterns\[1\] "host:9000-8000": the port must be 1-65535 or a range/],
    ["an unknown default", { default: "block", rules: [] }, /permissions\.network\.default must be "allow" or "deny"/],
    ["an unknown shorthand", "open", /permissions\.network/],
    ["an unknown rule key", { rules: [{ mode: "allow", pattern: ["x"] }] }, /permissions\.network\.rules\[0\].*pattern/],
  ];
  for (const [what, network, message] of cases) {
    test(`${what}: createVm and agentOS() both refuse`, async () => {
      const error = await rejection(createVm({ dataDir, name: "never-created", permissions: { network: network as never } }));
      assert.equal(error.code, "INVALID_ARGUMENT");
      assert.match(error.message, message);
      for (const config of [{ permissions: { network } }, { options: { permissions: { network } } }]) {
        assert.throws(() => agentOS(config as never), (e: Error & { code?: string }) => e.code === "INVALID_ARGUMENT" && message.test(e.message));
      }
    });
  }

  test("hosts entries must map a name to an IP address", async () => {
    for (const hosts of [{ "db.local": "not-an-ip" }, { "bad name": "10.0.0.1" }] as Record<string, string>[]) {
      const error = await rejection(createVm({ dataDir, name: "never-created", hosts }));
      assert.equal(error.code, "INVALID_ARGUMENT");
      assert.match(error.message, /hosts/);
      assert.throws(() => agentOS({ hosts }), /hosts/);
    }
  });
});

describe("audit", () => {
  test("every denial is one structured log line and is counted by vm.networkDenials()", async () => {
    const vm = await vmWith({ permissions: { network: { rules: [{ mode: "deny", patterns: ["*.blocked.test"] }] } } });
    assert.equal(vm.networkDenials().count, 0);
    const outcomes = await attempt(vm, [
      { kind: "net", host: "x.blocked.test", port: 443 },
      { kind: "fetch", url: "http://203.0.113.9:8080/" },
      { kind: "dns", host: "example.com" },
      { kind: "fetch", url: `http://host.agentvm.internal:${host.port}/` },
      { kind: "udp", host: "203.0.113.9", port: 53 },
    ]);
    for (const outcome of outcomes) assert.equal(outcome.code, "EACCES", JSON.stringify(outcome));
    const lines = denialLinesFor(vm.name);
    const { count, recent } = vm.networkDenials();
    assert.equal(lines.length, outcomes.length, `one line per denial: ${JSON.stringify(lines)}`);
    assert.equal(count, outcomes.length);
    assert.deepEqual(recent, lines);
    for (const line of lines) {
      assert.equal(line.vm, vm.name);
      assert.equal(typeof line.pid, "number");
      assert.ok((line.pid as number) > 0);
      assert.equal(typeof line.time, "number");
      for (const key of ["operation", "destination", "rule", "reason"]) assert.equal(typeof line[key], "string", `${key} in ${JSON.stringify(line)}`);
    }
    assert.deepEqual(
      lines.map((line) => [line.operation, line.destination, line.rule]),
      [
        ["connect", "x.blocked.test:443", "rules[0] (deny * *.blocked.test)"],
        ["connect", "203.0.113.9:8080", "default (deny)"],
        ["dns", "example.com", "default (deny)"],
        ["connect", `host.agentvm.internal:${host.port}`, "default (deny)"],
        ["udp", "203.0.113.9:53", "default (deny)"],
      ],
    );
    // All from the same guest process.
    assert.equal(new Set(lines.map((line) => line.pid)).size, 1);
  });
});
