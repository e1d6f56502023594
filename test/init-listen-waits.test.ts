/**
 * init's wait for a listener (src/init/listen-waits.ts), on the host's own
 * loopback: a connection to a port that a program still
 * starting will open is answered once it listens, in one request, and refused
 * (ECONNREFUSED) when no such program is left.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:net";
import { ListenWaits } from "../src/init/listen-waits.ts";
import { rejection } from "./helpers.ts";

/** A port nothing listens on (one the kernel just handed out and took back). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function listen(port: number, host = "127.0.0.1"): Promise<Server> {
  // Clients here hang up without reading: their resets are expected.
  const server = createServer((socket) => socket.on("error", () => {}).end("hello"));
  return new Promise((resolve) => server.listen(port, host, () => resolve(server)));
}

describe("init waits for a just-started program to listen", () => {
  test("a connection waits for a listener that comes later, and is its first connection", async () => {
    const port = await freePort();
    let connections = 0;
    let server: Server | undefined;
    const waits = new ListenWaits(() => true);
    const connecting = waits.connect(port, [{ pid: 1, ms: 30_000 }]);
    setTimeout(() => {
      void listen(port).then((started) => {
        server = started;
        started.on("connection", () => connections++);
      });
    }, 300);
    const socket = await connecting;
    try {
      const text = await new Promise<string>((resolve) => {
        let data = "";
        socket.on("data", (chunk) => (data += chunk));
        socket.on("end", () => resolve(data));
        socket.resume(); // init hands its sockets over paused
      });
      assert.equal(text, "hello");
      assert.equal(connections, 1);
    } finally {
      socket.destroy();
      server?.close();
    }
  });

  test("a listener on ::1 only is found too", async (t) => {
    const port = await freePort();
    const probe = await listen(port, "::1").catch(() => undefined);
    if (!probe) return t.skip("no IPv6 loopback on this host");
    await new Promise((resolve) => probe.close(resolve));
    let server: Server | undefined;
    const connecting = new ListenWaits(() => true).connect(port, [{ pid: 1, ms: 30_000 }]);
    setTimeout(() => void listen(port, "::1").then((started) => (server = started)), 100);
    const socket = await connecting;
    assert.equal(socket.remoteAddress, "::1");
    socket.destroy();
    server?.close();
  });

  test("nothing to wait for: ECONNREFUSED at once", async () => {
    const port = await freePort();
    const error = await rejection(new ListenWaits(() => true).connect(port, []));
    assert.equal(error.code, "ECONNREFUSED");
  });

  test("a program that no longer runs is not waited for", async () => {
    const port = await freePort();
    const error = await rejection(new ListenWaits(() => false).connect(port, [{ pid: 1, ms: 30_000 }]));
    assert.equal(error.code, "ECONNREFUSED");
  });

  test("a program that exits while a connection waits ends the wait with ECONNREFUSED, long before its grace", async () => {
    const port = await freePort();
    let running = true;
    const waiting = new ListenWaits(() => running).connect(port, [{ pid: 7, ms: 60_000 }]);
    setTimeout(() => (running = false), 100);
    const error = await rejection(waiting);
    assert.equal(error.code, "ECONNREFUSED");
  });

  test("a grace that ends with nothing listening: ECONNREFUSED; each program has its own", async () => {
    const port = await freePort();
    const running = new Set([1, 2]);
    const waits = new ListenWaits((pid) => running.has(pid));
    const error = await rejection(waits.connect(port, [{ pid: 1, ms: 200 }]));
    assert.equal(error.code, "ECONNREFUSED");
    // Program 2's longer grace keeps the wait going after program 1's has ended.
    const later = waits.connect(port, [{ pid: 1, ms: 50 }, { pid: 2, ms: 30_000 }]);
    let server: Server | undefined;
    setTimeout(() => void listen(port).then((started) => (server = started)), 300);
    const socket = await later;
    socket.destroy();
    server?.close();
  });

  test("many waiting connections share one probe per port and each gets its own socket", async () => {
    const ports = await Promise.all([freePort(), freePort(), freePort()]);
    const waits = new ListenWaits(() => true);
    const connecting = ports.flatMap((port) => [1, 2, 3].map(() => waits.connect(port, [{ pid: 1, ms: 30_000 }])));
    const servers: Server[] = [];
    setTimeout(() => void Promise.all(ports.map((port) => listen(port))).then((started) => servers.push(...started)), 200);
    const sockets = await Promise.all(connecting);
    assert.deepEqual(
      sockets.map((socket) => socket.remotePort),
      ports.flatMap((port) => [port, port, port]),
    );
    for (const socket of sockets) socket.destroy();
    for (const server of servers) server.close();
  });
});
