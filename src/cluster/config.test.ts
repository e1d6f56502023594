import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { isPrivateAddress, parseEngineOptions, parseFlags, parseNodeOptions } from "./config.ts";
import { engineConfig } from "./engine.ts";

const engineFlags = (...args: string[]) => parseEngineOptions(parseFlags(args, ["host", "port", "data-dir", "token", "postgres", "nats", "public-url", "watchdog", "watchdog-timeout"], "engine"), {});
const nodeFlags = (...args: string[]) =>
  parseNodeOptions(parseFlags(args, ["engine", "name", "advertise", "advertise-preview", "port", "preview-port", "host", "data-dir", "token", "registry"], "node"), {});

function rejectionMessage(run: () => unknown): string {
  try {
    run();
  } catch (error) {
    return (error as Error).message;
  }
  throw new Error("expected an error");
}

describe("agentvm command options", () => {
  it("the engine listens on loopback by default, on its own ports, with telemetry off and short failover timeouts", () => {
    const options = engineFlags("--data-dir", "/tmp/e");
    assert.deepEqual({ host: options.host, port: options.port, token: options.token }, { host: "127.0.0.1", port: 6500, token: undefined });
    const config = engineConfig(options) as Record<string, Record<string, unknown>>;
    assert.deepEqual(config.guard, { host: "127.0.0.1", port: 6500 });
    assert.deepEqual(config.api_peer, { host: "127.0.0.1", port: 6501 });
    assert.deepEqual(config.metrics, { host: "127.0.0.1", port: 6502 });
    assert.deepEqual(config.telemetry, { enabled: false });
    assert.deepEqual(config.pegboard, { reschedule_backoff_max_exponent: 2, envoy_lost_threshold: 5000 });
    assert.equal(config.auth, undefined);
  });

  it("off loopback the engine takes only private addresses, and only with a token", () => {
    assert.throws(() => engineFlags("--host", "0.0.0.0"), { code: "INVALID_ARGUMENT", message: /loopback or on a private address/ });
    assert.throws(() => engineFlags("--host", "8.8.8.8"), { code: "INVALID_ARGUMENT" });
    assert.throws(() => engineFlags("--host", "10.1.2.3"), { code: "INVALID_ARGUMENT", message: /--token/ });
    const options = engineFlags("--host", "10.1.2.3", "--token", "s3cret");
    assert.deepEqual((engineConfig(options) as { auth: unknown }).auth, { admin_token: "s3cret" });
    for (const address of ["10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "fd00::1"]) assert.ok(isPrivateAddress(address), address);
    for (const address of ["172.32.0.1", "11.0.0.1", "2001:db8::1", "example.com"]) assert.ok(!isPrivateAddress(address), address);
  });

  it("several engines share PostgreSQL + NATS with one topology: the balancer's address, not their own", () => {
    const alone = engineConfig(engineFlags("--data-dir", "/tmp/e", "--port", "7000")) as Record<string, unknown>;
    assert.deepEqual(alone.file_system, { path: "/tmp/e/db" });
    assert.deepEqual((alone.topology as { datacenters: unknown }).datacenters, { default: { datacenter_label: 1, is_leader: true, peer_url: "http://127.0.0.1:7001", public_url: "http://127.0.0.1:7000" } });
    const shared = ["--postgres", "postgresql://rivet:pw@10.0.0.3:5432/rivet", "--nats", "10.0.0.4, nats://10.0.0.5:4300", "--public-url", "http://10.0.0.2:6500"];
    const configs = ["7000", "7100"].map((port) => engineConfig(engineFlags("--data-dir", `/tmp/e${port}`, "--port", port, ...shared)) as Record<string, unknown>);
    for (const config of configs) {
      assert.equal(config.file_system, undefined);
      assert.deepEqual(config.postgres, { url: "postgresql://rivet:pw@10.0.0.3:5432/rivet" });
      assert.deepEqual(config.nats, { addresses: ["10.0.0.4:4222", "10.0.0.5:4300"] });
    }
    assert.deepEqual(configs[0]!.topology, configs[1]!.topology);
    assert.deepEqual((configs[0]!.topology as { datacenters: unknown }).datacenters, { default: { datacenter_label: 1, is_leader: true, peer_url: "http://10.0.0.2:6501", public_url: "http://10.0.0.2:6500" } });
    assert.deepEqual(configs.map((config) => config.guard), [{ host: "127.0.0.1", port: 7000 }, { host: "127.0.0.1", port: 7100 }]);
    assert.throws(() => engineFlags("--postgres", "postgresql://h/db"), { code: "INVALID_ARGUMENT", message: /--nats/ });
    assert.throws(() => engineFlags("--nats", "h:4222"), { code: "INVALID_ARGUMENT", message: /--postgres/ });
    assert.throws(() => engineFlags("--postgres", "mysql://h/db", "--nats", "h"), { code: "INVALID_ARGUMENT", message: /postgres:\/\// });
    const secret = rejectionMessage(() => engineFlags("--postgres", "not a url :pw", "--nats", "h"));
    assert.doesNotMatch(secret, /:pw/);
    assert.throws(() => engineFlags("--postgres", "postgresql://h/db", "--nats", "http://h:4222"), { code: "INVALID_ARGUMENT", message: /NATS server URLs/ });
    assert.throws(() => engineFlags("--postgres", "postgresql://h/db", "--nats", "nats://u:p@h"), { code: "INVALID_ARGUMENT", message: /credentials/ });
    assert.throws(() => engineFlags("--public-url", "http://lb:6500/path"), { code: "INVALID_ARGUMENT", message: /without a path/ });
    const fromEnv = parseEngineOptions(new Map(), { AGENTVM_ENGINE_POSTGRES: "postgres://h/db", AGENTVM_ENGINE_NATS: "nats://n", AGENTVM_ENGINE_PUBLIC_URL: "http://lb:6500" });
    assert.deepEqual({ shared: fromEnv.shared, publicUrl: fromEnv.publicUrl }, { shared: { postgres: "postgres://h/db", nats: ["n:4222"] }, publicUrl: "http://lb:6500" });
  });

  it("the engine watchdog probes every 30 s with a 10 s timeout unless told otherwise; 0 turns it off", () => {
    assert.deepEqual(engineFlags().watchdog, { intervalMs: 30_000, timeoutMs: 10_000 });
    assert.deepEqual(engineFlags("--watchdog", "5", "--watchdog-timeout", "2").watchdog, { intervalMs: 5_000, timeoutMs: 2_000 });
    assert.equal(engineFlags("--watchdog", "0").watchdog, undefined);
    assert.deepEqual(parseEngineOptions(new Map(), { AGENTVM_ENGINE_WATCHDOG: "7", AGENTVM_ENGINE_WATCHDOG_TIMEOUT: "3" }).watchdog, { intervalMs: 7_000, timeoutMs: 3_000 });
    for (const bad of ["-1", "1.5", "x", "90000"]) assert.throws(() => engineFlags("--watchdog", bad), { code: "INVALID_ARGUMENT", message: /--watchdog must be a whole number of seconds/ }, bad);
    assert.throws(() => engineFlags("--watchdog-timeout", "0"), { code: "INVALID_ARGUMENT", message: /--watchdog-timeout must be a whole number of seconds from 1/ });
  });

  it("a node needs an engine URL and a name, and advertises its API and preview origins", () => {
    assert.throws(() => nodeFlags("--name", "a"), { code: "INVALID_ARGUMENT", message: /--engine is required/ });
    assert.throws(() => nodeFlags("--engine", "http://127.0.0.1:6500"), { code: "INVALID_ARGUMENT", message: /--name is required/ });
    assert.throws(() => nodeFlags("--engine", "ftp://x", "--name", "a"), { code: "INVALID_ARGUMENT", message: /http\(s\) URL/ });
    assert.throws(() => nodeFlags("--engine", "http://127.0.0.1:6500", "--name", "Node_A"), { code: "INVALID_ARGUMENT", message: /lowercase/ });
    assert.throws(() => nodeFlags("--engine", "http://127.0.0.1:6500", "--name", "a".repeat(31)), { code: "INVALID_ARGUMENT" });
    assert.throws(() => nodeFlags("--engine", "http://127.0.0.1:6500", "--name", "a", "--port", "0"), { code: "INVALID_ARGUMENT", message: /--advertise/ });
    const options = nodeFlags("--engine", "http://127.0.0.1:6500/", "--name", "a", "--port", "7000");
    assert.deepEqual(
      { engine: options.engine, advertise: options.advertise, advertisePreview: options.advertisePreview, previewPort: options.previewPort },
      { engine: "http://127.0.0.1:6500", advertise: "http://127.0.0.1:7000", advertisePreview: "http://127.0.0.1:7001", previewPort: 7001 },
    );
    const advertised = nodeFlags("--engine", "http://10.0.0.2:6500", "--name", "b", "--host", "10.0.0.10", "--advertise", "http://node-b.internal:7000");
    assert.equal(advertised.advertisePreview, "http://node-b.internal:6431");
  });

  it("flags: unknown ones and missing values are named", () => {
    assert.throws(() => parseFlags(["--nope", "1"], ["port"], "engine"), { code: "INVALID_ARGUMENT", message: /unknown option --nope/ });
    assert.throws(() => parseFlags(["--port"], ["port"], "engine"), { code: "INVALID_ARGUMENT", message: /--port needs a value/ });
    assert.throws(() => parseFlags(["stray"], ["port"], "engine"), { code: "INVALID_ARGUMENT", message: /unexpected argument/ });
    assert.equal(parseFlags(["--port=7"], ["port"], "engine").get("port"), "7");
  });
});
