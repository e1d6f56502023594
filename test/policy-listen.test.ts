/**
 * Listen policy (DESIGN §3 "Listen policy"): which ports a guest may bind.
 * Real guests try real `server.listen` calls; the kernel answers EACCES for a
 * privileged or out-of-range port, allocates `listen(0)` inside the range and
 * answers EADDRINUSE when the range is full. Bad configs fail when the VM is
 * defined — by createVm and by agentOS() — with a message naming the field.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { agentOS, createVm } from "agentvm";
import { rejection, tempDataDir, testVm, text, waitForPort } from "./helpers.ts";
import { guestResult, startGuest } from "./vm-network-support.ts";

/** Guest program: tries to listen on each port given in argv; prints what happened to each. */
const TRY_LISTEN = String.raw`
const net = require("node:net");
const ports = process.argv.slice(2).map(Number);
const servers = [];
(async () => {
  const out = [];
  for (const port of ports) {
    out.push(await new Promise((resolve) => {
      const server = net.createServer((s) => s.end("hi"));
      server.once("error", (e) => resolve({ asked: port, code: e.code, syscall: e.syscall, message: e.message }));
      server.listen(port, "127.0.0.1", () => { servers.push(server); resolve({ asked: port, port: server.address().port }); });
    }));
  }
  for (const s of servers) s.close();
  console.log("RESULT " + JSON.stringify(out));
})();
`;

describe("listen policy in the guest", () => {
  test("default policy: 80 is privileged (EACCES), 1024 and above listen, listen(0) avoids privileged ports", async () => {
    const vm = await testVm(await tempDataDir());
    const result = await guestResult(vm, TRY_LISTEN, ["80", "1023", "1024", "8080", "0"]);
    assert.equal(result[0].code, "EACCES", JSON.stringify(result[0]));
    assert.equal(result[0].syscall, "listen");
    assert.match(result[0].message, /port 80/);
    assert.match(result[0].message, /privileged|allowPrivileged/);
    assert.equal(result[1].code, "EACCES");
    assert.equal(result[2].port, 1024);
    assert.equal(result[3].port, 8080);
    assert.ok(result[4].port >= 1024 && result[4].port <= 65535, `listen(0) got ${result[4].port}`);
  });

  test("outside [portMin, portMax] → EACCES; listen(0) stays in range", async () => {
    const vm = await testVm(await tempDataDir(), { listen: { portMin: 4000, portMax: 4100 } });
    assert.deepEqual(vm.listenPolicy, { portMin: 4000, portMax: 4100, allowPrivileged: false });
    const zeros = Array.from({ length: 20 }, () => "0");
    const result = await guestResult(vm, TRY_LISTEN, ["3999", "4101", "65535", "4000", "4100", ...zeros]);
    for (const denied of result.slice(0, 3)) {
      assert.equal(denied.code, "EACCES", JSON.stringify(denied));
      assert.match(denied.message, new RegExp(`port ${denied.asked}.*4000-4100`));
    }
    assert.equal(result[3].port, 4000);
    assert.equal(result[4].port, 4100);
    const auto = result.slice(5).map((r: { port: number }) => r.port);
    assert.equal(new Set(auto).size, auto.length, "each listen(0) gets its own port");
    for (const port of auto) assert.ok(port > 4000 && port < 4100, `listen(0) allocated ${port}, outside 4000-4100`);
  });

  test("allowPrivileged: true lets the guest serve on port 80, reachable with vmFetch", async () => {
    const vm = await testVm(await tempDataDir(), { listen: { allowPrivileged: true } });
    const server = await startGuest(
      vm,
      `require("node:http").createServer((q, r) => r.end("on eighty")).listen(80, () => console.log("READY " + "80"));`,
      /READY (\d+)/,
    );
    assert.equal(server.ready, "80");
    const response = await waitForPort(vm, 80);
    assert.equal(text(response.body), "on eighty");
    await vm.killProcess(server.pid);
  });

  // Ranges of four ports: Linux's bind(0) scans an even number of ports, so an odd-sized tiny range has one it never picks.
  test("allowPrivileged with a range starting below 1024: listen(0) may allocate there", async () => {
    const vm = await testVm(await tempDataDir(), { listen: { portMin: 100, portMax: 103, allowPrivileged: true } });
    const result = await guestResult(vm, TRY_LISTEN, ["0", "0", "0", "0", "99"]);
    assert.deepEqual(result.slice(0, 4).map((r: { port: number }) => r.port).sort(), [100, 101, 102, 103]);
    assert.equal(result[4].code, "EACCES");
  });

  test("exhaustion: every port of a tiny range bound → listen(0) is EADDRINUSE; a taken port is EADDRINUSE", async () => {
    const vm = await testVm(await tempDataDir(), { listen: { portMin: 5000, portMax: 5003 } });
    const result = await guestResult(vm, TRY_LISTEN, ["0", "0", "0", "0", "0", "5001"]);
    assert.deepEqual(result.slice(0, 4).map((r: { port: number }) => r.port).sort(), [5000, 5001, 5002, 5003]);
    assert.equal(result[4].code, "EADDRINUSE", JSON.stringify(result[4]));
    assert.match(result[4].message, /5000-5003/);
    assert.equal(result[5].code, "EADDRINUSE", JSON.stringify(result[5]));
  });

  test("a range entirely below 1024 without allowPrivileged leaves listen(0) nothing: EADDRINUSE", async () => {
    const vm = await testVm(await tempDataDir(), { listen: { portMin: 10, portMax: 20 } });
    const result = await guestResult(vm, TRY_LISTEN, ["0", "15"]);
    assert.equal(result[0].code, "EADDRINUSE", JSON.stringify(result[0]));
    assert.equal(result[1].code, "EACCES", JSON.stringify(result[1]));
  });
});

describe("listen policy validation", () => {
  const bad: [string, unknown, RegExp][] = [
    ["portMin 0", { portMin: 0 }, /listen\.portMin must be an integer from 1 to 65535, got 0/],
    ["portMax 70000", { portMax: 70000 }, /listen\.portMax must be an integer from 1 to 65535, got 70000/],
    ["portMin 70000", { portMin: 70000 }, /listen\.portMin must be an integer from 1 to 65535/],
    ["portMin 1.5", { portMin: 1.5 }, /listen\.portMin must be an integer/],
    ["portMax as a string", { portMax: "9000" }, /listen\.portMax must be an integer/],
    ["portMin > portMax", { portMin: 9000, portMax: 8000 }, /listen\.portMin \(9000\) must not be greater than .*listen\.portMax \(8000\)/],
    ['allowPrivileged "yes"', { allowPrivileged: "yes" }, /listen\.allowPrivileged must be a boolean/],
    ["an unknown key", { portmin: 3000 }, /listen.*portmin/],
    ["not an object", 3000, /listen/],
  ];

  for (const [what, listen, message] of bad) {
    test(`createVm rejects ${what}`, async () => {
      const error = await rejection(createVm({ dataDir: await tempDataDir(), listen: listen as never }));
      assert.equal(error.code, "INVALID_ARGUMENT", error.message);
      assert.match(error.message, message);
    });

    test(`agentOS() rejects ${what} (both config shapes)`, () => {
      for (const config of [{ listen }, { options: { listen } }]) {
        assert.throws(
          () => agentOS(config as never),
          (error: Error & { code?: string }) => {
            assert.equal(error.code, "INVALID_ARGUMENT");
            assert.match(error.message, message);
            assert.match(error.message, config.options ? /config\.options\.listen/ : /config\.listen/);
            return true;
          },
        );
      }
    });
  }

  test("valid configs are accepted and normalized", async () => {
    assert.deepEqual(agentOS({ listen: { portMin: 3000, portMax: 3000 } }).listen, { portMin: 3000, portMax: 3000, allowPrivileged: false });
    assert.deepEqual(agentOS({}).listen, { portMin: 1, portMax: 65535, allowPrivileged: false });
    assert.deepEqual(agentOS({ options: { listen: { allowPrivileged: true } } }).listen, { portMin: 1, portMax: 65535, allowPrivileged: true });
  });
});
