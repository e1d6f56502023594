/**
 * Socket table semantics seen from real guests (DESIGN §3 "Socket table",
 * "Listen policy"): per-VM port spaces, POSIX error codes, loopback-only binds,
 * half-close, backpressure, close() freeing the port, the listen range.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createVm, type Vm } from "agentvm";
import { rejection, tempDataDir, testVm, text } from "./helpers.ts";
import { guestResult, startGuest } from "./vm-network-support.ts";

const dataDir = await tempDataDir("agentvm-net-sockets-");
const vm: Vm = await testVm(dataDir, { name: "sockets" });

/** A guest snippet: `tryListen(port, host)` resolves to "ok <port>" or the error code. */
const TRY_LISTEN = `
const net = require("net");
function tryListen(port, host) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", (error) => resolve({ error: error.code, syscall: error.syscall, message: error.message }));
    server.listen(port, host, () => resolve({ port: server.address().port, server }));
  });
}
`;

describe("per-VM port spaces", () => {
  test("two VMs both listen on 3000 and each vmFetch reaches its own VM", async () => {
    const other = await testVm(dataDir, { name: "sockets-other" });
    const serve = (label: string) =>
      `require("http").createServer((req, res) => res.end("${label}")).listen(3000, () => console.log("up"));`;
    const [a, b] = await Promise.all([startGuest(vm, serve("first VM"), /up/), startGuest(other, serve("second VM"), /up/)]);
    assert.equal(text((await vm.vmFetch(3000, "/")).body), "first VM");
    assert.equal(text((await other.vmFetch(3000, "/")).body), "second VM");
    // A guest's own loopback is its VM's too.
    const fromGuest = await guestResult(other, `fetch("http://localhost:3000/").then(r => r.text()).then(t => console.log("RESULT " + JSON.stringify(t)));`);
    assert.equal(fromGuest, "second VM");
    await Promise.all([vm.killProcess(a.pid, "SIGKILL"), other.killProcess(b.pid, "SIGKILL")]);
    await Promise.all([vm.waitProcess(a.pid), other.waitProcess(b.pid)]);
  });
});

describe("errors guests get from the socket table", () => {
  test("a second listen on a bound port fails with EADDRINUSE, in the same and in another process", async () => {
    const holder = await startGuest(vm, `require("net").createServer().listen(3300, () => console.log("held"));`, /held/);
    const result = await guestResult(
      vm,
      `${TRY_LISTEN}
      (async () => {
        const first = await tryListen(3301);
        const second = await tryListen(3301);
        const elsewhere = await tryListen(3300);
        first.server.close();
        console.log("RESULT " + JSON.stringify({ first: first.port, second, elsewhere }));
      })();`,
    );
    assert.equal(result.first, 3301);
    assert.equal(result.second.error, "EADDRINUSE");
    assert.equal(result.second.syscall, "listen");
    assert.equal(result.elsewhere.error, "EADDRINUSE");
    await vm.killProcess(holder.pid, "SIGKILL");
    await vm.waitProcess(holder.pid);
  });

  test("connecting to a port nobody listens on fails with ECONNREFUSED (net, http and fetch)", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net"), http = require("http");
      (async () => {
        const viaNet = await new Promise((resolve) => {
          const socket = net.connect(3399, "127.0.0.1", () => resolve("connected?!"));
          socket.on("error", (e) => resolve({ code: e.code, syscall: e.syscall, port: e.port }));
        });
        const viaHttp = await new Promise((resolve) => {
          http.get("http://localhost:3399/", () => resolve("response?!")).on("error", (e) => resolve(e.code));
        });
        const viaFetch = await fetch("http://127.0.0.1:3399/").then(() => "response?!", (e) => e.cause && e.cause.code);
        console.log("RESULT " + JSON.stringify({ viaNet, viaHttp, viaFetch }));
      })();`,
    );
    assert.deepEqual(result, { viaNet: { code: "ECONNREFUSED", syscall: "connect", port: 3399 }, viaHttp: "ECONNREFUSED", viaFetch: "ECONNREFUSED" });
  });

  test("binding an address that is not the VM's loopback fails with EADDRNOTAVAIL", async () => {
    const result = await guestResult(
      vm,
      `${TRY_LISTEN}
      Promise.all([tryListen(3400, "10.0.0.1"), tryListen(3401, "192.168.1.1")]).then((r) => console.log("RESULT " + JSON.stringify(r)));`,
    );
    assert.equal(result[0].error, "EADDRNOTAVAIL");
    assert.equal(result[1].error, "EADDRNOTAVAIL");
    const ports = await vm.listeningPorts();
    assert.ok(!ports.includes(3400) && !ports.includes(3401));
  });

  test("127.0.0.1, ::1, localhost, 0.0.0.0 and :: all bind the loopback and are reachable", async () => {
    const result = await guestResult(
      vm,
      `${TRY_LISTEN}
      (async () => {
        const out = {};
        let port = 3410;
        for (const host of ["127.0.0.1", "::1", "localhost", "0.0.0.0", "::"]) {
          const bound = await tryListen(port, host);
          if (bound.error) { out[host] = bound; continue; }
          bound.server.on("connection", (s) => s.end("hi from " + host));
          const reply = await new Promise((resolve, reject) => {
            const socket = net.connect(port, "localhost");
            let got = "";
            socket.on("data", (c) => (got += c)).on("end", () => resolve(got)).on("error", reject);
          });
          out[host] = { port: bound.port, family: bound.server.address().family, reply };
          await new Promise((resolve) => bound.server.close(resolve));
          port++;
        }
        console.log("RESULT " + JSON.stringify(out));
      })();`,
    );
    const hosts = ["127.0.0.1", "::1", "localhost", "0.0.0.0", "::"];
    hosts.forEach((host, i) => {
      assert.equal(result[host].port, 3410 + i, `${host}: ${JSON.stringify(result[host])}`);
      assert.equal(result[host].reply, `hi from ${host}`);
    });
    assert.equal(result["::1"].family, "IPv6");
    assert.equal(result["127.0.0.1"].family, "IPv4");
  });
});

describe("TCP behaviour", () => {
  test("socket addresses: both ends agree on ports; ::1 reports IPv6", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const server = net.createServer((s) => s.end(JSON.stringify({ local: [s.localAddress, s.localPort], remotePort: s.remotePort })));
      const dial = (host) => new Promise((resolve, reject) => {
        const c = net.connect(3450, host, () => {
          const mine = { local: [c.localAddress, c.localPort, c.localFamily], remote: [c.remoteAddress, c.remotePort, c.remoteFamily] };
          let d = "";
          c.on("data", (x) => (d += x)).on("end", () => resolve({ ...mine, server: JSON.parse(d) }));
        }).on("error", reject);
      });
      server.listen(3450, "::", async () => {
        const v4 = await dial("127.0.0.1");
        const v6 = await dial("::1");
        server.close();
        console.log("RESULT " + JSON.stringify({ v4, v6 }));
      });`,
    );
    for (const [name, family, address] of [["v4", "IPv4", "127.0.0.1"], ["v6", "IPv6", "::1"]] as const) {
      const side = result[name];
      assert.deepEqual(side.remote, [address, 3450, family], name);
      assert.equal(side.local[0], address, name);
      assert.equal(side.local[2], family, name);
      assert.equal(side.server.local[1], 3450, name);
      assert.equal(side.server.remotePort, side.local[1], `${name}: the server sees the client's port`);
    }
  });

  test("server.close() waits for open connections; getConnections counts them", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const events = [];
      const server = net.createServer((s) => {
        server.getConnections((e, n) => events.push("connections " + n));
        server.close(() => {
          events.push("server closed");
          console.log("RESULT " + JSON.stringify(events));
        });
        events.push("listening after close() " + server.listening);
        setTimeout(() => s.end("bye"), 30);
      });
      server.listen(3460, () => {
        const c = net.connect(3460);
        c.resume();
        c.on("close", () => events.push("client closed"));
      });`,
    );
    assert.deepEqual(result, ["listening after close() false", "connections 1", "client closed", "server closed"]);
  });

  test("socket.setTimeout fires on an idle connection", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const server = net.createServer(() => {});
      server.listen(3470, () => {
        const c = net.connect(3470);
        c.setTimeout(100, () => {
          c.destroy();
          server.close();
          console.log("RESULT " + JSON.stringify("timeout"));
        });
      });`,
    );
    assert.equal(result, "timeout");
  });

  test("half-close: a client that ended its side still receives the server's reply", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const server = net.createServer({ allowHalfOpen: true }, (socket) => {
        let got = "";
        socket.on("data", (c) => (got += c));
        socket.on("end", () => {
          // The client's FIN arrived; the reply still has a way back.
          setTimeout(() => socket.end("echo:" + got.toUpperCase()), 20);
        });
      });
      server.listen(3500, () => {
        const client = net.connect({ port: 3500, allowHalfOpen: true }, () => client.end("half closed"));
        let reply = "";
        let finishedFirst = false;
        client.on("finish", () => (finishedFirst = reply === ""));
        client.on("data", (c) => (reply += c));
        client.on("end", () => {
          console.log("RESULT " + JSON.stringify({ reply, finishedFirst }));
          server.close();
        });
        client.on("error", (e) => console.log("RESULT " + JSON.stringify({ error: e.code })));
      });`,
    );
    assert.deepEqual(result, { reply: "echo:HALF CLOSED", finishedFirst: true });
  });

  test("half-close from the host: vmFetch's request body ends before the guest answers", async () => {
    // The guest only answers once it has read the whole request (its 'end').
    const server = await startGuest(
      vm,
      `require("http").createServer((req, res) => {
        let n = 0;
        req.on("data", (c) => (n += c.length));
        req.on("end", () => res.end("read " + n));
      }).listen(3501, () => console.log("up"));`,
      /up/,
    );
    const response = await vm.vmFetch(3501, "/", { method: "PUT", body: new Uint8Array(300_000) });
    assert.equal(text(response.body), "read 300000");
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
  });

  test("a client that destroys its socket: the server sees a clean end, like a FIN (no ECONNRESET)", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      // No 'error' listener on purpose: on a real host this server does not crash.
      const server = net.createServer((socket) => {
        socket.on("data", () => {});
        socket.on("end", () => (ended = true));
        socket.on("close", (hadError) => {
          server.close();
          console.log("RESULT " + JSON.stringify({ ended, hadError }));
        });
      });
      let ended = false;
      server.listen(3520, () => {
        const client = net.connect(3520, () => client.write("hello", () => setTimeout(() => client.destroy(), 20)));
      });`,
    );
    assert.deepEqual(result, { ended: true, hadError: false });
  });

  test("a peer that went away: writes fail with ECONNRESET/EPIPE instead of hanging", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const results = {};
      const done = () => {
        if (Object.keys(results).length < 2) return;
        console.log("RESULT " + JSON.stringify(results));
        server.close();
      };
      let connections = 0;
      const server = net.createServer((socket) => {
        if (++connections === 2) return socket.destroy(); // the second client is closed on at once
        // The first one is streamed to until it disappears; the server must learn about it.
        socket.on("error", (e) => { results.streamer = e.code; done(); });
        const pump = () => { while (socket.write(Buffer.alloc(64 * 1024))); socket.once("drain", pump); };
        pump();
      });
      server.listen(3530, () => {
        const reader = net.connect(3530);
        let got = 0;
        reader.on("data", (c) => {
          got += c.length;
          if (got > 1024 * 1024) reader.destroy(); // leaves unread bytes behind, as a crashing client would
        });
        reader.on("close", () => {
          const writer = net.connect({ port: 3530, allowHalfOpen: true });
          writer.on("error", (e) => { results.writer = e.code; done(); });
          // Keeps writing after the server closed: the kernel answers with a reset.
          writer.on("end", () => { writer.write("one"); setTimeout(() => writer.write("two"), 20); setTimeout(() => writer.write("three"), 40); });
        });
      });`,
    );
    assert.ok(["ECONNRESET", "EPIPE"].includes(result.streamer), `streamer: ${result.streamer}`);
    assert.ok(["ECONNRESET", "EPIPE"].includes(result.writer), `writer: ${result.writer}`);
  });

  test("backpressure: a server writing 50 MiB to a slow reader is held back and finishes", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const TOTAL = 50 * 1024 * 1024, CHUNK = 64 * 1024;
      let writtenAtFirstFull = -1, maxWritable = 0;
      const server = net.createServer((socket) => {
        let written = 0;
        const pump = () => {
          while (written < TOTAL) {
            const ok = socket.write(Buffer.alloc(CHUNK, written & 0xff));
            written += CHUNK;
            maxWritable = Math.max(maxWritable, socket.writableLength);
            if (!ok) {
              if (writtenAtFirstFull < 0) writtenAtFirstFull = written;
              socket.once("drain", pump);
              return;
            }
          }
          socket.end();
        };
        pump();
      });
      server.listen(3600, () => {
        const client = net.connect(3600);
        let received = 0, pauses = 0;
        client.on("data", (chunk) => {
          received += chunk.length;
          // Read slowly: stop every 4 MiB for a moment.
          if (Math.floor(received / (4 << 20)) > pauses) {
            pauses++;
            client.pause();
            setTimeout(() => client.resume(), 30);
          }
        });
        client.on("end", () => {
          console.log("RESULT " + JSON.stringify({ received, writtenAtFirstFull, maxWritable }));
          server.close();
        });
      });`,
    );
    assert.equal(result.received, 50 * 1024 * 1024);
    assert.ok(result.writtenAtFirstFull > 0 && result.writtenAtFirstFull <= 4 * 1024 * 1024, `the writer was not held back early: ${result.writtenAtFirstFull}`);
    assert.ok(result.maxWritable <= 2 * 1024 * 1024, `the writer buffered ${result.maxWritable} bytes`);
  });

  test("server.close() frees the port: the same and another process can listen again", async () => {
    const result = await guestResult(
      vm,
      `${TRY_LISTEN}
      (async () => {
        const first = await tryListen(3700);
        await new Promise((resolve) => first.server.close(resolve));
        const again = await tryListen(3700);
        const afterClose = { listening: again.server.listening, port: again.port };
        again.server.close();
        console.log("RESULT " + JSON.stringify(afterClose));
      })();`,
    );
    assert.deepEqual(result, { listening: true, port: 3700 });
    const other = await startGuest(vm, `require("http").createServer((q, s) => s.end("third")).listen(3700, () => console.log("up"));`, /up/);
    assert.equal(text((await vm.vmFetch(3700, "/")).body), "third");
    await vm.killProcess(other.pid, "SIGKILL");
    await vm.waitProcess(other.pid);
  });
});

describe("listen variants", () => {
  test("listen(cb), listen(), listen(null, cb) and listen({ port: 0 }) pick a free port", async () => {
    const result = await guestResult(
      vm,
      `const net = require("net");
      const variants = {
        "listen(cb)": (s, cb) => s.listen(cb),
        "listen()": (s, cb) => { s.once("listening", cb); s.listen(); },
        "listen(null, cb)": (s, cb) => s.listen(null, cb),
        "listen({ port: 0 })": (s, cb) => s.listen({ port: 0 }, cb),
        "listen({ port: '3480', host: 'localhost' })": (s, cb) => s.listen({ port: "3480", host: "localhost" }, cb),
      };
      (async () => {
        const out = {};
        for (const [name, start] of Object.entries(variants)) {
          out[name] = await new Promise((resolve) => {
            const s = net.createServer((c) => c.end("ok"));
            s.on("error", (e) => resolve(e.code));
            start(s, () => {
              const port = s.address().port;
              const c = net.connect(port);
              let d = "";
              c.on("data", (x) => (d += x)).on("end", () => s.close(() => resolve({ port, reply: d })));
            });
          });
        }
        console.log("RESULT " + JSON.stringify(out));
      })();`,
    );
    for (const [name, outcome] of Object.entries(result as Record<string, { port: number; reply: string }>)) {
      assert.equal(outcome.reply, "ok", `${name}: ${JSON.stringify(outcome)}`);
      assert.ok(outcome.port >= 1024, `${name}: port ${outcome.port}`);
    }
    assert.equal(result["listen({ port: '3480', host: 'localhost' })"].port, 3480);
  });
});

describe("listen policy", () => {
  test("defaults: a privileged port fails with EACCES; 1024 and up work", async () => {
    const result = await guestResult(
      vm,
      `${TRY_LISTEN}
      Promise.all([tryListen(80), tryListen(1023), tryListen(1024)]).then((r) => {
        if (r[2].server) r[2].server.close();
        console.log("RESULT " + JSON.stringify(r.map((x) => x.error ?? x.port)));
      });`,
    );
    assert.deepEqual(result, ["EACCES", "EACCES", 1024]);
  });

  test("a listen range refuses ports outside it (EACCES) and listen(0) allocates inside it", async () => {
    // Twelve ports: Linux's bind(0) scans an even number of ports, so in an odd-sized range one is never picked.
    const ranged = await testVm(dataDir, { name: "sockets-ranged", listen: { portMin: 4000, portMax: 4011 } });
    const result = await guestResult(
      ranged,
      `${TRY_LISTEN}
      (async () => {
        const outside = await tryListen(3000);
        const above = await tryListen(4012);
        const inside = await tryListen(4005);
        const auto = [];
        for (let i = 0; i < 11; i++) auto.push(await tryListen(0));
        const exhausted = await tryListen(0);
        for (const bound of [inside, ...auto]) bound.server?.close();
        console.log("RESULT " + JSON.stringify({
          outside: outside.error, above: above.error, inside: inside.port,
          auto: auto.map((a) => a.port ?? a.error), exhausted: exhausted.error,
        }));
      })();`,
    );
    assert.equal(result.outside, "EACCES");
    assert.equal(result.above, "EACCES");
    assert.equal(result.inside, 4005);
    for (const port of result.auto) assert.ok(Number.isInteger(port) && port >= 4000 && port <= 4011, `listen(0) gave ${port}`);
    assert.equal(new Set(result.auto).size, 11);
    assert.ok(!result.auto.includes(4005));
    assert.equal(result.exhausted, "EADDRINUSE");
  });

  test("allowPrivileged lets a guest listen on port 80", async () => {
    const privileged = await testVm(dataDir, { name: "sockets-privileged", listen: { allowPrivileged: true } });
    const server = await startGuest(privileged, `require("http").createServer((q, s) => s.end("port 80")).listen(80, () => console.log("up"));`, /up/);
    assert.equal(text((await privileged.vmFetch(80, "/")).body), "port 80");
    await privileged.killProcess(server.pid, "SIGKILL");
    await privileged.waitProcess(server.pid);
  });

  test("a bad listen config fails with INVALID_ARGUMENT naming the field", async () => {
    const cases: [unknown, RegExp][] = [
      [{ portMin: 0 }, /listen\.portMin/],
      [{ portMax: 70000 }, /listen\.portMax/],
      [{ portMin: 1.5 }, /listen\.portMin/],
      [{ portMin: "4000" }, /listen\.portMin/],
      [{ portMin: 5000, portMax: 4000 }, /listen\.portMin.*listen\.portMax/],
      [{ allowPrivileged: "yes" }, /listen\.allowPrivileged/],
      [{ portRange: [1, 2] }, /portRange/],
      ["4000-5000", /listen/],
    ];
    for (const [listen, field] of cases) {
      const error = await rejection(createVm({ dataDir, name: "never-created", listen } as never));
      assert.equal(error.code, "INVALID_ARGUMENT", `${JSON.stringify(listen)}: ${error.message}`);
      assert.match(error.message, field);
    }
  });
});
