/**
 * Unmodified Node programs on the VM's network, end to end: real guests in the
 * real sandbox, reached from the host with vmFetch and from each other over the
 * VM's loopback.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import type { Vm } from "agentvm";
import { tempDataDir, testVm, text, waitForPort } from "./helpers.ts";
import { guestResult, installPackage, startGuest } from "./vm-network-support.ts";

const vm: Vm = await testVm(await tempDataDir("agentvm-net-"), { name: "net-programs" });

describe("unmodified servers reached by vmFetch", () => {
  test("http.createServer().listen(3000) answers vmFetch", async () => {
    const server = await startGuest(
      vm,
      `require("http").createServer((req, res) => {
        res.setHeader("content-type", "text/plain");
        res.end("hello from " + req.method + " " + req.url);
      }).listen(3000, () => console.log("listening"));`,
      /listening/,
    );
    const response = await vm.vmFetch(3000, "/greet?who=host");
    assert.equal(response.status, 200);
    assert.equal(response.headers["content-type"], "text/plain");
    assert.equal(text(response.body), "hello from GET /greet?who=host");
    assert.deepEqual((await vm.listeningPorts()).includes(3000), true);
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
  });

  test("listen(0): the port address() reports inside the listen callback is real and reachable", async () => {
    const server = await startGuest(
      vm,
      `const server = require("http").createServer((req, res) => res.end("auto " + server.address().port));
      server.listen(0, () => {
        const a = server.address();
        console.log("PORT " + a.port + " " + typeof a.port + " " + server.listening);
      });`,
      /PORT (\d+) number true/,
    );
    const port = Number(server.ready);
    assert.ok(port >= 1024 && port <= 65535, `auto port ${port} is outside 1024-65535`);
    const ports = await vm.listeningPorts();
    assert.ok(ports.includes(port), `listeningPorts() does not list ${port}: ${ports}`);
    const response = await vm.vmFetch(port, "/");
    assert.equal(text(response.body), `auto ${port}`);
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
    assert.ok(!(await vm.listeningPorts()).includes(port), "the port stays bound after its process died");
  });

  test("listen(0): address() right after listen(), before 'listening', already reports the bound port (as supertest reads it)", async () => {
    const server = await startGuest(
      vm,
      `const http = require("http");
      const servers = Array.from({ length: 5 }, (_, i) => http.createServer((req, res) => res.end("sync " + i)));
      const ports = servers.map((server) => server.listen(0).address().port);
      let ready = 0;
      for (const server of servers) server.on("listening", () => {
        if (++ready === servers.length) console.log("PORTS " + ports.join(",") + " " + servers.every((s, i) => s.address().port === ports[i]));
      });`,
      /PORTS ([\d,]+) true/,
    );
    const ports = String(server.ready).split(",").map(Number);
    assert.equal(new Set(ports).size, 5, `five distinct ports: ${ports}`);
    for (const [index, port] of ports.entries()) {
      assert.ok(port >= 1024, `auto port ${port} is below 1024`);
      assert.equal(text((await vm.vmFetch(port, "/")).body), `sync ${index}`);
    }
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
  });

  test("express serves routes, params, JSON bodies and 404s", async () => {
    const installed = await installPackage(vm, "express");
    assert.ok(installed.length > 10, `express should bring its dependencies, got ${installed}`);
    const server = await startGuest(
      vm,
      `const express = require("express");
      const app = express();
      app.use(express.json());
      app.get("/", (req, res) => res.send("express root"));
      app.get("/users/:id", (req, res) => res.json({ id: req.params.id, q: req.query }));
      app.post("/api/data", (req, res) => res.status(201).json({ received: req.body, type: req.get("content-type") }));
      app.listen(3100, () => console.log("express up"));`,
      /express up/,
    );
    const root = await vm.vmFetch(3100, "/");
    assert.equal(root.status, 200);
    assert.equal(text(root.body), "express root");
    assert.equal(root.headers["x-powered-by"], "Express");

    const user = await vm.vmFetch(3100, "/users/42?tab=files");
    assert.match(user.headers["content-type"] ?? "", /application\/json/);
    assert.deepEqual(JSON.parse(text(user.body)), { id: "42", q: { tab: "files" } });

    const posted = await vm.vmFetch(3100, "/api/data", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: "value", list: [1, 2, 3] }),
    });
    assert.equal(posted.status, 201);
    assert.deepEqual(JSON.parse(text(posted.body)), { received: { key: "value", list: [1, 2, 3] }, type: "application/json" });

    const missing = await vm.vmFetch(3100, "/nope");
    assert.equal(missing.status, 404);
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
  });
});

describe("guests on the VM's loopback", () => {
  test("a guest reaches its own server with http.get, fetch and net.connect", async () => {
    const result = await guestResult(
      vm,
      `const http = require("http");
      const net = require("net");
      const server = http.createServer((req, res) => res.end("self " + req.url));
      const raw = net.createServer((socket) => socket.once("data", (c) => socket.end("PONG " + c + " " + socket.localPort)));
      raw.listen(3001);
      server.listen(3000, async () => {
        const viaGet = await new Promise((resolve, reject) => {
          http.get("http://localhost:3000/get", (res) => {
            let body = "";
            res.setEncoding("utf8");
            res.on("data", (c) => (body += c));
            res.on("end", () => resolve(res.statusCode + " " + body));
          }).on("error", reject);
        });
        const viaFetch = await (await fetch("http://localhost:3000/fetch")).text();
        const viaFetchIp = await (await fetch("http://127.0.0.1:3000/ip")).text();
        const viaNet = await new Promise((resolve, reject) => {
          const socket = net.connect(3001, "127.0.0.1", () => socket.write("PING"));
          let got = "";
          socket.on("data", (c) => (got += c));
          socket.on("end", () => resolve(got));
          socket.on("error", reject);
        });
        console.log("RESULT " + JSON.stringify({ viaGet, viaFetch, viaFetchIp, viaNet }));
        server.close();
        raw.close();
      });`,
    );
    assert.deepEqual(result, { viaGet: "200 self /get", viaFetch: "self /fetch", viaFetchIp: "self /ip", viaNet: "PONG PING 3001" });
  });

  test("a keep-alive http.Agent in a guest reuses one connection; a 10 MiB fetch body arrives intact", async () => {
    const result = await guestResult(
      vm,
      `const http = require("http"), crypto = require("crypto");
      let connections = 0;
      const server = http.createServer((req, res) => {
        const hash = crypto.createHash("sha256");
        let length = 0;
        req.on("data", (c) => { hash.update(c); length += c.length; });
        req.on("end", () => res.end(JSON.stringify({ length, sha256: hash.digest("hex") })));
      });
      server.on("connection", () => connections++);
      server.listen(3300, async () => {
        const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
        for (let i = 0; i < 20; i++) {
          await new Promise((resolve, reject) => http.get({ port: 3300, agent }, (res) => res.resume().on("end", resolve)).on("error", reject));
        }
        agent.destroy();
        const viaAgent = connections;
        const body = crypto.randomBytes(10 * 1024 * 1024);
        const answer = await (await fetch("http://localhost:3300/upload", { method: "POST", body })).json();
        server.close();
        console.log("RESULT " + JSON.stringify({ viaAgent, intact: answer.length === body.length && answer.sha256 === crypto.createHash("sha256").update(body).digest("hex") }));
      });`,
    );
    assert.deepEqual(result, { viaAgent: 1, intact: true });
  });

  test("a client aborting mid-request: the guest server's request reports aborted", async () => {
    const result = await guestResult(
      vm,
      `const http = require("http");
      const server = http.createServer((req) => {
        req.on("data", () => {});
        req.on("close", () => {
          server.close();
          console.log("RESULT " + JSON.stringify({ complete: req.complete, destroyed: req.destroyed }));
        });
      });
      server.listen(3310, () => {
        const request = http.request({ port: 3310, method: "POST" });
        request.on("error", () => {});
        request.write("partial body", () => setTimeout(() => request.destroy(), 20));
      });`,
    );
    assert.deepEqual(result, { complete: false, destroyed: true });
  });

  test("one guest process calls another guest process's server", async () => {
    const server = await startGuest(
      vm,
      `require("http").createServer((req, res) => {
        let body = "";
        req.on("data", (c) => (body += c));
        req.on("end", () => res.end(JSON.stringify({ from: "server pid " + process.pid, got: body, url: req.url })));
      }).listen(3200, "127.0.0.1", () => console.log("ready"));`,
      /ready/,
    );
    const result = await guestResult(
      vm,
      `(async () => {
        const res = await fetch("http://localhost:3200/cross", { method: "POST", body: "from the client" });
        console.log("RESULT " + JSON.stringify({ status: res.status, body: await res.json(), me: process.pid }));
      })();`,
    );
    assert.equal(result.status, 200);
    assert.deepEqual(result.body, { from: `server pid ${server.pid}`, got: "from the client", url: "/cross" });
    assert.notEqual(result.me, server.pid);
    // The host sees the same server.
    const response = await waitForPort(vm, 3200, "/host");
    assert.equal(JSON.parse(text(response.body)).url, "/host");
    await vm.killProcess(server.pid, "SIGKILL");
    await vm.waitProcess(server.pid);
  });
});
