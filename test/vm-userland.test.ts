/**
 * A VM is one Linux sandbox with a real userland (DESIGN §1): shell pipelines,
 * git, npm with install scripts, non-Node servers reached by vmFetch, Node's
 * fork/IPC/spawnSync/unix sockets, signals between the VM's own processes, a
 * loopback of its own per VM, and egress for curl, git and npm only through
 * the network policy. Real sandboxes, the real image, host servers on loopback.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createReadStream } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join, normalize } from "node:path";
import type { Vm } from "agentvm";
import { tempDataDir, testVm, text, waitForPort } from "./helpers.ts";
import { hostHttpServer } from "./policy-support.ts";

let dataDir: string;
let vm: Vm;

before(async () => {
  dataDir = await tempDataDir("agentvm-userland-");
  vm = await testVm(dataDir, { name: "userland" });
});

async function sh(script: string, target: Vm = vm, env?: Record<string, string>): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  return target.exec("sh", ["-c", script], env ? { env } : {});
}

describe("the image's programs", () => {
  test("a shell pipeline, coreutils, grep, sed, awk, find, diff, tar and gzip", async () => {
    const result = await sh(
      [
        "ls / | wc -l",
        "printf 'b\\na\\nc\\n' | sort | tr a-z A-Z | paste -sd,",
        "echo 'x=1' | sed 's/1/2/' | grep x= | awk -F= '{print $2}'",
        "mkdir -p t/d && echo hi > t/d/f && find t -type f",
        "echo one > a && echo two > b; diff a b > /dev/null; echo diff=$?",
        "tar czf t.tgz t && rm -r t && tar xzf t.tgz && cat t/d/f",
      ].join(" && "),
    );
    assert.equal(result.exitCode, 0, result.stderr);
    const lines = result.stdout.trim().split("\n");
    assert.ok(Number(lines[0]) >= 8, `ls / shows ${lines[0]} entries`);
    assert.deepEqual(lines.slice(1), ["A,B,C", "2", "t/d/f", "diff=1", "hi"]);
  });

  test("git init, add and commit", async () => {
    const result = await sh("mkdir -p repo && cd repo && git init -q && echo hello > README && git add README && git -c user.name=agent -c user.email=agent@example.com commit -qm first && git log --format=%s");
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(result.stdout, "first\n");
  });

  test("host programs are not in the VM: /usr/local is empty and no compiler is on PATH", async () => {
    const result = await sh("ls -A /usr/local/bin | wc -l; command -v gcc || echo no-gcc; command -v cc || echo no-cc");
    assert.equal(result.stdout, "0\nno-gcc\nno-cc\n", result.stderr);
  });

  test("npm installs a package from a local tarball with no network: its postinstall runs, and -g puts its bin on PATH", async () => {
    await vm.writeFile("/home/agentos/pkg/package.json", JSON.stringify({ name: "hello-pkg", version: "1.0.0", bin: { "hello-pkg": "cli.js" }, scripts: { postinstall: "node -e \"require('fs').writeFileSync('postinstall-ran', 'yes')\"" } }));
    await vm.writeFile("/home/agentos/pkg/cli.js", "#!/usr/bin/env node\nconsole.log('hello from the package');\n");
    const packed = await sh("cd pkg && chmod +x cli.js && npm pack --silent");
    assert.equal(packed.exitCode, 0, packed.stderr);
    const local = await sh("mkdir -p app && cd app && npm install --offline --no-audit --no-fund ../pkg/hello-pkg-1.0.0.tgz >/dev/null && cat node_modules/hello-pkg/postinstall-ran && npx --offline hello-pkg");
    assert.equal(local.exitCode, 0, local.stderr);
    assert.equal(local.stdout, "yeshello from the package\n");
    const global = await sh("npm install -g --offline --no-audit --no-fund ./pkg/hello-pkg-1.0.0.tgz >/dev/null && command -v hello-pkg && hello-pkg");
    assert.equal(global.exitCode, 0, global.stderr);
    assert.equal(global.stdout, "/home/agentos/.local/bin/hello-pkg\nhello from the package\n");
  });
});

describe("processes are the VM's own", () => {
  test("fork with IPC, spawnSync, execSync, unix sockets and /proc/self behave as on Linux", async () => {
    await vm.writeFile(
      "/home/agentos/node-features.js",
      `
const { fork, spawnSync, execSync } = require("node:child_process");
const net = require("node:net");
const fs = require("node:fs");
if (process.argv[2] === "child") {
  process.on("message", (m) => { process.send({ echo: m, pid: process.pid }); process.exit(0); });
  return;
}
const out = {};
out.spawnSync = spawnSync("sh", ["-c", "echo sync"], { encoding: "utf8" }).stdout.trim();
out.execSync = execSync("echo $((6 * 7))", { encoding: "utf8" }).trim();
out.procSelf = fs.readlinkSync("/proc/self/exe");
const child = fork(__filename, ["child"]);
child.send("ping");
child.on("message", (m) => {
  out.fork = m.echo;
  out.childIsOwnProcess = m.pid !== process.pid;
  const server = net.createServer((s) => s.end("over a unix socket")).listen("/tmp/test.sock", () => {
    net.connect("/tmp/test.sock").on("data", (d) => { out.unix = String(d); server.close(); console.log(JSON.stringify(out)); });
  });
});
`,
    );
    const result = await vm.exec("node", ["node-features.js"]);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), {
      spawnSync: "sync",
      execSync: "42",
      procSelf: "/opt/node/bin/node",
      fork: "ping",
      childIsOwnProcess: true,
      unix: "over a unix socket",
    });
  });

  test("signals between the VM's processes; stdin to a shell", async () => {
    const result = await sh("sleep 30 & pid=$!; kill -TERM $pid; wait $pid; echo status=$?");
    assert.equal(result.stdout, "status=143\n", result.stderr);
    const { pid } = await vm.spawn("sh", ["-c", "read line; echo got:$line"]);
    const output: string[] = [];
    const listen = (event: { pid: number; data: Uint8Array }) => event.pid === pid && output.push(text(event.data));
    vm.on("processOutput", listen);
    await vm.writeProcessStdin(pid, "hello\n");
    assert.equal(await vm.waitProcess(pid), 0);
    vm.off("processOutput", listen);
    assert.equal(output.join(""), "got:hello\n");
  });
});

describe("the VM's loopback", () => {
  test("a non-Node server (busybox httpd) is reached by vmFetch", async () => {
    await vm.writeFile("/home/agentos/www/index.html", "served by busybox\n");
    const { pid } = await vm.spawn("busybox", ["httpd", "-f", "-p", "127.0.0.1:8081", "-h", "/home/agentos/www"]);
    const response = await waitForPort(vm, 8081, "/index.html");
    assert.equal(response.status, 200);
    assert.equal(text(response.body), "served by busybox\n");
    await vm.killProcess(pid, "SIGKILL");
  });

  test("two VMs both listen on 3000, each reaching its own; IPv4 and IPv6 are separate port spaces", async () => {
    const other = await testVm(dataDir, { name: "userland-other" });
    const serve = (who: string) => `require("node:http").createServer((q, s) => s.end("${who}")).listen(3000, "127.0.0.1")`;
    await vm.spawn("node", ["-e", serve("first")]);
    await other.spawn("node", ["-e", serve("second")]);
    assert.equal(text((await waitForPort(vm, 3000)).body), "first");
    assert.equal(text((await waitForPort(other, 3000)).body), "second");
    const v6 = await vm.exec("node", ["-e", `require("node:net").createServer().listen({ port: 3000, host: "::1", ipv6Only: true }, function () { console.log("v6 " + this.address().port); this.close(); })`]);
    assert.equal(v6.stdout, "v6 3000\n", v6.stderr);
  });
});

describe("egress for programs of every kind, only through the policy", () => {
  let hostServer: Awaited<ReturnType<typeof hostHttpServer>>;
  let staticServer: Server;
  let staticPort: number;
  let hostDir: string;
  let allowed: Vm;
  let denied: Vm;

  before(async () => {
    hostServer = await hostHttpServer({ tag: "userland" });
    // A bare git repository and a one-package npm registry, served as static files on the host's loopback.
    hostDir = await mkdtemp(join(tmpdir(), "agentvm-userland-host-"));
    const git = (...args: string[]) => execFileSync("git", args, { cwd: hostDir, env: { ...process.env, GIT_AUTHOR_NAME: "t", GIT_AUTHOR_EMAIL: "t@t", GIT_COMMITTER_NAME: "t", GIT_COMMITTER_EMAIL: "t@t" } });
    git("init", "-q", "work");
    execFileSync("sh", ["-c", "echo from-the-host > work/file && git -C work add file && git -C work -c user.name=t -c user.email=t@t commit -qm init && git clone -q --bare work repo.git && git -C repo.git update-server-info"], { cwd: hostDir });
    staticServer = createServer((request, response) => {
      const path = normalize(decodeURIComponent(new URL(request.url!, "http://x").pathname));
      const file = join(hostDir, path);
      stat(file).then(
        (info) => (info.isFile() ? createReadStream(file).pipe(response) : response.writeHead(404).end()),
        () => response.writeHead(404).end(),
      );
    });
    await new Promise<void>((resolve) => staticServer.listen(0, "127.0.0.1", resolve));
    staticPort = (staticServer.address() as { port: number }).port;
    const alias = "host.agentvm.internal";
    allowed = await testVm(dataDir, {
      name: "userland-egress-allowed",
      permissions: { network: { rules: [{ mode: "allow", patterns: [`${alias}:${hostServer.port}`, `${alias}:${staticPort}`] }] } },
    });
    denied = await testVm(dataDir, { name: "userland-egress-denied" });
  });

  after(async () => {
    staticServer?.close();
    if (hostDir) await rm(hostDir, { recursive: true, force: true });
  });

  test("curl reaches an allowed host server through init's proxy; a denied one gets 403 naming the rule", async () => {
    const ok = await sh(`curl -sS http://host.agentvm.internal:${hostServer.port}/from-curl`, allowed);
    assert.equal(ok.exitCode, 0, ok.stderr);
    assert.ok(hostServer.seen.some((request) => request.url === "/from-curl"));
    const refused = await sh(`curl -sS -w ' status=%{http_code}' http://host.agentvm.internal:${hostServer.port}/denied`, denied);
    assert.match(refused.stdout, /denied by .*default \(deny\).* status=403/s);
    assert.ok(!hostServer.seen.some((request) => request.url === "/denied"));
    const around = await sh(`curl -sS --noproxy '*' --max-time 2 http://host.agentvm.internal:${hostServer.port}/around`, allowed);
    assert.notEqual(around.exitCode, 0, "a program that ignores the proxy has no way out");
  });

  test("git clones over HTTP through the proxy when allowed, and fails when not", async () => {
    const cloned = await sh(`git clone -q http://host.agentvm.internal:${staticPort}/repo.git cloned && cat cloned/file`, allowed);
    assert.equal(cloned.exitCode, 0, cloned.stderr);
    assert.equal(cloned.stdout, "from-the-host\n");
    const refused = await sh(`git clone -q http://host.agentvm.internal:${staticPort}/repo.git cloned`, denied);
    assert.notEqual(refused.exitCode, 0);
    assert.match(refused.stderr, /403/);
  });

  test("npm installs from a registry on the host through the proxy, install scripts and all", async () => {
    // Pack a package in the allowed VM, then serve it from the host as a one-package registry.
    await allowed.writeFile("/home/agentos/regpkg/package.json", JSON.stringify({ name: "registry-pkg", version: "2.0.0", scripts: { postinstall: "node -e \"require('fs').writeFileSync('ran', 'postinstall')\"" } }));
    const packed = await sh("cd regpkg && npm pack --silent", allowed);
    assert.equal(packed.exitCode, 0, packed.stderr);
    const tarball = await allowed.readFile("/home/agentos/regpkg/registry-pkg-2.0.0.tgz");
    const { createHash } = await import("node:crypto");
    const { mkdir, writeFile } = await import("node:fs/promises");
    await mkdir(join(hostDir, "registry-pkg", "-"), { recursive: true });
    await writeFile(join(hostDir, "registry-pkg", "-", "registry-pkg-2.0.0.tgz"), tarball);
    const base = `http://host.agentvm.internal:${staticPort}`;
    await writeFile(
      join(hostDir, "registry-pkg", "index.json"),
      JSON.stringify({
        name: "registry-pkg",
        "dist-tags": { latest: "2.0.0" },
        versions: {
          "2.0.0": {
            name: "registry-pkg",
            version: "2.0.0",
            scripts: { postinstall: "node -e \"require('fs').writeFileSync('ran', 'postinstall')\"" },
            dist: { tarball: `${base}/registry-pkg/-/registry-pkg-2.0.0.tgz`, integrity: `sha512-${createHash("sha512").update(tarball).digest("base64")}` },
          },
        },
      }),
    );
    // The static server answers /registry-pkg with the packument.
    staticServer.prependListener("request", (request) => {
      if (request.url === "/registry-pkg") request.url = "/registry-pkg/index.json";
    });
    const installed = await sh(`mkdir -p regapp && cd regapp && npm install --no-audit --no-fund --registry ${base}/ registry-pkg >/dev/null && cat node_modules/registry-pkg/ran`, allowed);
    assert.equal(installed.exitCode, 0, installed.stderr);
    assert.equal(installed.stdout, "postinstall");
    const refused = await sh(`mkdir -p regapp && cd regapp && npm install --no-audit --no-fund --fetch-retries=0 --registry ${base}/ registry-pkg`, denied);
    assert.notEqual(refused.exitCode, 0);
  });

  test("Node's fetch reaches the allowed server and gets EACCES naming the rule when denied", async () => {
    const script = `fetch("http://host.agentvm.internal:${hostServer.port}/from-node").then((r) => console.log("status " + r.status), (e) => console.log(e.cause?.code + " " + e.cause?.message))`;
    assert.equal((await allowed.exec("node", ["-e", script])).stdout, "status 200\n");
    const refused = await denied.exec("node", ["-e", script]);
    assert.match(refused.stdout, /^EACCES connect EACCES host\.agentvm\.internal:\d+ \(.*default \(deny\)/);
  });
});
