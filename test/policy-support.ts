/**
 * Shared by the policy-*.test.ts files: host-side loopback servers that count
 * what reaches them, a DNS trap, a console.warn capture and a test CA.
 *
 * Workplace rule: traffic may only go to loopback. Every host server here
 * listens on 127.0.0.1; guests reach them only as `host.agentvm.internal:<port>`
 * or through a `hosts` entry plus a rule naming 127.0.0.1. The DNS trap makes
 * sure the kernel (which runs in this process) never sends a real DNS query:
 * any lookup of a name is recorded and fails with ENOTFOUND.
 */
import { after } from "node:test";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import dgram from "node:dgram";
import dns from "node:dns";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Vm } from "agentvm";
import { collectOutput } from "./helpers.ts";
import { writeScript } from "./vm-network-support.ts";

const closers: (() => Promise<void>)[] = [];
after(async () => {
  await Promise.all(closers.splice(0).map((close) => close().catch(() => {})));
});

/** Names the kernel tried to resolve with the host's resolver (always refused here). */
export const dnsLookups: string[] = [];
/**
 * inet_aton: the numeric IPv4 spellings libc's resolver accepts without any
 * query (2130706433, 0x7f.1, 017700000001, 127.1). Parsed here so that even
 * those never reach the real resolver.
 */
export function inetAton(text: string): string | undefined {
  const parts = text.split(".");
  if (parts.length > 4 || parts.some((part) => !/^(0x[0-9a-f]+|0[0-7]*|[1-9]\d*)$/i.test(part))) return undefined;
  const numbers = parts.map((part) => (/^0x/i.test(part) ? parseInt(part.slice(2), 16) : part.length > 1 && part.startsWith("0") ? parseInt(part, 8) : Number(part)));
  const last = numbers.pop()!;
  if (numbers.some((n) => n > 255) || last >= 2 ** (8 * (4 - numbers.length))) return undefined;
  let value = last;
  numbers.forEach((n, i) => (value += n * 2 ** (8 * (3 - i))));
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join(".");
}

const realLookup = dns.promises.lookup;
(dns.promises as unknown as { lookup: unknown }).lookup = async (hostname: string, options?: { all?: boolean }) => {
  const numeric = typeof hostname === "string" ? (net.isIP(hostname) ? hostname : inetAton(hostname)) : undefined;
  if (numeric) {
    const answer = { address: numeric, family: net.isIP(numeric) };
    return options?.all ? [answer] : answer;
  }
  dnsLookups.push(String(hostname));
  throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname} (real DNS is trapped in the policy tests)`), { code: "ENOTFOUND", hostname });
};
after(() => {
  (dns.promises as unknown as { lookup: unknown }).lookup = realLookup;
});

/** Every `agentvm network denied {…}` line written with console.warn, parsed. */
export const denialLines: Record<string, unknown>[] = [];
/** Every `agentvm network denials {…}` line: the count of denials past the per-VM burst (rate-limited). */
export const denialSummaries: { vm: string; more: number }[] = [];
const realWarn = console.warn;
console.warn = (...args: unknown[]) => {
  const line = args.map(String).join(" ");
  const match = /^agentvm network denied (\{.*\})$/.exec(line);
  const summary = /^agentvm network denials (\{.*\})$/.exec(line);
  if (match) denialLines.push(JSON.parse(match[1]!) as Record<string, unknown>);
  else if (summary) denialSummaries.push(JSON.parse(summary[1]!) as { vm: string; more: number });
  else realWarn(...args);
};
after(() => {
  console.warn = realWarn;
});

export function denialLinesFor(vm: string): Record<string, unknown>[] {
  return denialLines.filter((line) => line.vm === vm);
}

/** What reached the host's loopback servers. */
export const arrivals = { tcp: 0, http: 0, https: 0, tlsHandshakes: 0, udp: 0, log: [] as string[] };

export function totalArrivals(): number {
  return arrivals.tcp + arrivals.http + arrivals.https + arrivals.tlsHandshakes + arrivals.udp;
}

async function listenOn(server: net.Server, port = 0): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  closers.push(
    () =>
      new Promise<void>((resolve) => {
        (server as http.Server).closeAllConnections?.();
        server.close(() => resolve());
      }),
  );
  return (server.address() as net.AddressInfo).port;
}

/** Listens on 127.0.0.1 at a free port in [low, high]. */
export async function listenInRange(server: net.Server, low: number, high: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = low + Math.floor(Math.random() * (high - low + 1));
    try {
      return await listenOn(server, port);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EADDRINUSE") throw error;
    }
  }
  throw new Error(`no free port in ${low}-${high}`);
}

/** Deterministic bytes: the same `size` and `seed` always give the same content. */
export function pattern(size: number, seed = 7): Buffer {
  const out = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  return out;
}

export interface SeenRequest {
  method: string;
  url: string;
  host: string | undefined;
  body: number;
  sha256?: string;
}

/**
 * An HTTP server on 127.0.0.1 that records every request. `GET /big?n=<bytes>`
 * streams n deterministic bytes (with backpressure); `POST` bodies are hashed.
 */
export async function hostHttpServer(options: { range?: [number, number]; tag?: string } = {}): Promise<{ port: number; seen: SeenRequest[]; server: http.Server }> {
  const seen: SeenRequest[] = [];
  const server = http.createServer((req, res) => {
    arrivals.http++;
    arrivals.log.push(`http ${options.tag ?? ""} ${req.method} ${req.url}`);
    const hash = createHash("sha256");
    let body = 0;
    req.on("data", (chunk: Buffer) => {
      body += chunk.length;
      hash.update(chunk);
    });
    req.on("end", () => {
      const record: SeenRequest = { method: req.method!, url: req.url!, host: req.headers.host, body, ...(body ? { sha256: hash.digest("hex") } : {}) };
      seen.push(record);
      const url = new URL(req.url!, "http://x");
      if (url.pathname === "/big") {
        const total = Number(url.searchParams.get("n"));
        const data = pattern(total);
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(total) });
        let offset = 0;
        const pump = () => {
          while (offset < total) {
            const chunk = data.subarray(offset, Math.min(total, offset + 64 * 1024));
            offset += chunk.length;
            if (!res.write(chunk)) return void res.once("drain", pump);
          }
          res.end();
        };
        pump();
        return;
      }
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify({ from: `host ${options.tag ?? "http"}`, ...record }));
    });
  });
  const port = options.range ? await listenInRange(server, ...options.range) : await listenOn(server);
  return { port, seen, server };
}

/** An HTTPS server on 127.0.0.1 with the given certificate. */
export async function hostHttpsServer(cert: TestCertificates): Promise<{ port: number; seen: SeenRequest[]; handshakes: { servername: string | false }[] }> {
  const seen: SeenRequest[] = [];
  const handshakes: { servername: string | false }[] = [];
  const server = https.createServer({ key: cert.serverKey, cert: cert.serverCert }, (req, res) => {
    arrivals.https++;
    seen.push({ method: req.method!, url: req.url!, host: req.headers.host, body: 0 });
    res.end(`secure hello ${req.url}`);
  });
  server.on("connection", () => arrivals.tlsHandshakes++);
  server.on("secureConnection", (socket) => handshakes.push({ servername: (socket as unknown as { servername: string | false }).servername }));
  server.on("tlsClientError", () => {});
  const port = await listenOn(server);
  return { port, seen, handshakes };
}

/**
 * A raw TCP server on 127.0.0.1. The client's first line picks the behaviour:
 * `end` → write "bye\n" and end; `reset` → write "boom\n" then reset the connection.
 */
export async function hostTcpServer(): Promise<{ port: number; connections: () => number }> {
  let connections = 0;
  const server = net.createServer((socket) => {
    connections++;
    arrivals.tcp++;
    socket.on("error", () => {});
    let buffered = "";
    socket.on("data", (chunk) => {
      buffered += chunk.toString();
      if (!buffered.includes("\n")) return;
      const command = buffered.split("\n")[0]!.trim();
      if (command === "end") socket.end("bye\n");
      else if (command === "reset") socket.write("boom\n", () => setTimeout(() => socket.resetAndDestroy(), 50));
      else socket.end(`unknown ${command}\n`);
    });
  });
  const port = await listenOn(server);
  return { port, connections: () => connections };
}

/** A UDP socket on 127.0.0.1 that counts datagrams. */
export async function hostUdpServer(): Promise<number> {
  const socket = dgram.createSocket("udp4");
  socket.on("message", (message, from) => {
    arrivals.udp++;
    arrivals.log.push(`udp ${message.length} bytes from ${from.address}:${from.port}`);
  });
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", () => resolve()));
  closers.push(() => new Promise<void>((resolve) => socket.close(() => resolve())));
  return socket.address().port;
}

export interface TestCertificates {
  caCert: string;
  serverKey: string;
  serverCert: string;
}

/** A throwaway CA and a server certificate for host.agentvm.internal, made with the openssl CLI. */
export function makeCertificates(name = "host.agentvm.internal"): TestCertificates {
  const dir = mkdtempSync(join(tmpdir(), "agentvm-policy-ca-"));
  try {
    const run = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run("req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=agentvm policy test CA",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
    run("req", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", `/CN=${name}`);
    writeFileSync(join(dir, "ext.cnf"), `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:${name}\n`);
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf");
    const read = (file: string) => readFileSync(join(dir, file), "utf8");
    return { caCert: read("ca.pem"), serverKey: read("server.key"), serverCert: read("server.pem") };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A guest program that makes each attempt in argv[2] (JSON) in turn and prints
 * `RESULT [outcome…]`. An outcome is `{ ok: true, … }` when the attempt got
 * through (a status, a body, an address) or `{ ok: false, code, message }`.
 *
 * Attempt kinds: net, tls, http, https, fetch, http2, dns, udp.
 */
export const ATTEMPTS_GUEST = String.raw`
const net = require("node:net");
const tls = require("node:tls");
const http = require("node:http");
const https = require("node:https");
const http2 = require("node:http2");
const dns = require("node:dns");
const dgram = require("node:dgram");
const fs = require("node:fs");
const crypto = require("node:crypto");

const attempts = JSON.parse(process.argv[2]);
const ATTEMPT_MS = 6000;

function fail(error) {
  // fetch and http2 wrap the socket's error: report the cause when it has a code.
  const e = error && error.cause && error.cause.code ? error.cause : error;
  return { ok: false, code: (e && (e.code || e.name)) || "Error", message: String((e && e.message) || e).split("\n")[0], syscall: e && e.syscall };
}

function readAll(stream) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    stream.on("data", (c) => chunks.push(Buffer.from(c)));
    stream.on("end", () => resolve(Buffer.concat(chunks)));
    stream.on("error", reject);
  });
}

function caOf(a) {
  return a.ca ? [fs.readFileSync(a.ca, "utf8")] : undefined;
}

const kinds = {
  net: (a) => new Promise((resolve, reject) => {
    const socket = net.connect({ host: a.host, port: a.port, family: a.family });
    socket.on("error", reject);
    socket.on("connect", () => {
      socket.end(a.send ?? "GET / HTTP/1.0\r\nHost: probe\r\n\r\n");
      readAll(socket).then((data) => resolve({ ok: true, connected: true, remoteAddress: socket.remoteAddress, body: data.toString().slice(0, 200) }), reject);
    });
  }),
  tls: (a) => new Promise((resolve, reject) => {
    const socket = tls.connect({ host: a.host, port: a.port, servername: a.servername, ca: caOf(a) });
    socket.on("error", reject);
    socket.on("secureConnect", () => {
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      socket.end("GET / HTTP/1.0\r\nHost: probe\r\n\r\n");
      readAll(socket).then((data) => resolve({ ok: true, connected: true, fingerprint, authorized: socket.authorized, body: data.toString().slice(0, 200) }), reject);
    });
  }),
  http: (a) => new Promise((resolve, reject) => {
    const req = http.get(a.url, (res) => readAll(res).then((body) => resolve({ ok: true, status: res.statusCode, body: body.toString().slice(0, 400) }), reject));
    req.on("error", reject);
  }),
  https: (a) => new Promise((resolve, reject) => {
    const req = https.get(a.url, { ca: caOf(a) }, (res) => {
      const fingerprint = res.socket.getPeerCertificate().fingerprint256;
      readAll(res).then((body) => resolve({ ok: true, status: res.statusCode, fingerprint, body: body.toString().slice(0, 400) }), reject);
    });
    req.on("error", reject);
  }),
  fetch: async (a) => {
    const init = a.body ? { method: "POST", body: Buffer.from(a.body) } : undefined;
    const res = await fetch(a.url, init);
    const body = Buffer.from(await res.arrayBuffer());
    return { ok: true, status: res.status, length: body.length, sha256: crypto.createHash("sha256").update(body).digest("hex"), body: a.hash ? undefined : body.toString().slice(0, 400) };
  },
  http2: (a) => new Promise((resolve, reject) => {
    const session = http2.connect(a.url, { ca: caOf(a) });
    session.on("error", reject);
    const req = session.request({ ":path": "/" });
    req.on("error", reject);
    req.on("response", (headers) => readAll(req).then((body) => { session.close(); resolve({ ok: true, status: headers[":status"], body: body.toString().slice(0, 200) }); }, reject));
    req.end();
  }),
  dns: async (a) => {
    const result = await dns.promises.lookup(a.host, { all: true });
    return { ok: true, addresses: result.map((r) => r.address) };
  },
  udp: (a) => new Promise((resolve, reject) => {
    const socket = dgram.createSocket(a.type ?? "udp4");
    socket.on("error", (e) => { socket.close(); reject(e); });
    socket.send(Buffer.from("probe datagram"), a.port, a.host, (error) => {
      socket.close();
      if (error) reject(error); else resolve({ ok: true, sent: true });
    });
  }),
};

(async () => {
  const out = [];
  for (const a of attempts) {
    let timer;
    const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(Object.assign(new Error("no answer within " + ATTEMPT_MS + " ms"), { code: "ATTEMPT_TIMEOUT" })), ATTEMPT_MS); });
    try {
      out.push({ kind: a.kind, label: a.label, ...(await Promise.race([kinds[a.kind](a), timeout])) });
    } catch (error) {
      out.push({ kind: a.kind, label: a.label, ...fail(error) });
    } finally {
      clearTimeout(timer);
    }
  }
  console.log("RESULT " + JSON.stringify(out));
  process.exit(0);
})();
`;

export interface Attempt {
  kind: "net" | "tls" | "http" | "https" | "fetch" | "http2" | "dns" | "udp";
  label?: string;
  host?: string;
  port?: number;
  url?: string;
  ca?: string;
  servername?: string;
  send?: string;
  family?: number;
  type?: "udp4" | "udp6";
  body?: string;
  hash?: boolean;
}

export interface Outcome {
  kind: string;
  label?: string;
  ok: boolean;
  code?: string;
  message?: string;
  syscall?: string;
  status?: number;
  body?: string;
  fingerprint?: string;
  [key: string]: unknown;
}

/** Runs the attempts in one guest and returns one outcome per attempt. */
export async function attempt(vm: Vm, attempts: Attempt[], env?: Record<string, string>): Promise<Outcome[]> {
  const script = await writeScript(vm, ATTEMPTS_GUEST);
  const { pid } = await vm.spawn("node", [script, JSON.stringify(attempts)], env ? { env } : {});
  const output = collectOutput(vm, pid);
  const exitCode = await vm.waitProcess(pid);
  output.stop();
  const line = output.stdout.split("\n").find((l) => l.startsWith("RESULT "));
  if (!line) throw new Error(`attempts guest exited with ${exitCode} without a RESULT line\nstdout: ${output.stdout}\nstderr: ${output.stderr}`);
  const outcomes = JSON.parse(line.slice("RESULT ".length)) as Outcome[];
  if (outcomes.length !== attempts.length) throw new Error(`expected ${attempts.length} outcomes, got ${outcomes.length}`);
  return outcomes;
}

/** Runs one attempt. */
export async function attemptOne(vm: Vm, one: Attempt, env?: Record<string, string>): Promise<Outcome> {
  return (await attempt(vm, [one], env))[0]!;
}
